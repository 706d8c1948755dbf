// SPDX-License-Identifier: Apache-2.0
// Inputs and correctness checks of ep_bench (see ep_bench.h). Checks count bad rows with atomics on one
// device counter; they run outside the timed regions.
#include "bench/ep_bench.h"
#include "tests/reference/inputs.h"

namespace epbench {
namespace {

constexpr int kThreads = 256;

using bitep::ref::mix;

__device__ inline float pattern(int rank, int64_t t, int h) {
  return static_cast<float>(static_cast<int>((rank * 37 + t * 11 + h * 7) % 255) - 127) / 64.0f;
}

__device__ inline uint16_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

__global__ void logits_kernel(float* logits, int64_t T, int E, int rank, uint64_t seed, bool skewed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * E) return;
  const int e = static_cast<int>(i % E);
  const uint64_t h = mix(seed ^ mix(static_cast<uint64_t>(rank) << 40 ^ static_cast<uint64_t>(i)));
  float v = static_cast<float>(h >> 40) * (4.0f / 16777216.0f);
  if (skewed && e < 4) v += 3.0f;
  logits[i] = v;
}

__global__ void x_kernel(__nv_bfloat16* x, int64_t T, int H, int rank) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * H) return;
  const int64_t t = i / H;
  const int h = static_cast<int>(i % H);
  const float v = h == 0   ? static_cast<float>(rank)
                  : h == 1 ? static_cast<float>(t / 256)
                  : h == 2 ? static_cast<float>(t % 256)
                           : pattern(rank, t, h);
  x[i] = __float2bfloat16_rn(v);
}

// Header of a row: origin rank and token (-1 when not an integer header).
__device__ inline void header(const __nv_bfloat16* row, int* rank, int64_t* t) {
  const float a = __bfloat162float(row[0]), b = __bfloat162float(row[1]), c = __bfloat162float(row[2]);
  *rank = static_cast<int>(a);
  *t = static_cast<int64_t>(b) * 256 + static_cast<int64_t>(c);
  if (a != static_cast<float>(*rank) || a < 0 || b < 0 || c < 0 || c > 255) *rank = -1;
}

// Whether the warp's row carries its header's payload (all lanes get the answer).
__device__ inline bool payload_ok(const __nv_bfloat16* row, int H, int rank, int64_t t) {
  bool ok = rank >= 0;
  for (int h = 3 + (threadIdx.x & 31); ok && h < H; h += 32)
    ok = bits(row[h]) == bits(__float2bfloat16_rn(pattern(rank, t, h)));
  return __all_sync(0xffffffffu, ok);
}

__global__ void recv_rows_kernel(
    const __nv_bfloat16* rows, int64_t n, int H, const int64_t* src_off, int W, int* wrong) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (i >= n) return;
  int rank;
  int64_t t;
  header(rows + i * H, &rank, &t);
  int s = 0;
  while (s + 1 < W && src_off[s + 1] <= i) ++s;
  bool ok = rank == s && payload_ok(rows + i * H, H, rank, t);
  if (ok && i > src_off[s]) {  // ascending token order within a source
    int prev_rank;
    int64_t prev_t;
    header(rows + (i - 1) * H, &prev_rank, &prev_t);
    ok = prev_t < t;
  }
  if (!ok && (threadIdx.x & 31) == 0) atomicAdd(wrong, 1);
}

__global__ void payload_kernel(const __nv_bfloat16* rows, int64_t n, int H, int* wrong) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (i >= n) return;
  int rank;
  int64_t t;
  header(rows + i * H, &rank, &t);
  if (!payload_ok(rows + i * H, H, rank, t) && (threadIdx.x & 31) == 0) atomicAdd(wrong, 1);
}

__global__ void expert_major_kernel(const __nv_bfloat16* recv_x,
                                    const __nv_bfloat16* expert_x,
                                    const int32_t* rows,
                                    const uint8_t* map,
                                    const float* weights,
                                    int64_t R,
                                    int KL,
                                    int MB,
                                    int H,
                                    int* wrong) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (i >= R) return;
  int pop = 0;
  for (int b = 0; b < MB; ++b) pop += __popc(map[i * MB + b]);
  bool ok = pop >= 1 && pop <= KL;
  int used = 0;
  for (int j = 0; j < KL; ++j) {
    const int32_t pos = rows[i * KL + j];
    if (weights != nullptr) ok = ok && (j < pop ? weights[i * KL + j] > 0.0f : weights[i * KL + j] == 0.0f);
    if (pos < 0) continue;
    ++used;
    bool same = true;
    for (int h = lane; h < H; h += 32)
      same = same && bits(expert_x[pos * static_cast<int64_t>(H) + h]) == bits(recv_x[i * H + h]);
    ok = ok && __all_sync(0xffffffffu, same);
  }
  ok = ok && used == pop;
  if (!ok && lane == 0) atomicAdd(wrong, 1);
}

__global__ void pad_kernel(
    const __nv_bfloat16* expert_x, const int32_t* offsets, const int32_t* counts, int L, int H, int* wrong) {
  const int l = blockIdx.x;
  if (l >= L) return;
  const int64_t begin = static_cast<int64_t>(offsets[l]) + counts[l], end = offsets[l + 1];
  for (int64_t i = begin * H + threadIdx.x; i < end * H; i += blockDim.x)
    if (bits(expert_x[i]) != 0) atomicAdd(wrong, 1);
}

__global__ void equal_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n, int* wrong) {
  int bad = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    bad += bits(a[i]) != bits(b[i]);
  if (bad) atomicAdd(wrong, bad);
}

// One warp per token.
__global__ void combine_kernel(const __nv_bfloat16* out,
                               const __nv_bfloat16* x,
                               const uint8_t* bitmap,
                               const float* w,
                               int64_t T,
                               int H,
                               int E,
                               int k,
                               int W,
                               int* wrong) {
  constexpr int kMaxK = 64;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (t >= T) return;
  const int rb = (E + 7) / 8, L = E / W;
  int ex[kMaxK], n = 0;
  for (int b = 0; b < rb; ++b)
    for (unsigned m = bitmap[t * rb + b]; m != 0u; m &= m - 1u)
      if (n < kMaxK) ex[n++] = 8 * b + __ffs(m) - 1;
  bool ok = n == k;
  for (int h = lane; ok && h < H; h += 32) {
    const float xv = __bfloat162float(x[t * H + h]);
    float total = 0.0f;
    for (int i = 0; i < n;) {
      const int r = ex[i] / L;
      float acc = 0.0f;
      for (; i < n && ex[i] / L == r; ++i) acc = fmaf(w[t * k + i], xv, acc);
      total = total + __bfloat162float(__float2bfloat16_rn(acc));
    }
    ok = bits(out[t * H + h]) == bits(__float2bfloat16_rn(total));
  }
  if (!__all_sync(0xffffffffu, ok) && lane == 0) atomicAdd(wrong, 1);
}

unsigned grid(int64_t threads) {
  const int64_t b = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b > 0 ? b : 1);
}

}  // namespace

void gen_logits(float* logits, int64_t T, int E, int rank, uint64_t seed, bool skewed, cudaStream_t s) {
  if (T > 0) logits_kernel<<<grid(T * E), kThreads, 0, s>>>(logits, T, E, rank, seed, skewed);
}
void gen_x(__nv_bfloat16* x, int64_t T, int H, int rank, cudaStream_t s) {
  if (T > 0) x_kernel<<<grid(T * H), kThreads, 0, s>>>(x, T, H, rank);
}
void check_recv_rows(
    const __nv_bfloat16* rows, int64_t n, int H, const int64_t* src_off, int W, int* wrong, cudaStream_t s) {
  if (n > 0) recv_rows_kernel<<<grid(n * 32), kThreads, 0, s>>>(rows, n, H, src_off, W, wrong);
}
void check_rows_payload(const __nv_bfloat16* rows, int64_t n, int H, int* wrong, cudaStream_t s) {
  if (n > 0) payload_kernel<<<grid(n * 32), kThreads, 0, s>>>(rows, n, H, wrong);
}
void check_expert_major(const __nv_bfloat16* recv_x,
                        const __nv_bfloat16* expert_x,
                        const int32_t* rows,
                        const uint8_t* map,
                        const float* weights,
                        int64_t R,
                        int KL,
                        int MB,
                        int H,
                        int* wrong,
                        cudaStream_t s) {
  if (R > 0)
    expert_major_kernel<<<grid(R * 32), kThreads, 0, s>>>(recv_x, expert_x, rows, map, weights, R, KL, MB, H, wrong);
}
void check_pad_rows(const __nv_bfloat16* expert_x,
                    const int32_t* offsets,
                    const int32_t* counts,
                    int L,
                    int H,
                    int* wrong,
                    cudaStream_t s) {
  pad_kernel<<<L, kThreads, 0, s>>>(expert_x, offsets, counts, L, H, wrong);
}
void check_combine(const __nv_bfloat16* out,
                   const __nv_bfloat16* x,
                   const uint8_t* bitmap,
                   const float* topk_weights,
                   int64_t T,
                   int H,
                   int E,
                   int k,
                   int W,
                   int* wrong,
                   cudaStream_t s) {
  if (T > 0) combine_kernel<<<grid(T * 32), kThreads, 0, s>>>(out, x, bitmap, topk_weights, T, H, E, k, W, wrong);
}
void check_equal(const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n, int* wrong, cudaStream_t s) {
  if (n > 0) equal_kernel<<<grid(n < (1 << 22) ? n : (1 << 22)), kThreads, 0, s>>>(a, b, n, wrong);
}

}  // namespace epbench
