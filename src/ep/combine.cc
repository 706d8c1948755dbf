// SPDX-License-Identifier: Apache-2.0
// bitepCombine and bitepDispatchBackward: per received row the (weighted) sum over its local experts
// (rank-major input skips it) -> all-to-all-v back with the handle's counts (no count exchange) -> each
// token sums its partial rows in ascending rank order. Dispatch backward is the unweighted combine.
// When the others' rows are large (split_min_bytes()), this rank's own rows, which never travel, are
// summed on a side stream beside the all-to-all. Where the group has a peer window (src/ep/transport.h),
// the combines store their partial rows straight into the source ranks' windows instead of the all-to-all,
// in one reduce launch that also sums the own rows (combine_window); small ones by the all-to-all only
// with BITEP_LSA_SMALL=0 (decided with the dispatch).
#include "src/ep/combine.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "src/args.h"
#include "src/check.h"
#include "src/env.h"
#include "src/ep/collective.h"
#include "src/ep/dispatch_args.h"
#include "src/ep/exec.h"
#include "src/ep/low_latency.h"

namespace bitep::ep {

bitepResult_t check_call_agreed(
    bitepGroup_t group, bitepHandle_t handle, bool backward, GroupCall* call, const char* api, bitepResult_t* local) {
  // A handle whose group was destroyed (bitepInvalidUsage) still joins the agreement on `group` when that is a live
  // group (the registry answers without reading it), so its peers fail at once; it returns alone when `group` is gone
  // too (the handle's own group, most likely).
  *local = check_handle(handle, nullptr);
  if (*local == bitepInvalidUsage && !is_live_group(group)) return *local;
  const SavedError saved(*local);
  BITEP_CHECK(call->enter(group, api));
  BITEP_CHECK(check_group(group));
  if (*local == bitepSuccess) *local = check_handle(handle, group);
  if (*local == bitepSuccess && backward && handle->low_latency)
    *local = set_error(bitepNotSupported, __FILE__, __LINE__,
                       "the handle is from bitepDispatchLowLatency, which has no backward pass: use bitepDispatch "
                       "for training");
  if (*local != bitepSuccess) saved.restore();
  return bitepSuccess;
}

const char* call_name(CallKind kind) {
  switch (kind) {
    case CallKind::kCombine:
      return "bitepCombine";
    case CallKind::kDispatchBackward:
      return "bitepDispatchBackward";
    case CallKind::kCombineBackward:
      return "bitepCombineBackward";
  }
  return "a call on a handle";
}

int32_t dispatch_bits(const bitepHandle* handle, CallKind kind) {
  return static_cast<int32_t>((handle->seq & 0x7fffffu) << 8) | (static_cast<int32_t>(kind) << 5);
}

bitepResult_t same_dispatch(const bitepGroup* group, const std::vector<int32_t>& all_bits, const char* what) {
  const int self = group->rank;
  const auto kind = [&](int q) { return static_cast<CallKind>((all_bits[q] >> 5) & 7); };
  for (int q = 0; q < group->nranks; ++q)
    if (kind(q) != kind(self))
      BITEP_FAIL(bitepInvalidArgument,
                 "rank %d makes %s where this rank (%d) makes %s: every rank must make the same calls on a group, in "
                 "the same order (a call refused on one rank, by the thread rules, must be made again before any "
                 "other)",
                 q, call_name(kind(q)), self, call_name(kind(self)));
  for (int q = 0; q < group->nranks; ++q)
    if ((all_bits[q] >> 8) != (all_bits[self] >> 8))
      BITEP_FAIL(bitepInvalidArgument,
                 "rank %d gives %s the handle of this group's dispatch #%d, this rank (%d) that of dispatch #%d: "
                 "every rank must give the handle of the same dispatch (combine handles in the same order)",
                 q, what, all_bits[q] >> 8, self, all_bits[self] >> 8);
  return bitepSuccess;
}

namespace {

// The final sum of this rank's tokens: the peers' returned rows from `ret` (send layout), the own ones
// from self_ret at self_ret_offset + slot.
kernels::FinalSumParams final_sum_params(const bitepGroup* g,
                                         const bitepHandle* h,
                                         const void* ret,
                                         const void* self_ret,
                                         int64_t self_ret_offset,
                                         void* out) {
  kernels::FinalSumParams fp;
  fp.num_tokens = h->num_tokens;
  fp.num_ranks = g->nranks;
  fp.self_rank = g->rank;
  fp.hidden = g->config.hidden;
  fp.dtype = to_kernel_dtype(g->config.dtype);
  fp.token_slot = h->token_slot;
  fp.send_offsets = h->send_offsets_dev;
  fp.ret = ret;
  fp.self_ret = self_ret;
  fp.self_ret_offset = self_ret_offset;
  fp.out = out;
  fp.max_row_pieces = combine_row_pieces();
  return fp;
}

// The reduce of received rows [i0, i0 + n) into `out` (n partial rows).
kernels::ReduceParams reduce_params(const bitepGroup* g,
                                    const bitepHandle* h,
                                    const void* y,
                                    int weighted,
                                    int64_t i0,
                                    int64_t n,
                                    void* out,
                                    int blocks_per_sm) {
  const int KL = g->max_row_experts;
  kernels::ReduceParams rp;
  rp.num_recv_rows = n;
  rp.max_row_experts = KL;
  rp.hidden = g->config.hidden;
  rp.dtype = to_kernel_dtype(g->config.dtype);
  rp.y = y;
  rp.recv_expert_rows = h->recv_expert_rows + i0 * KL;
  rp.recv_weights = weighted ? h->recv_weights + i0 * KL : nullptr;
  rp.out = out;
  rp.blocks_per_sm = blocks_per_sm;
  rp.max_row_pieces = combine_row_pieces();
  return rp;
}

}  // namespace

int combine_row_pieces() {
  static const int n = env_int("BITEP_COMBINE_PIECES", 1, 1024, 0);
  return n;
}

bitepResult_t return_rows(Exec& ex, bitepGroup* g, bitepHandle* h, const void* partial, void* out, Trace* trace) {
  const int W = g->nranks, self = g->rank;
  const size_t row = static_cast<size_t>(dtype_size(g->config.dtype)) * g->config.hidden;
  void* ret = nullptr;
  BITEP_CHECK(ex.temp(row * h->num_send_rows, &ret));
  std::vector<std::vector<PeerBuffers>> per_peer(W);
  add_route_buffers(h, self, Route::kBack, partial, ret, row, &per_peer);
  BITEP_CHECK(peer_alltoallv(g, per_peer, ex.stream(), g->config.timeout_s));
  if (trace != nullptr) trace->mark("all-to-all");
  BITEP_CHECK(ex.join());  // the own rows' partials, when reduced beside the all-to-all
  if (h->num_tokens == 0) return bitepSuccess;
  BITEP_CHECK(ex.final_sum(final_sum_params(g, h, ret, partial, h->recv_offsets[self], out)));
  if (trace != nullptr) trace->mark("final-sum");
  return bitepSuccess;
}

namespace {

// A combine after a window exchange skips its first barrier when the latest dispatch's bytes plus its
// partials fit in this many bytes of the window (the window grows to hold them): small and medium calls.
constexpr size_t kCombineNoBarrierBytes = size_t{64} << 20;

bitepResult_t check_combine_args(const bitepGroup* g,
                                 const bitepHandle* h,
                                 const void* y,
                                 bitepLayout_t layout,
                                 int weighted,
                                 const void* out,
                                 const char* y_name,
                                 const char* layout_name,
                                 const char* out_name) {
  BITEP_CHECK(check_layout(layout, layout_name));
  BITEP_ARG_CHECK(!h->low_latency || layout == bitepLayoutExpertMajor,
                  "%s is bitepLayoutRankMajor but the handle is from bitepDispatchLowLatency, which has no rank-major "
                  "rows: pass expert-major rows",
                  layout_name);
  BITEP_ARG_CHECK(weighted == 0 || weighted == 1, "args->weighted is %d, must be 0 or 1", weighted);
  if (weighted && layout == bitepLayoutExpertMajor)
    BITEP_ARG_CHECK(h->has_weights,
                    "args->weighted is 1 but the dispatch had no weights: give args->probs or "
                    "args->topk_weights to bitepDispatch, or set weighted = 0");
  const int64_t rows = rows_of(h, layout);
  const uint64_t row = static_cast<uint64_t>(dtype_size(g->config.dtype)) * g->config.hidden;
  if (rows > 0)
    BITEP_ARG_CHECK(y != nullptr, "%s is NULL but the handle has %lld %s rows", y_name, static_cast<long long>(rows),
                    layout == bitepLayoutExpertMajor ? "expert-major" : "rank-major");
  if (h->num_tokens > 0)
    BITEP_ARG_CHECK(out != nullptr, "%s is NULL but the dispatch had %lld tokens on this rank", out_name,
                    static_cast<long long>(h->num_tokens));
  const int ds = dtype_size(g->config.dtype);
  return check_buffers(g->config.backend,
                       {{y_name, y, static_cast<uint64_t>(rows) * row, false},
                        {out_name, out, static_cast<uint64_t>(h->num_tokens) * row, true}},
                       {ds, ds}, g->device);
}

// Peer window: barrier (every window idle) -> each source rank's partial rows go straight into its
// window, where it would receive them (the reduce stores them over NVLink; rank-major rows are copied) ->
// barrier (all landed) -> the final sum reads this rank's window. The first barrier is left out after a
// count exchange through the window (every rank's earlier window work was done before it passed that)
// when the partials fit past the latest dispatch's bytes (which its ranks may still be reading) within
// kCombineNoBarrierBytes: they go there. The own rows never leave: their partials
// come from the same reduce launch, interleaved with the peers' (a second grid beside it found no free SM:
// the reduce's registers allow two blocks per SM, so the two ran one after the other; bench/NOTES.md v9).
bitepResult_t combine_window(Exec& ex,
                             bitepGroup* g,
                             bitepHandle* h,
                             const void* y,
                             bitepLayout_t layout,
                             int weighted,
                             void* out,
                             PeerWindow* win,
                             Trace* trace) {
  const int W = g->nranks, self = g->rank;
  const size_t row = static_cast<size_t>(dtype_size(g->config.dtype)) * g->config.hidden;
  const std::vector<int64_t>& m = h->matrix;
  if (m.size() != static_cast<size_t>(W) * W) BITEP_FAIL(bitepInternalError, "handle without its count matrix");
  int64_t smax = 0;  // the most rows any rank gets back
  for (int s = 0; s < W; ++s) {
    int64_t n = 0;
    for (int r = 0; r < W; ++r)
      if (r != s) n += m[static_cast<size_t>(s) * W + r];
    smax = std::max(smax, n);
  }
  // After a window exchange, past the latest dispatch's bytes and no first barrier; else from the start.
  bool barrier = true;
  const size_t base = win->place_combine(row * smax, kCombineNoBarrierBytes, &barrier);
  BITEP_CHECK(win->reserve(base + row * smax, g->config.timeout_s));
  const bool expert = layout == bitepLayoutExpertMajor;
  const int64_t own0 = h->recv_offsets[self], own_n = h->recv_counts[self];
  void* own = nullptr;
  if (expert) BITEP_CHECK(ex.temp(row * own_n, &own));
  // Where rank s keeps the rows it sent this rank: its send offset for `self`, in its window.
  auto peer_dst = [&](int s) {
    int64_t off = 0;
    for (int r = 0; r < self; ++r)
      if (r != s) off += m[static_cast<size_t>(s) * W + r];
    return win->data(s) + base + off * row;
  };
  void* dev_table = nullptr;  // the reduce's destinations and row offsets per source rank
  if (expert) BITEP_CHECK(ex.temp(sizeof(void*) * W + sizeof(int64_t) * (W + 1), &dev_table));
  BITEP_CHECK(acquire_window(g, win, ex.stream()));
  if (barrier) {
    BITEP_CHECK(win->barrier(ex.stream(), g->config.timeout_s));
    trace->mark("barrier");
  }
  if (expert) {
    // One reduce over every received row: the peers' partial rows into their windows over NVLink, the own
    // ones into `own`, interleaved, so the own rows' reads fill the time the stores take.
    std::vector<unsigned char> table(sizeof(void*) * W + sizeof(int64_t) * (W + 1));
    void** outs = reinterpret_cast<void**>(table.data());
    int64_t* offsets = reinterpret_cast<int64_t*>(table.data() + sizeof(void*) * W);
    uintptr_t bits = 16;  // the destinations' common alignment
    for (int s = 0; s < W; ++s) {
      outs[s] = h->recv_counts[s] == 0 ? nullptr : s == self ? own : static_cast<void*>(peer_dst(s));
      bits |= reinterpret_cast<uintptr_t>(outs[s]);
      offsets[s] = h->recv_offsets[s];
    }
    offsets[W] = h->num_recv_rows;
    // A pageable upload (the driver stages it at once): the staged one would first wait on the host for the
    // previous staged upload to run, which a combine queued behind other work must not do.
    BITEP_CHECK(ex.upload(dev_table, table.data(), table.size()));
    kernels::ReduceParams rp = reduce_params(g, h, y, weighted, 0, h->num_recv_rows, nullptr, 0);
    rp.num_sources = W;
    rp.outs = static_cast<void* const*>(dev_table);
    rp.row_offsets = reinterpret_cast<const int64_t*>(static_cast<char*>(dev_table) + sizeof(void*) * W);
    rp.self_source = self;
    rp.outs_align = static_cast<int>(bits & (~bits + 1));
    BITEP_CHECK(ex.reduce(rp));
  } else {
    for (int s = 0; s < W; ++s) {
      const int64_t i0 = h->recv_offsets[s], n = h->recv_counts[s];
      if (n > 0 && s != self) BITEP_CHECK(ex.copy(peer_dst(s), static_cast<const char*>(y) + i0 * row, n * row));
    }
  }
  trace->mark("reduce");
  BITEP_CHECK(win->barrier(ex.stream(), g->config.timeout_s));
  trace->mark("second barrier");
  if (h->num_tokens == 0) return win->release(ex.stream());
  BITEP_CHECK(ex.final_sum(final_sum_params(g, h, win->data(self) + base, expert ? own : y, expert ? 0 : own0, out)));
  trace->mark("final-sum");
  return win->release(ex.stream());
}

// kind: the API call; a failure of this rank's alone is recorded (failed_alone).
bitepResult_t combine(bitepGroup_t g,
                      bitepHandle_t h,
                      const void* y,
                      bitepLayout_t layout,
                      int weighted,
                      void* out,
                      bitepStream_t stream,
                      bitepResult_t local,
                      const char* what,
                      CallKind kind) {
  const char* api = call_name(kind);
  bool shared = false;  // the failure returned is every rank's (host groups' agreement), not this rank's alone
  const bitepResult_t r = catch_all([&]() -> bitepResult_t {
    Exec ex(g, stream);
    BITEP_CHECK(ex.begin());
    if (ex.capturing()) {
      // Only the low-latency window's combine runs on the device alone; this rank returns at once (peers that
      // make the call uncaptured wait for it until the group's timeout).
      if (local != bitepSuccess) return local;
      if (!h->low_latency_window)
        BITEP_FAIL(bitepNotSupported,
                   "%s: the stream is capturing a CUDA graph, but only the combines of handles from "
                   "bitepDispatchLowLatency's device path can be captured (this handle's combine uses temporary "
                   "buffers and host-side counts; bitepGroupLowLatencyCapturable says whether a group's low-latency "
                   "calls can be)",
                   what);
    }
    if (g->agree_always) {
      // The dispatch's number, bit 1 an expert-major y and bit 0 its weighted flag: a rank weights the expert rows it
      // sums for the others by its own flag, so two such ranks that differ would return sums of both kinds (rank-major
      // rows come summed: their flag is not used).
      const bool expert_major = layout == bitepLayoutExpertMajor;
      // (h is read only where this rank's checks passed: it may be NULL, or another group's, otherwise.)
      const int32_t mine = local != bitepSuccess ? 0
                                                 : dispatch_bits(h, kind) | (expert_major ? 2 : 0) |
                                                       (expert_major && weighted != 0 ? 1 : 0);
      std::vector<int32_t> all;
      shared = true;
      BITEP_CHECK(agree_status(g, local, what, mine, &all));
      BITEP_CHECK(same_dispatch(g, all, what));
      // Decided from the gathered bits alone, so that every rank fails, a rank-major one too (it would go on into the
      // transfer): the first two expert-major ranks whose flags differ.
      int first = -1;
      for (int q = 0; q < g->nranks; ++q) {
        if ((all[q] & 2) == 0) continue;
        if (first < 0) first = q;
        if ((all[q] & 1) != (all[first] & 1))
          BITEP_FAIL(bitepInvalidArgument,
                     "rank %d gives %s weighted = %d, rank %d weighted = %d, both with expert-major y (this is rank "
                     "%d): every rank must pass the same weighted (each weights the expert rows it sums for the "
                     "others by its own)",
                     first, what, all[first] & 1, q, all[q] & 1, g->rank);
      }
      shared = false;
    } else if (local != bitepSuccess) {
      return local;  // cuda: no agreement, the peers go on into the transfer
    }
    // Joins any side-stream work first: the fence then covers it (an error path can leave a fork open).
    FenceOnExit fence(h, stream, [&ex] { (void)ex.join(); });
    Trace trace("combine", g->rank, stream, ex.cuda());
    if (h->low_latency_window) return combine_low_latency(ex, g, h, y, weighted, out, &trace);
    // The peer window takes the combines (decided with the dispatch, alike on every rank; small ones go by
    // NCCL's all-to-all with BITEP_LSA_SMALL=0).
    PeerWindow* win = g->nranks > 1 ? g->transport->window() : nullptr;
    if (win != nullptr && h->window_combine) {
      BITEP_CHECK(win->check());
      return combine_window(ex, g, h, y, layout, weighted, out, win, &trace);
    }
    const void* partial = y;
    if (layout == bitepLayoutExpertMajor) {
      void* p = nullptr;
      const size_t row = static_cast<size_t>(dtype_size(g->config.dtype)) * g->config.hidden;
      BITEP_CHECK(ex.temp(row * h->num_recv_rows, &p));
      // Partial rows [i0, i1) (rank-major, so one source rank's rows are one range).
      auto reduce = [&](int64_t i0, int64_t i1, int blocks_per_sm) -> bitepResult_t {
        if (i1 <= i0) return bitepSuccess;
        return ex.reduce(
            reduce_params(g, h, y, weighted, i0, i1 - i0, static_cast<char*>(p) + i0 * row, blocks_per_sm));
      };
      const int64_t R = h->num_recv_rows, own0 = h->recv_offsets[g->rank], own1 = own0 + h->recv_counts[g->rank];
      if (own1 > own0 && R - (own1 - own0) > 0 && static_cast<uint64_t>(R - (own1 - own0)) * row >= split_min_bytes()) {
        // This rank's own rows never travel: their partials are summed beside the others' all-to-all.
        BITEP_CHECK(ex.fork());
        BITEP_CHECK(reduce(own0, own1, kSideBlocksPerSm));
        ex.launch_on_caller();
        BITEP_CHECK(reduce(0, own0, 0));
        BITEP_CHECK(reduce(own1, R, 0));
      } else {
        BITEP_CHECK(reduce(0, R, 0));
      }
      partial = p;
    }
    trace.mark("reduce");
    return return_rows(ex, g, h, partial, out, &trace);
  });
  return shared ? r : failed_alone(g, r, api);
}

}  // namespace
}  // namespace bitep::ep

extern "C" {

bitepResult_t bitepCombine(bitepGroup_t group,
                           bitepHandle_t handle,
                           const bitepCombineArgs_t* args,
                           bitepStream_t stream) {
  return bitep::guard("bitepCombine", [&]() -> bitepResult_t {
    bitepResult_t local = bitepSuccess;
    bitep::ep::GroupCall call;
    BITEP_CHECK(bitep::ep::check_call_agreed(group, handle, /*backward=*/false, &call, "bitepCombine", &local));
    if (local == bitepSuccess)
      local = bitep::check_struct(args, args ? args->size : 0, sizeof(bitepCombineArgs_t), args ? args->magic : 0,
                                  BITEP_COMBINE_ARGS_MAGIC, "args", "BITEP_COMBINE_ARGS_INIT");
    if (local == bitepSuccess)
      local = bitep::ep::check_combine_args(group, handle, args->y, args->layout, args->weighted, args->out, "args->y",
                                            "args->layout", "args->out");
    const bool ok = local == bitepSuccess;
    return bitep::ep::combine(group, handle, ok ? args->y : nullptr, ok ? args->layout : bitepLayoutRankMajor,
                              ok ? args->weighted : 0, ok ? args->out : nullptr, stream, local, "this combine",
                              bitep::ep::CallKind::kCombine);
  });
}

bitepResult_t bitepDispatchBackward(bitepGroup_t group,
                                    bitepHandle_t handle,
                                    const void* grad_y,
                                    bitepLayout_t layout,
                                    void* grad_x,
                                    bitepStream_t stream) {
  return bitep::guard("bitepDispatchBackward", [&]() -> bitepResult_t {
    bitepResult_t local = bitepSuccess;
    bitep::ep::GroupCall call;
    BITEP_CHECK(bitep::ep::check_call_agreed(group, handle, /*backward=*/true, &call, "bitepDispatchBackward", &local));
    if (local == bitepSuccess)
      local = bitep::ep::check_combine_args(group, handle, grad_y, layout, 0, grad_x, "grad_y", "layout", "grad_x");
    return bitep::ep::combine(group, handle, grad_y, layout, 0, grad_x, stream, local, "this dispatch backward",
                              bitep::ep::CallKind::kDispatchBackward);
  });
}

}  // extern "C"
