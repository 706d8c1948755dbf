// SPDX-License-Identifier: Apache-2.0
// bitepDispatchLowLatency and the combines of its handles (src/ep/low_latency.h has the window's layout).
// Fast path (cuda, the group's low-latency window): send kernel (rows, map slices, weights, each token's rank
// among this rank's tokens of each of its experts into fixed slots of the owners' windows, and the per-expert
// counts into their headers) -> barrier -> receive kernel (offsets, positions and the expert-major copies, all
// on the device); the combine: reduce (partials into the sources' combine slots) -> barrier -> final
// sum. No host wait and no allocation beyond the pool's. At W = 1 the window is the rank's own memory
// (src/ep/local_window.h) and its barriers are no-ops. Elsewhere bitepDispatch does the work and the handle only
// looks like a low-latency one.
#include "src/ep/low_latency.h"

#include <vector>

#include "src/args.h"
#include "src/check.h"
#include "src/env.h"
#include "src/ep/collective.h"
#include "src/ep/combine.h"
#include "src/ep/dispatch_args.h"
#include "src/ep/exec.h"
#include "src/ep/handle.h"
#include "src/trace.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/ep.h"
#endif

namespace bitep::ep {
namespace {

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

#ifdef BITEP_HAVE_CUDA
// Tuning knobs (bench/NOTES.md, low latency): BITEP_LL_SEND_PIECES, the most warps sharing a token's row in
// the send kernel (default 32); BITEP_LL_COPY_WARPS, the receive copies' warps an SM (default 32).
int send_pieces() {
  static const int n = env_int("BITEP_LL_SEND_PIECES", 1, 1024, 32);
  return n;
}
int copy_warps_per_sm() {
  static const int n = env_int("BITEP_LL_COPY_WARPS", 1, 1024, 32);
  return n;
}

// Byte offsets of the device tables in group->ll_tables.
struct Tables {
  size_t dispatch_regions;  // [2][W] char*: every rank's dispatch region of each parity, as mapped here
  size_t combine_outs;      // [2][W] void*: this rank's slots in every rank's combine region of each parity
  size_t row_offsets;       // [W + 1] int64: s * C
  size_t bytes;
};

Tables tables(int W) {
  Tables t;
  t.dispatch_regions = 0;
  t.combine_outs = sizeof(void*) * 2 * W;
  t.row_offsets = sizeof(void*) * 4 * W;
  t.bytes = t.row_offsets + sizeof(int64_t) * (W + 1);
  return t;
}

template <typename T>
T at(const bitepGroup* g, size_t offset) {
  return reinterpret_cast<T>(static_cast<char*>(g->ll_tables) + offset);
}
#endif

// The layout a low-latency handle shows: expert-major only, no host copies.
void low_latency_layout_view(bitepHandle* h, const bitepGroup* g) {
  bitepDispatchLayout_t& lo = h->layout;
  lo = bitepDispatchLayout_t{};
  lo.num_ranks = g->nranks;
  lo.num_local_experts = g->num_local_experts;
  lo.max_row_experts = g->max_row_experts;
  lo.num_expert_rows = h->num_expert_rows;
  lo.expert_x = h->expert_x;
  lo.expert_counts = h->expert_counts;
  lo.expert_offsets = h->expert_offsets;
}

bitepResult_t check_low_latency_args(const bitepGroup* g, const bitepDispatchArgs_t* a, bitepHandle_t* out) {
  const int C = g->config.low_latency_max_tokens;
  if (C < 1)
    BITEP_FAIL(bitepInvalidUsage,
               "bitepDispatchLowLatency on a group created with config.low_latency_max_tokens = 0: set it to the "
               "most tokens a rank passes (every rank the same) when creating the group");
  BITEP_CHECK(check_dispatch_args(g, a, out));
  BITEP_ARG_CHECK(a->num_tokens <= C,
                  "args->num_tokens is %lld but the group's config.low_latency_max_tokens is %d: a low-latency "
                  "dispatch takes at most that many tokens a rank",
                  static_cast<long long>(a->num_tokens), C);
  BITEP_ARG_CHECK(a->recv_x == nullptr && a->expert_x == nullptr,
                  "args->recv_x / args->expert_x are set: a low-latency dispatch keeps its rows in the handle (pass "
                  "NULL, capacities 0)");
  BITEP_ARG_CHECK(a->rank_major_only == 0,
                  "args->rank_major_only is 1: a low-latency dispatch builds the expert-major view alone (pass 0, or "
                  "call bitepDispatch)");
  return bitepSuccess;
}

#ifdef BITEP_HAVE_CUDA
// The fast path. The argument checks passed on this rank.
bitepResult_t dispatch_window(bitepGroup* g, const bitepDispatchArgs_t* a, bitepStream_t stream, bitepHandle_t* out) {
  PeerWindow* win = g->transport->low_latency_window();
  BITEP_CHECK(win->check());
  Exec ex(g, stream);
  BITEP_CHECK(ex.begin());
  Trace trace("dispatch (low latency)", g->rank, stream, true);
  const int W = g->nranks, self = g->rank, L = g->num_local_experts, KL = g->max_row_experts;
  const int C = g->config.low_latency_max_tokens;
  const size_t row = static_cast<size_t>(dtype_size(g->config.dtype)) * g->config.hidden;
  const LowLatencyLayout lay = low_latency_layout(W, C, L, KL, row);
  const Tables tab = tables(W);
  // Captured into a CUDA graph: no fence (the replays are the graph's) and no wait on the window's last user
  // (the caller orders the graph's launches with the group's other calls).
  const bool captured = ex.capturing();
  HandlePtr h(new bitepHandle);
  h->life = g->life;
  h->group = g;
  h->captured = captured;
  if (!captured) BITEP_CHECK(make_fence(h.get(), true));
  const int64_t T = a->num_tokens;
  h->num_tokens = T;
  h->low_latency = true;
  h->low_latency_window = true;
  // Whether the peers gave weights is not known here (no exchange): a rank without tokens allows weighted
  // combines, and rows from a rank without weights carry weight 0 (the send kernel's zeros).
  h->has_weights = a->probs != nullptr || a->topk_weights != nullptr || T == 0;
  const int64_t slots = static_cast<int64_t>(W) * C;
  const int64_t N = slots * KL + static_cast<int64_t>(L) * (g->config.expert_alignment - 1);
  h->num_expert_rows = N;
  void* p = nullptr;
  BITEP_CHECK(ex.keep(sizeof(int32_t) * T * W, &h->blocks, &p));
  h->token_slot = static_cast<int32_t*>(p);
  BITEP_CHECK(ex.keep(sizeof(int32_t) * slots * KL, &h->blocks, &p));
  h->recv_expert_rows = static_cast<int32_t*>(p);
  BITEP_CHECK(ex.keep(sizeof(float) * slots * KL, &h->blocks, &p));
  h->recv_weights = static_cast<float*>(p);
  BITEP_CHECK(ex.keep(row * N, &h->blocks, &p));
  h->expert_x = p;
  BITEP_CHECK(ex.keep(sizeof(int32_t) * (2 * L + 1), &h->blocks, &p));
  h->expert_counts = static_cast<int32_t*>(p);
  h->expert_offsets = h->expert_counts + L;

  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  kernels::LowLatencySendParams sp;
  sp.num_tokens = T;
  sp.num_experts = g->config.num_experts;
  sp.topk = g->config.topk;
  sp.num_ranks = W;
  sp.self_rank = self;
  sp.hidden = g->config.hidden;
  sp.dtype = to_kernel_dtype(g->config.dtype);
  sp.routing.format = to_routing_format(a->map_format);
  sp.routing.map = a->routing_map;
  if (a->probs != nullptr) {
    sp.routing.weight_format = kernels::WeightFormat::kDense;
    sp.routing.weights = a->probs;
  } else if (a->topk_weights != nullptr) {
    sp.routing.weight_format = kernels::WeightFormat::kCompact;
    sp.routing.weights = a->topk_weights;
  }
  sp.x = a->x;
  sp.capacity = C;
  // The slots' parity from the window's barrier count, read by the kernels (the same in a graph's replays).
  sp.regions = at<char* const*>(g, tab.dispatch_regions);
  sp.parity.count = win->epoch_word();
  sp.block = lay.block;
  sp.token_slot = h->token_slot;
  sp.max_pieces = send_pieces();
  kernels::LowLatencyReceiveParams rp;
  rp.num_ranks = W;
  rp.num_local_experts = L;
  rp.max_row_experts = KL;
  rp.capacity = C;
  rp.hidden = g->config.hidden;
  rp.dtype = sp.dtype;
  rp.alignment = g->config.expert_alignment;
  rp.region = win->data(self) + lay.dispatch(0);
  rp.region_parity_bytes = static_cast<int64_t>(lay.dispatch(1) - lay.dispatch(0));
  rp.parity.count = win->epoch_word();
  rp.parity.add = 1;  // after the barrier
  rp.block = lay.block;
  rp.expert_x = h->expert_x;
  rp.expert_capacity = N;
  rp.expert_counts = h->expert_counts;
  rp.expert_offsets = h->expert_offsets;
  rp.recv_expert_rows = h->recv_expert_rows;
  rp.recv_weights = h->recv_weights;
  rp.copy_warps_per_sm = copy_warps_per_sm();

  if (!captured) BITEP_CHECK(acquire_window(g, win, stream));
  BITEP_CUDA_CHECK(kernels::launch_ep_low_latency_send(sp, s));
  trace.mark("send");
  BITEP_CHECK(win->barrier(stream, g->config.timeout_s));
  trace.mark("barrier");
  BITEP_CUDA_CHECK(kernels::launch_ep_low_latency_receive(rp, s));
  trace.mark("receive");
  if (!captured) BITEP_CHECK(win->release(stream));
  record_fence(h.get(), stream);
  low_latency_layout_view(h.get(), g);
  h->seq = g->dispatches++;
  *out = release_handle(&h);
  return bitepSuccess;
}
#endif

}  // namespace

bool low_latency_on_device(const bitepGroup* g) {
#ifdef BITEP_HAVE_CUDA
  const PeerWindow* win = g->transport->low_latency_window();
  return win != nullptr && g->ll_tables != nullptr &&
         kernels::low_latency_receive_fits(g->nranks, g->num_local_experts, g->config.low_latency_max_tokens);
#else
  (void)g;
  return false;
#endif
}

LowLatencyLayout low_latency_layout(int W, int C, int L, int KL, size_t row_bytes) {
  LowLatencyLayout lay;
  kernels::LowLatencyBlock& b = lay.block;
  const size_t MB = static_cast<size_t>(kernels::local_map_bytes(L));
  b.header = 0;
  b.counts = static_cast<int64_t>(sizeof(int64_t) * W);
  b.first = static_cast<int64_t>(round_up(b.counts + sizeof(int32_t) * W * L, 256));
  b.map = static_cast<int64_t>(round_up(row_bytes * C, 16));
  b.weights = b.map + static_cast<int64_t>(round_up(MB * C, 16));
  b.ranks = b.weights + static_cast<int64_t>(round_up(sizeof(float) * KL * C, 16));
  b.stride = static_cast<int64_t>(round_up(b.ranks + sizeof(int32_t) * KL * C, 256));
  lay.dispatch_bytes = round_up(b.first + static_cast<size_t>(b.stride) * W, 256);
  lay.combine_bytes = round_up(row_bytes * W * C, 256);
  return lay;
}

bitepResult_t make_low_latency_tables(bitepGroup* g, Transport* t) {
  PeerWindow* win = t != nullptr ? t->low_latency_window() : nullptr;
  if (win == nullptr) return bitepSuccess;
#ifdef BITEP_HAVE_CUDA
  const int W = g->nranks, self = g->rank, C = g->config.low_latency_max_tokens;
  // No tables (bitepDispatchLowLatency runs bitepDispatch) where the receive kernel cannot take the group's
  // shape on this device: it runs after the send and the barrier, too late to go another way. A failed query
  // (the kernel not loadable) counts as no, as load_ep_kernels' failure is not fatal at group creation.
  bool receive = false;
  if (kernels::low_latency_receive_supported(W, g->num_local_experts, C, &receive) != cudaSuccess) {
    (void)cudaGetLastError();
    receive = false;
  }
  if (!receive) return bitepSuccess;
  const size_t row = static_cast<size_t>(dtype_size(g->config.dtype)) * g->config.hidden;
  const LowLatencyLayout lay = low_latency_layout(W, C, g->num_local_experts, g->max_row_experts, row);
  const Tables tab = tables(W);
  std::vector<unsigned char> host(tab.bytes);
  char** regions = reinterpret_cast<char**>(host.data() + tab.dispatch_regions);
  void** outs = reinterpret_cast<void**>(host.data() + tab.combine_outs);
  int64_t* offsets = reinterpret_cast<int64_t*>(host.data() + tab.row_offsets);
  uintptr_t bits = 16;
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < W; ++r) {
      regions[p * W + r] = win->data(r) + lay.dispatch(p);
      outs[p * W + r] = win->data(r) + lay.combine(p) + row * C * self;
      bits |= reinterpret_cast<uintptr_t>(outs[p * W + r]);
    }
  for (int r = 0; r <= W; ++r) offsets[r] = static_cast<int64_t>(r) * C;
  g->ll_outs_align = static_cast<int>(bits & (~bits + 1));
  BITEP_CUDA_CHECK(cudaMalloc(&g->ll_tables, tab.bytes));
  BITEP_CUDA_CHECK(cudaMemcpy(g->ll_tables, host.data(), tab.bytes, cudaMemcpyHostToDevice));
  // A copy from pageable memory may return before it lands, and the kernels that read the tables run on the
  // caller's streams, which need not wait for the legacy stream (as FlagWindow::reserve's table).
  BITEP_CUDA_CHECK(cudaDeviceSynchronize());
  return bitepSuccess;
#else
  (void)g;
  return bitepSuccess;
#endif
}

// The combine of a handle from the low-latency window: reduce (each slot's partial row into its source's
// combine slot, empty slots skipped) -> barrier -> final sum of this rank's tokens from its own combine region.
bitepResult_t combine_low_latency(
    Exec& ex, bitepGroup* g, bitepHandle* h, const void* y, int weighted, void* out, Trace* trace) {
#ifdef BITEP_HAVE_CUDA
  PeerWindow* win = g->transport->low_latency_window();
  if (win == nullptr) BITEP_FAIL(bitepInternalError, "a low-latency handle on a group without its window");
  BITEP_CHECK(win->check());
  const int W = g->nranks, self = g->rank, L = g->num_local_experts, KL = g->max_row_experts;
  const int C = g->config.low_latency_max_tokens;
  const size_t row = static_cast<size_t>(dtype_size(g->config.dtype)) * g->config.hidden;
  const LowLatencyLayout lay = low_latency_layout(W, C, L, KL, row);
  const Tables tab = tables(W);
  kernels::ReduceParams rp;
  rp.num_recv_rows = static_cast<int64_t>(W) * C;
  rp.max_row_experts = KL;
  rp.hidden = g->config.hidden;
  rp.dtype = to_kernel_dtype(g->config.dtype);
  rp.y = y;
  rp.recv_expert_rows = h->recv_expert_rows;
  rp.recv_weights = weighted ? h->recv_weights : nullptr;
  rp.num_sources = W;
  rp.outs = at<void* const*>(g, tab.combine_outs);  // [2][W]: the kernel takes its parity's row
  rp.outs_parity.count = win->epoch_word();
  rp.row_offsets = at<const int64_t*>(g, tab.row_offsets);
  rp.self_source = self;
  rp.outs_align = g->ll_outs_align;
  rp.skip_empty_rows = true;
  rp.max_row_pieces = combine_row_pieces();
  const char* region = win->data(self) + lay.combine(0);
  kernels::FinalSumParams fp;
  fp.num_tokens = h->num_tokens;
  fp.num_ranks = W;
  fp.self_rank = self;
  fp.hidden = g->config.hidden;
  fp.dtype = rp.dtype;
  fp.token_slot = h->token_slot;
  fp.send_offsets = rp.row_offsets;
  fp.ret = region;
  fp.self_ret = region;
  fp.self_ret_offset = static_cast<int64_t>(self) * C;
  fp.out = out;
  fp.ret_parity.count = win->epoch_word();
  fp.ret_parity.add = 1;  // after the barrier
  fp.ret_parity_bytes = static_cast<int64_t>(lay.combine(1) - lay.combine(0));
  fp.max_row_pieces = rp.max_row_pieces;
  // Captured into a CUDA graph: the caller orders the graph's launches with the group's other calls.
  const bool captured = ex.capturing();
  if (!captured) BITEP_CHECK(acquire_window(g, win, ex.stream()));
  BITEP_CHECK(ex.reduce(rp));
  trace->mark("reduce");
  BITEP_CHECK(win->barrier(ex.stream(), g->config.timeout_s));
  trace->mark("barrier");
  BITEP_CHECK(ex.final_sum(fp));
  trace->mark("final-sum");
  return captured ? bitepSuccess : win->release(ex.stream());
#else
  (void)ex, (void)g, (void)h, (void)y, (void)weighted, (void)out, (void)trace;
  BITEP_FAIL(bitepInternalError, "a low-latency window handle in a build without CUDA");
#endif
}

}  // namespace bitep::ep

extern "C" bitepResult_t bitepDispatchLowLatency(bitepGroup_t group,
                                                 const bitepDispatchArgs_t* args,
                                                 bitepStream_t stream,
                                                 bitepHandle_t* handle) {
  return bitep::guard("bitepDispatchLowLatency", [&]() -> bitepResult_t {
    if (handle != nullptr) *handle = nullptr;  // on every failure, the group's too
    bitep::ep::GroupCall call;
    BITEP_CHECK(call.enter(group, "bitepDispatchLowLatency"));
    BITEP_CHECK(bitep::ep::check_group(group));
    const bitepResult_t local = bitep::ep::check_low_latency_args(group, args, handle);
#ifdef BITEP_HAVE_CUDA
    if (bitep::ep::low_latency_on_device(group)) {
      // No exchange to tell the peers: a rank that fails here leaves them in the barrier until the timeout, and its
      // group unusable (failed_alone).
      if (local != bitepSuccess) return bitep::ep::failed_alone(group, local, "bitepDispatchLowLatency");
      const bitepResult_t r = bitep::catch_all([&] { return bitep::ep::dispatch_window(group, args, stream, handle); });
      return bitep::ep::failed_alone(group, r, "bitepDispatchLowLatency");
    }
#endif
    // The regular dispatch below waits on the host for its count exchange (its agreement on a local failure too):
    // no graph can hold it. This rank returns at once (its peers, if they call it, wait in the count exchange until
    // the group's timeout), and its group is unusable (failed_alone).
    if (group->config.backend == bitepBackendCuda && bitep::ep::cuda_stream_capturing(stream)) {
      if (local != bitepSuccess) return bitep::ep::failed_alone(group, local, "bitepDispatchLowLatency");
      const bitepResult_t r = bitep::set_error(
          bitepNotSupported, __FILE__, __LINE__,
          "bitepDispatchLowLatency: the stream is capturing a CUDA graph, but this group's low-latency dispatches "
          "run bitepDispatch, whose count exchange waits on the host (no low-latency window: the ranks are not in "
          "one NVLink domain, BITEP_LSA=0, or the receive kernel cannot take this shape; "
          "bitepGroupLowLatencyCapturable says so before capturing)");
      return bitep::ep::failed_alone(group, r, "bitepDispatchLowLatency");
    }
    // Elsewhere: the regular dispatch (its one host synchronisation; a local failure fails every rank),
    // shown as a low-latency handle.
    BITEP_CHECK(bitep::ep::dispatch_after_checks(group, args, stream, handle, local));
    (*handle)->low_latency = true;
    bitep::ep::low_latency_layout_view(*handle, group);
    return bitepSuccess;
  });
}

extern "C" bitepResult_t bitepGroupLowLatencyCapturable(bitepGroup_t group, int* capturable) {
  return bitep::guard("bitepGroupLowLatencyCapturable", [&]() -> bitepResult_t {
    if (capturable != nullptr) *capturable = 0;
    bitep::ep::GroupCall call;
    BITEP_CHECK(call.enter(group, "bitepGroupLowLatencyCapturable", bitep::ep::GroupCall::kLocal));
    BITEP_CHECK(bitep::ep::check_group(group));
    BITEP_ARG_CHECK(capturable != nullptr, "capturable is NULL");
    *capturable = bitep::ep::low_latency_on_device(group) ? 1 : 0;
    return bitepSuccess;
  });
}
