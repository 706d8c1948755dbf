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
  if (r != bitepSuccess) group->pool_in_doubt = true;
  if (r != bitepSuccess && group->broken.empty())
    group->broken = std::string("an earlier transport failure (") + bitepGetLastError() + ")";
  return r;
}

bitepResult_t failed_alone(bitepGroup* group, bitepResult_t r, const char* what) noexcept {
  if (r == bitepSuccess || group->nranks <= 1) return r;
  // cuda: work this call queued with the peers before it failed may wait for them with no end this rank can see, and a
  // receive it posted may still be written. Before any, no peer can write into the pool, and whether earlier calls'
  // work on it is done is Pool::idle()'s to tell. The host transport waits for its requests, or abandons them as a
  // transport failure (transport_failed).
  if (group->config.backend == bitepBackendCuda) {
    if (group->peer_work != group->peer_work_at_entry)
      group->pool_in_doubt = true;
    else
      group->pool_if_idle = true;
  }
  if (!group->broken.empty()) return r;
  try {
    group->broken = std::string("this rank failed ") + what + " on its own (" + bitepGetLastError() +
                    ") while its peers may have gone on into the call's transfers";
  } catch (...) {  // no memory for the text: the record must still be made
    try {
      group->broken = "this rank failed a collective call on its own";
    } catch (...) {
      group->broken.assign(1, '!');  // within the string's own buffer (short-string storage)
    }
  }
  return r;
}

bitepResult_t peer_alltoallv(bitepGroup* group,
                             const std::vector<std::vector<PeerBuffers>>& per_peer,
                             bitepStream_t stream,
                             double timeout_s) {
  ++group->peer_work;
  return transport_failed(group, group->transport->alltoallv(per_peer, stream, timeout_s));
}

bitepResult_t acquire_window(bitepGroup* group, PeerWindow* window, bitepStream_t stream) {
  ++group->peer_work;
  return window->acquire(stream);
}

namespace {

// The verdict from every rank's (status, bits) pair, all[2 q], all[2 q + 1].
bitepResult_t verdict(bitepGroup* group, const int32_t* all, const char* what, std::vector<int32_t>* all_bits) {
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

// One rank has nobody to agree with.
bitepResult_t alone(bitepResult_t local, int32_t bits, std::vector<int32_t>* all_bits) {
  if (local == bitepSuccess && all_bits != nullptr) all_bits->assign(1, bits);
  return local;
}

}  // namespace

bitepResult_t agree_status(
    bitepGroup* group, bitepResult_t local, const char* what, int32_t bits, std::vector<int32_t>* all_bits) {
  if (group->nranks == 1) return alone(local, bits, all_bits);
  SavedError saved(local);
  const int32_t mine[2] = {static_cast<int32_t>(local), bits};
  std::vector<int32_t> all(2 * static_cast<size_t>(group->nranks), 0);
  const bitepResult_t r = group->transport->allgather_host(mine, all.data(), sizeof(mine));
  if (r != bitepSuccess) {
    transport_failed(group, r);
    return local != bitepSuccess ? saved.restore() : r;
  }
  if (local != bitepSuccess) return saved.restore();
  return verdict(group, all.data(), what, all_bits);
}

bitepResult_t agree_status_exchange(
    Exec* ex, int32_t* buf, bitepResult_t local, const char* what, int32_t bits, std::vector<int32_t>* all_bits) {
  bitepGroup* group = ex->group();
  const int W = group->nranks;
  if (W == 1) return alone(local, bits, all_bits);
  SavedError saved(local);
  // The same pair to every peer: the exchange is then an allgather.
  std::vector<int32_t> mine(2 * static_cast<size_t>(W)), all(2 * static_cast<size_t>(W), 0);
  for (int p = 0; p < W; ++p) {
    mine[2 * p] = static_cast<int32_t>(local);
    mine[2 * p + 1] = bits;
  }
  // A rank that cannot even upload its pair leaves its peers waiting: the group is as broken as after a
  // transport failure.
  bitepResult_t r = ex->upload_staged(buf, mine.data(), sizeof(int32_t) * mine.size());
  if (r == bitepSuccess)
    r = group->transport->exchange_counts(buf, buf + 2 * W, all.data(), 2, ex->stream(), group->config.timeout_s);
  if (r != bitepSuccess) {
    transport_failed(group, r);
    return local != bitepSuccess ? saved.restore() : r;
  }
  if (local != bitepSuccess) return saved.restore();
  return verdict(group, all.data(), what, all_bits);
}

}  // namespace bitep::ep
