// SPDX-License-Identifier: Apache-2.0
// How a collective call fails together: a rank's local failure is kept (SavedError) while the rank still
// takes part in the exchange that tells its peers, and every rank then returns an error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bitep/bitep.h"
#include "src/ep/exec.h"
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
// allgather_host (none at W = 1). Returns: the rank's own error if it failed, else bitepRemoteError naming
// the first failed rank, else bitepSuccess with every rank's bits in *all_bits. A transport failure marks
// the group broken.
bitepResult_t agree_status(bitepGroup* group,
                           bitepResult_t local,
                           const char* what,
                           int32_t bits = 0,
                           std::vector<int32_t>* all_bits = nullptr);

// The same through the transport's count exchange on ex's stream, which waits for the work queued there
// so far: on the cuda transport with a peer window one kernel whose result the host reads from mapped
// memory, not an NCCL call between two host copies. buf: kAgreeInts * nranks int32 of backend memory, taken
// before the rank could fail (a rank that cannot take it could not tell its peers). Every rank of a call
// must agree by the same one of the two functions.
constexpr int kAgreeInts = 4;
bitepResult_t agree_status_exchange(Exec* ex,
                                    int32_t* buf,
                                    bitepResult_t local,
                                    const char* what,
                                    int32_t bits = 0,
                                    std::vector<int32_t>* all_bits = nullptr);

// Records a transport failure: the peers' state is unknown, so the group is unusable from now on (its
// pool is leaked at destruction, never trimmed: pool_in_doubt). Returns r.
bitepResult_t transport_failed(bitepGroup* group, bitepResult_t r);

// A collective call that this rank failed on its own: no exchange or agreement told its peers, who may have gone on
// into the call's transfers and barriers. This rank's next call would meet them out of turn (a peer-window barrier
// takes any flag at or past its count; NCCL pairs sends and receives in call order), so at W > 1 the group is
// unusable from now on, as after a transport failure: check_group refuses it, naming the call and its error, and the
// peers time out in the call. A host group's pool stays usable (its transport waited for its requests); a cuda
// group's is in doubt (pool_in_doubt) where the call had queued work with its peers (peer_alltoallv,
// acquire_window), and freed only once idle (pool_if_idle) where it had not. `what`: the call, as "bitepCombine".
// Returns r.
bitepResult_t failed_alone(bitepGroup* group, bitepResult_t r, const char* what) noexcept;

// Work queued with the peers, counted (bitepGroup::peer_work) before it is queued, so that failed_alone tells a call
// that failed before queuing any (its pool: pool_if_idle) from one that failed after (pool_in_doubt).
// The transport's all-to-all on `stream` (transport_failed on a failure).
bitepResult_t peer_alltoallv(bitepGroup* group,
                             const std::vector<std::vector<PeerBuffers>>& per_peer,
                             bitepStream_t stream,
                             double timeout_s);
// The peer window's acquire on `stream`, before the window's stores and barriers.
bitepResult_t acquire_window(bitepGroup* group, PeerWindow* window, bitepStream_t stream);

}  // namespace bitep::ep
