// SPDX-License-Identifier: Apache-2.0
#include "src/ep/collective.h"

#include <cstring>
#include <vector>

#include "src/check.h"

namespace bitep::ep {

SavedError::SavedError(bitepResult_t code) : code_(code) {
  if (code != bitepSuccess) text_ = bitepGetLastError();
}

bitepResult_t SavedError::restore() const {
  if (code_ != bitepSuccess && std::strcmp(bitepGetLastError(), text_.c_str()) != 0)
    set_error(code_, __FILE__, __LINE__, "%s", text_.c_str());
  return code_;
}

bitepResult_t transport_failed(bitepGroup* group, bitepResult_t r) {
  if (r != bitepSuccess && group->broken.empty()) group->broken = bitepGetLastError();
  return r;
}

bitepResult_t agree_status(
    bitepGroup* group, bitepResult_t local, const char* what, int32_t bits, std::vector<int32_t>* all_bits) {
  SavedError saved(local);
  const int32_t mine[2] = {static_cast<int32_t>(local), bits};
  std::vector<int32_t> all(2 * static_cast<size_t>(group->nranks), 0);
  const bitepResult_t r = group->transport->allgather_host(mine, all.data(), sizeof(mine));
  if (r != bitepSuccess) {
    transport_failed(group, r);
    return local != bitepSuccess ? saved.restore() : r;
  }
  if (local != bitepSuccess) return saved.restore();
  for (int q = 0; q < group->nranks; ++q)
    if (all[2 * q] != bitepSuccess)
      BITEP_FAIL(bitepRemoteError, "rank %d of %d failed its part of %s with %s; see that rank's bitepGetLastError()",
                 q, group->nranks, what, bitepGetErrorString(static_cast<bitepResult_t>(all[2 * q])));
  if (all_bits != nullptr) {
    all_bits->resize(group->nranks);
    for (int q = 0; q < group->nranks; ++q) (*all_bits)[q] = all[2 * q + 1];
  }
  return bitepSuccess;
}

}  // namespace bitep::ep
