// SPDX-License-Identifier: Apache-2.0
// The baseline pipeline of ep_bench (see baseline.h): straightforward kernels, the way an indices-based
// stack does it, so that bitep's bitmap path is measured against a fair but unfused reference.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <cub/block/block_scan.cuh>

#include "bench/baseline/baseline.h"

namespace baseline {
namespace {

constexpr int kThreads = 256;

// Conversion: [T, k] indices -> BYTEMAP [T, E] (zeroed before).
__global__ void indices_to_bytemap(const int32_t* idx, int64_t T, int k, int E, uint8_t* map) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * k) return;
  const int e = idx[i];
  if (e >= 0 && e < E) map[(i / k) * E + e] = 1;
}

// Per expert (one block each): slot of every token in the expert's chunk, ascending token order, and
// the expert's count. Reads a column of the bytemap (stride E).
__global__ void __launch_bounds__(kThreads)
    expert_scan(const uint8_t* map, int64_t T, int E, int32_t* slot, int32_t* counts) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int e = blockIdx.x;
  int carry = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const int on = t < T ? map[t * E + e] : 0;
    int excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(on, excl, total);
    if (t < T) slot[t * E + e] = on ? carry + excl : -1;
    carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[e] = carry;
}

// First send row of each expert (one block): exclusive prefix of the counts.
__global__ void expert_offsets(const int32_t* counts, int E, int64_t* off) {
  if (threadIdx.x != 0) return;
  int64_t acc = 0;
  for (int e = 0; e < E; ++e) off[e] = acc, acc += counts[e];
  off[E] = acc;
}

// One warp per (token, j): copies x[t] to its row in expert indices[t][j]'s chunk (once per expert).
__global__ void permute_per_expert(const int32_t* idx,
                                   const __nv_bfloat16* x,
                                   int64_t T,
                                   int k,
                                   int E,
                                   int H,
                                   const int32_t* slot,
                                   const int64_t* off,
                                   __nv_bfloat16* send) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (w >= T * k) return;
  const int64_t t = w / k;
  const int e = idx[w];
  const int64_t row = off[e] + slot[t * E + e];
  const uint4* src = reinterpret_cast<const uint4*>(x + t * H);
  uint4* dst = reinterpret_cast<uint4*>(send + row * H);
  for (int i = lane; i < H / 8; i += 32) dst[i] = src[i];
}

// Block per (source, local expert) chunk: rows move between [source][expert] and [expert][source] order.
// to_expert_major: recv -> expert; else expert -> recv.
__global__ void sort_chunks(
    const int64_t* chunks, int H, __nv_bfloat16* recv, __nv_bfloat16* expert, bool to_expert_major) {
  const int64_t src0 = chunks[3 * blockIdx.x], dst0 = chunks[3 * blockIdx.x + 1], n = chunks[3 * blockIdx.x + 2];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  for (int64_t i = warp; i < n; i += blockDim.x / 32) {
    uint4* a = reinterpret_cast<uint4*>(recv + (src0 + i) * H);
    uint4* b = reinterpret_cast<uint4*>(expert + (dst0 + i) * H);
    for (int v = lane; v < H / 8; v += 32) {
      if (to_expert_major)
        b[v] = a[v];
      else
        a[v] = b[v];
    }
  }
}

// One warp per token: out[t] = sum over j of w[t][j] * ret[row of (t, expert j)], fp32, one rounding.
__global__ void weighted_sum(const int32_t* idx,
                             const float* w,
                             const __nv_bfloat16* ret,
                             int64_t T,
                             int k,
                             int E,
                             int H,
                             const int32_t* slot,
                             const int64_t* off,
                             __nv_bfloat16* out) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (t >= T) return;
  for (int h0 = lane * 8; h0 < H; h0 += 32 * 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < k; ++j) {
      const int e = idx[t * k + j];
      const int64_t row = off[e] + slot[t * E + e];
      const float wj = w[t * k + j];
      const uint4 v = *reinterpret_cast<const uint4*>(ret + row * H + h0);
      const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&v);
      for (int q = 0; q < 8; ++q) acc[q] = __fmaf_rn(wj, __bfloat162float(b[q]), acc[q]);
    }
    __nv_bfloat16 o[8];
    for (int q = 0; q < 8; ++q) o[q] = __float2bfloat16_rn(acc[q]);
    *reinterpret_cast<uint4*>(out + t * H + h0) = *reinterpret_cast<const uint4*>(o);
  }
}

unsigned blocks(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

}  // namespace

Pipeline::Pipeline(ncclComm_t comm, int nranks, int rank, int num_experts, int topk, int hidden, cudaStream_t stream)
    : comm_(comm),
      W_(nranks),
      rank_(rank),
      E_(num_experts),
      k_(topk),
      H_(hidden),
      L_(num_experts / nranks),
      stream_(stream) {
  if (cudaMallocHost(&pinned_, sizeof(int32_t) * 2 * E_) != cudaSuccess ||
      cudaMallocHost(&pinned_chunks_, sizeof(int64_t) * 3 * E_) != cudaSuccess)
    std::snprintf(error_, sizeof(error_), "cudaMallocHost failed");
}

Pipeline::~Pipeline() {
  for (void* p : {static_cast<void*>(bytemap_), static_cast<void*>(slot_), static_cast<void*>(counts_),
                  static_cast<void*>(expert_off_), static_cast<void*>(send_x_), static_cast<void*>(recv_x_),
                  static_cast<void*>(expert_x_), static_cast<void*>(chunks_)})
    if (p) cudaFree(p);
  if (pinned_) cudaFreeHost(pinned_);
  if (pinned_chunks_) cudaFreeHost(pinned_chunks_);
}

bool Pipeline::check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::snprintf(error_, sizeof(error_), "baseline: %s: %s", what, cudaGetErrorString(e));
  return false;
}
bool Pipeline::check(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return true;
  std::snprintf(error_, sizeof(error_), "baseline: %s: %s", what, ncclGetErrorString(r));
  return false;
}

bool Pipeline::ensure(void** p, size_t* cap, size_t bytes) {
  if (bytes <= *cap) return true;
  if (*p && !check(cudaStreamSynchronize(stream_), "sync before realloc")) return false;
  if (*p) cudaFree(*p);
  *p = nullptr;
  *cap = 0;
  if (!check(cudaMalloc(p, bytes), "cudaMalloc")) return false;
  *cap = bytes;
  return true;
}

bool Pipeline::exchange_rows(const __nv_bfloat16* send,
                             const std::vector<int64_t>& send_off,
                             const std::vector<int64_t>& send_cnt,
                             __nv_bfloat16* recv,
                             const std::vector<int64_t>& recv_off,
                             const std::vector<int64_t>& recv_cnt) {
  const size_t rb = sizeof(__nv_bfloat16) * H_;
  if (send_cnt[rank_] > 0 && !check(cudaMemcpyAsync(recv + recv_off[rank_] * H_, send + send_off[rank_] * H_,
                                                    send_cnt[rank_] * rb, cudaMemcpyDeviceToDevice, stream_),
                                    "self chunk copy"))
    return false;
  if (!check(ncclGroupStart(), "ncclGroupStart")) return false;
  for (int p = 0; p < W_; ++p) {
    if (p == rank_) continue;
    if (send_cnt[p] > 0) ncclSend(send + send_off[p] * H_, send_cnt[p] * rb, ncclUint8, p, comm_, stream_);
    if (recv_cnt[p] > 0) ncclRecv(recv + recv_off[p] * H_, recv_cnt[p] * rb, ncclUint8, p, comm_, stream_);
  }
  return check(ncclGroupEnd(), "ncclGroupEnd");
}

bool Pipeline::dispatch(const int32_t* indices, const __nv_bfloat16* x, int64_t T) {
  if (error_[0]) return false;
  if (H_ % 8 != 0) return check(cudaErrorInvalidValue, "H must be a multiple of 8");
  T_ = T;
  indices_ = indices;
  const size_t rb = sizeof(__nv_bfloat16) * H_;
  if (!ensure(reinterpret_cast<void**>(&bytemap_), &bytemap_cap_, std::max<size_t>(1, T * E_)) ||
      !ensure(reinterpret_cast<void**>(&slot_), &slot_cap_, std::max<size_t>(4, 4 * T * E_)) ||
      !ensure(reinterpret_cast<void**>(&counts_), &counts_cap_, 8 * E_) ||
      !ensure(reinterpret_cast<void**>(&expert_off_), &expert_off_cap_, 8 * (E_ + 1)) ||
      !ensure(reinterpret_cast<void**>(&send_x_), &send_x_cap_, std::max<size_t>(rb, T * k_ * rb)) ||
      !ensure(reinterpret_cast<void**>(&chunks_), &chunks_cap_, 8 * 3 * E_))
    return false;
  // 1. conversion, 2. per-expert scan, 3. offsets, 4. per-expert permute.
  if (!check(cudaMemsetAsync(bytemap_, 0, T * E_, stream_), "memset bytemap")) return false;
  if (T > 0) indices_to_bytemap<<<blocks(T * k_), kThreads, 0, stream_>>>(indices, T, k_, E_, bytemap_);
  expert_scan<<<E_, kThreads, 0, stream_>>>(bytemap_, T, E_, slot_, counts_);
  expert_offsets<<<1, 32, 0, stream_>>>(counts_, E_, expert_off_);
  if (T > 0)
    permute_per_expert<<<blocks(T * k_ * 32), kThreads, 0, stream_>>>(indices, x, T, k_, E_, H_, slot_, expert_off_,
                                                                      send_x_);
  if (!check(cudaGetLastError(), "dispatch kernels")) return false;
  // 5. count exchange: L counts per peer, then the host synchronisation.
  int32_t* recv_counts = counts_ + E_;
  if (!check(cudaMemcpyAsync(recv_counts + rank_ * L_, counts_ + rank_ * L_, 4 * L_, cudaMemcpyDeviceToDevice, stream_),
             "self counts"))
    return false;
  if (!check(ncclGroupStart(), "ncclGroupStart")) return false;
  for (int p = 0; p < W_; ++p) {
    if (p == rank_) continue;
    ncclSend(counts_ + p * L_, L_, ncclInt32, p, comm_, stream_);
    ncclRecv(recv_counts + p * L_, L_, ncclInt32, p, comm_, stream_);
  }
  if (!check(ncclGroupEnd(), "ncclGroupEnd") ||
      !check(cudaMemcpyAsync(pinned_, counts_, 8 * E_, cudaMemcpyDeviceToHost, stream_), "counts download") ||
      !check(cudaStreamSynchronize(stream_), "count exchange sync"))
    return false;
  // 6. host: per-peer rows, and the [source][expert] -> [expert][source] chunk table.
  const int32_t* sc = pinned_;
  const int32_t* rc = pinned_ + E_;
  send_off_.assign(W_, 0), send_cnt_.assign(W_, 0), recv_off_.assign(W_, 0), recv_cnt_.assign(W_, 0);
  int64_t s = 0, r = 0;
  for (int p = 0; p < W_; ++p) {
    send_off_[p] = s, recv_off_[p] = r;
    for (int l = 0; l < L_; ++l) send_cnt_[p] += sc[p * L_ + l], recv_cnt_[p] += rc[p * L_ + l];
    s += send_cnt_[p], r += recv_cnt_[p];
  }
  send_rows_ = s, recv_rows_ = r;
  cross_bytes_ = (s - send_cnt_[rank_]) * static_cast<int64_t>(rb);
  std::vector<int64_t> expert_start(L_ + 1, 0);
  for (int l = 0; l < L_; ++l) {
    int64_t n = 0;
    for (int p = 0; p < W_; ++p) n += rc[p * L_ + l];
    expert_start[l + 1] = expert_start[l] + n;
  }
  std::vector<int64_t> fill(expert_start.begin(), expert_start.end() - 1);
  for (int p = 0; p < W_; ++p) {
    int64_t src = recv_off_[p];
    for (int l = 0; l < L_; ++l) {
      int64_t* c = pinned_chunks_ + 3 * (p * L_ + l);
      c[0] = src, c[1] = fill[l], c[2] = rc[p * L_ + l];
      src += c[2], fill[l] += c[2];
    }
  }
  if (!ensure(reinterpret_cast<void**>(&recv_x_), &recv_x_cap_, std::max<size_t>(rb, r * rb)) ||
      !ensure(reinterpret_cast<void**>(&expert_x_), &expert_x_cap_, std::max<size_t>(rb, r * rb)) ||
      !check(cudaMemcpyAsync(chunks_, pinned_chunks_, 8 * 3 * E_, cudaMemcpyHostToDevice, stream_), "chunk table"))
    return false;
  // 7. all-to-all of the rows, 8. expert-major sort.
  if (!exchange_rows(send_x_, send_off_, send_cnt_, recv_x_, recv_off_, recv_cnt_)) return false;
  sort_chunks<<<W_ * L_, kThreads, 0, stream_>>>(chunks_, H_, recv_x_, expert_x_, true);
  return check(cudaGetLastError(), "sort_chunks");
}

bool Pipeline::combine(const __nv_bfloat16* y, const float* weights, __nv_bfloat16* out) {
  if (error_[0]) return false;
  // Inverse sort into recv order, all-to-all back into the send rows, weighted sum per token.
  sort_chunks<<<W_ * L_, kThreads, 0, stream_>>>(chunks_, H_, recv_x_, const_cast<__nv_bfloat16*>(y), false);
  if (!check(cudaGetLastError(), "sort_chunks") ||
      !exchange_rows(recv_x_, recv_off_, recv_cnt_, send_x_, send_off_, send_cnt_))
    return false;
  if (T_ > 0)
    weighted_sum<<<blocks(T_ * 32), kThreads, 0, stream_>>>(indices_, weights, send_x_, T_, k_, E_, H_, slot_,
                                                            expert_off_, out);
  return check(cudaGetLastError(), "weighted_sum");
}

}  // namespace baseline
