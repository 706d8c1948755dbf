// SPDX-License-Identifier: Apache-2.0
// How a collective call fails together: a rank's local failure is kept (SavedError) while the rank still
// takes part in the exchange that tells its peers, and every rank then returns an error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bitep/bitep.h"
#include "src/ep/group.h"

namespace bitep::ep {

// Keeps a failure's code and text; restore() returns the code, re-setting the text if a later failure
// (e.g. the transport) replaced it.
class SavedError {
 public:
  explicit SavedError(bitepResult_t code);
  bitepResult_t code() const { return code_; }
  bitepResult_t restore() const;

 private:
  bitepResult_t code_;
  std::string text_;
};

// Every rank passes its local verdict (and optionally a word of bits its peers need to know); one
// allgather_host. Returns: the rank's own error if it failed, else bitepRemoteError naming the first
// failed rank, else bitepSuccess with every rank's bits in *all_bits. A transport failure marks the group
// broken.
bitepResult_t agree_status(bitepGroup* group,
                           bitepResult_t local,
                           const char* what,
                           int32_t bits = 0,
                           std::vector<int32_t>* all_bits = nullptr);

// Records a transport failure: the peers' state is unknown, so the group is unusable from now on (its
// pool is leaked at destruction: a peer may still write into it). Returns r.
bitepResult_t transport_failed(bitepGroup* group, bitepResult_t r);

}  // namespace bitep::ep
