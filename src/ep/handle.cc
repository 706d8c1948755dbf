// SPDX-License-Identifier: Apache-2.0
// Handle lifetime and layout queries.
#include "src/ep/handle.h"

#include <mutex>
#include <unordered_set>

#include "src/args.h"
#include "src/capture.h"
#include "src/check.h"
#include "src/env.h"
#include "src/ep/exec.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace bitep::ep {
namespace {

// The handles given to callers and not destroyed (release_handle).
std::mutex g_live_mu;
std::unordered_set<const bitepHandle*>& live_handles() {
  static auto* live = new std::unordered_set<const bitepHandle*>();  // never destroyed: usable at exit
  return *live;
}
bool is_live(const bitepHandle* h) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  return live_handles().count(h) != 0;
}
// Takes h out of the live handles: false when it was not one.
bool forget(const bitepHandle* h) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  return live_handles().erase(h) != 0;
}

// cuda: waits for everything queued on `device` (the calling thread's capture mode relaxed: no graph is
// being built from this wait).
bitepResult_t wait_for_device(int device) {
#ifdef BITEP_HAVE_CUDA
  int prev = -1;
  BITEP_CUDA_CHECK(cudaGetDevice(&prev));
  if (prev != device) BITEP_CUDA_CHECK(cudaSetDevice(device));
  cudaError_t err = cudaSuccess;
  {
    RelaxedCaptureMode relaxed;
    err = cudaDeviceSynchronize();
  }
  if (prev != device) (void)cudaSetDevice(prev);
  if (err != cudaSuccess)
    return cuda_error(err, "cudaDeviceSynchronize (bitepHandleDestroy of a handle a CUDA graph captured)", __FILE__,
                      __LINE__);
#else
  (void)device;
#endif
  return bitepSuccess;
}

}  // namespace

bitepHandle_t release_handle(HandlePtr* handle) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  live_handles().insert(handle->get());
  return handle->release();
}

bitepResult_t check_handle(bitepHandle_t h, bitepGroup_t group) {
  BITEP_ARG_CHECK(h != nullptr, "handle is NULL");
  BITEP_ARG_CHECK(is_live(h) && h->magic == kHandleMagic,
                  "handle (%p) is not a live bitep handle (destroyed, or not from "
                  "bitepDispatch)",
                  static_cast<void*>(h));
  {
    std::lock_guard<std::mutex> lock(h->life->mu);
    if (!h->life->alive)
      BITEP_FAIL(bitepInvalidUsage,
                 "the handle's group was destroyed: the handle's buffers are gone; only "
                 "bitepHandleDestroy may still be called on it");
  }
  if (group != nullptr && group != h->group)
    BITEP_FAIL(bitepInvalidArgument, "handle belongs to another group (%p) than the one given (%p)",
               static_cast<const void*>(h->group), static_cast<void*>(group));
  return bitepSuccess;
}

bitepResult_t destroy_handle(bitepHandle_t h, bool returned) {
  if (h == nullptr) return bitepSuccess;
  bitepResult_t result = bitepSuccess;
  {
    std::lock_guard<std::mutex> lock(h->life->mu);
    if (h->life->alive && h->captured && !returned) {
      // A call being captured failed after queuing work on the blocks: a graph made from that capture would
      // still use them, so they stay with the pool as in use (freed with the group). No wait: the stream
      // captures, and a device synchronisation now would fail.
    } else if (h->life->alive && h->captured) {
      // Replays of a graph holding this handle's calls may still run: the blocks wait for the whole device.
      // When that wait fails they stay with the pool as in use (freed with the group), never handed out again.
      result = wait_for_device(h->group->device);
      if (result == bitepSuccess)
        for (Block& b : h->blocks) h->life->pool->release(&b, std::shared_ptr<void>(), 0);  // nothing to wait for
    } else if (h->life->alive) {
      for (Block& b : h->blocks) h->life->pool->release(&b, h->fence, h->fence_key);
    } else if (h->life->pool != nullptr && !h->captured) {
      // The group is gone but left its pool to its handles (let_go_of_pool): the blocks go back after their last use,
      // and the last handle's settles the pool. A captured handle's stay in use: graph replays are not tracked.
      for (Block& b : h->blocks) h->life->pool->release(&b, h->fence, h->fence_key);
      settle_pool(h->life.get());
    }
  }
  h->blocks.clear();
  h->magic = 0;
  delete h;
  return result;
}

// BITEP_EXPERT_COPY=gather: the expert-major copies always in gather order (a tuning knob; by default
// the cuda backend copies rows that allow it in source order by bulk copies, kernels/expert_major.cu).
namespace {
bool expert_copy_bulk() {
  static const bool bulk = !env_is("BITEP_EXPERT_COPY", "gather");
  return bulk;
}
}  // namespace

kernels::ExpertMajorParams expert_major_params(const bitepHandle* h, const bitepGroup* g) {
  kernels::ExpertMajorParams ep;
  ep.num_recv_rows = h->num_recv_rows;
  ep.num_local_experts = g->num_local_experts;
  ep.max_row_experts = g->max_row_experts;
  ep.hidden = g->config.hidden;
  ep.dtype = to_kernel_dtype(g->config.dtype);
  ep.recv_map = h->recv_map;
  ep.expert_offsets = h->expert_offsets;
  ep.expert_counts = h->expert_counts;
  ep.recv_expert_rows = h->recv_expert_rows;
  ep.num_expert_rows = h->num_expert_rows;
  if (h->expert_counts_host.size() == static_cast<size_t>(g->num_local_experts)) {
    int64_t used = 0;
    for (const auto c : h->expert_counts_host) used += c;
    ep.num_pad_rows = h->num_expert_rows - used;
  }
  ep.bulk = expert_copy_bulk();
  return ep;
}

int permute_row_pieces() {
  static const int n = env_int("BITEP_PERMUTE_PIECES", 1, 1024, 0);
  return n;
}

kernels::PermuteParams permute_params(const bitepHandle* h, const bitepGroup* g) {
  const bitepGroupConfig_t& c = g->config;
  kernels::PermuteParams pp;
  pp.num_tokens = h->num_tokens;
  pp.num_experts = c.num_experts;
  pp.topk = c.topk;
  pp.num_ranks = g->nranks;
  pp.self_rank = g->rank;
  pp.hidden = c.hidden;
  pp.dtype = to_kernel_dtype(c.dtype);
  pp.token_slot = h->token_slot;
  pp.self_recv_offset = h->recv_offsets[g->rank];
  pp.max_row_pieces = permute_row_pieces();
  return pp;
}

void add_route_buffers(const bitepHandle* h,
                       int self,
                       Route route,
                       const void* send,
                       void* recv,
                       size_t row,
                       std::vector<std::vector<PeerBuffers>>* per_peer) {
  const bool out = route == Route::kOut;
  const std::vector<int64_t>& so = out ? h->send_offsets : h->recv_offsets;
  const std::vector<int64_t>& sc = out ? h->send_counts : h->recv_counts;
  const std::vector<int64_t>& ro = out ? h->recv_offsets : h->send_offsets;
  const std::vector<int64_t>& rc = out ? h->recv_counts : h->send_counts;
  for (size_t p = 0; p < per_peer->size(); ++p) {
    if (static_cast<int>(p) == self) continue;
    (*per_peer)[p].push_back({static_cast<const char*>(send) + so[p] * row, sc[p] * row,
                              static_cast<char*>(recv) + ro[p] * row, rc[p] * row});
  }
}

bitepResult_t make_fence([[maybe_unused]] bitepHandle_t h, bool cuda) {
  if (!cuda) return bitepSuccess;
#ifdef BITEP_HAVE_CUDA
  cudaEvent_t ev = nullptr;
  BITEP_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  h->fence.reset(ev, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
  return bitepSuccess;
#else
  BITEP_FAIL(bitepNotSupported, "this bitep was built without CUDA");
#endif
}

void record_fence(bitepHandle_t h, bitepStream_t stream) {
#ifdef BITEP_HAVE_CUDA
  if (h == nullptr) return;
  if (cuda_stream_capturing(stream)) {
    h->captured = true;
    return;
  }
  if (!h->fence) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const cudaEvent_t fence = static_cast<cudaEvent_t>(h->fence.get());
  const uint64_t key = cuda_stream_key(stream);
  // A call on another stream than the last one's: the new record waits for the old (the earlier call may still
  // read the blocks, unordered with this stream), so the one fence covers both calls' work. The calls themselves
  // stay unordered: the wait is queued after this call's work.
  const bool waited = h->fence_key == 0 || h->fence_key == key || cudaStreamWaitEvent(s, fence, 0) == cudaSuccess;
  if (!waited || cudaEventRecord(fence, s) != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaStreamSynchronize(s);
    (void)cudaGetLastError();
    h->fence_key = 0;
    return;
  }
  h->fence_key = key;
#else
  (void)h, (void)stream;
#endif
}

}  // namespace bitep::ep

extern "C" {

bitepResult_t bitepHandleGetLayout(bitepHandle_t handle, bitepDispatchLayout_t* layout) {
  return bitep::guard("bitepHandleGetLayout", [&]() -> bitepResult_t {
    BITEP_CHECK(bitep::ep::check_handle(handle, nullptr));
    BITEP_ARG_CHECK(layout != nullptr, "layout is NULL");
    *layout = handle->layout;
    return bitepSuccess;
  });
}

bitepResult_t bitepHandleGetExpertSources(bitepGroup_t group,
                                          bitepHandle_t handle,
                                          bitepStream_t stream,
                                          const int32_t** sources) {
  return bitep::guard("bitepHandleGetExpertSources", [&]() -> bitepResult_t {
    if (sources != nullptr) *sources = nullptr;
    BITEP_CHECK(bitep::ep::check_handle(handle, nullptr));  // first: a destroyed group's pointer is not looked at
    bitep::ep::GroupCall call;
    BITEP_CHECK(call.enter(group, "bitepHandleGetExpertSources", bitep::ep::GroupCall::kLocal));
    BITEP_CHECK(bitep::ep::check_group(group));
    BITEP_CHECK(bitep::ep::check_handle(handle, group));
    BITEP_ARG_CHECK(sources != nullptr, "sources is NULL");
    if (handle->low_latency)
      BITEP_FAIL(bitepInvalidUsage,
                 "the handle is from bitepDispatchLowLatency, whose layout has no received rows (recv_expert_rows "
                 "is NULL): there is nothing to gather from; its expert-major rows are in expert_x");
    if (handle->expert_sources == nullptr) {
      bitep::ep::Exec ex(group, stream);
      BITEP_CHECK(ex.begin());
      if (ex.capturing())
        BITEP_FAIL(bitepNotSupported,
                   "bitepHandleGetExpertSources: the stream is capturing a CUDA graph; call it before the capture "
                   "(once computed, the index stays in the handle)");
      void* p = nullptr;
      BITEP_CHECK(ex.keep(sizeof(int32_t) * static_cast<size_t>(handle->num_expert_rows), &handle->blocks, &p));
      bitep::ep::FenceOnExit fence(handle, stream);
      bitep::kernels::ExpertSourcesParams sp;
      sp.num_recv_rows = handle->num_recv_rows;
      sp.max_row_experts = group->max_row_experts;
      sp.recv_expert_rows = handle->recv_expert_rows;
      sp.num_expert_rows = handle->num_expert_rows;
      sp.sources = static_cast<int32_t*>(p);
      BITEP_CHECK(ex.expert_sources(sp));
      handle->expert_sources = sp.sources;
    }
    *sources = handle->expert_sources;
    return bitepSuccess;
  });
}

bitepResult_t bitepHandleDestroy(bitepHandle_t handle) {
  return bitep::guard("bitepHandleDestroy", [&]() -> bitepResult_t {
    if (handle == nullptr) return bitepSuccess;
    BITEP_ARG_CHECK(bitep::ep::forget(handle), "handle (%p) is not a live bitep handle (destroyed twice?)",
                    static_cast<void*>(handle));
    return bitep::ep::destroy_handle(handle, /*returned=*/true);
  });
}

}  // extern "C"
