// SPDX-License-Identifier: Apache-2.0
// Inputs and correctness checks of ep_bench (see ep_bench.h). The device checks count bad rows with atomics on
// one device counter, the placement check on the host; they run outside the timed regions.
#include <algorithm>
#include <cstdlib>
#include <cstring>

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

inline bool bit(const uint8_t* row, int b) { return (row[b >> 3] >> (b & 7)) & 1; }

// The bf16 bits gen_x writes for v (an integer of the header).
uint16_t header_bits(int64_t v) {
  const __nv_bfloat16 b = __float2bfloat16_rn(static_cast<float>(v));
  uint16_t u;
  std::memcpy(&u, &b, sizeof(u));
  return u;
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

void append_expected_rows(ExpectedRows* e,
                          const uint8_t* bitmap,
                          const float* topk_weights,
                          int64_t T,
                          int E,
                          int k,
                          int W,
                          int s,
                          int rank) {
  const int L = E / W, KL = std::min(k, L), MB = (L + 7) / 8, EB = (E + 7) / 8, first = rank * L;
  std::vector<uint8_t> slice(MB);
  std::vector<float> w(KL);
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* row = bitmap + t * EB;
    int before = 0;  // the token's experts below this rank's: the compact index of its first one here
    for (int b = 0; b < first / 8; ++b) before += __builtin_popcount(row[b]);
    if (first % 8 != 0) before += __builtin_popcount(row[first / 8] & ((1u << (first % 8)) - 1u));
    std::fill(slice.begin(), slice.end(), 0);
    std::fill(w.begin(), w.end(), 0.0f);
    int n = 0;
    for (int l = 0; l < L; ++l) {
      if (!bit(row, first + l)) continue;
      slice[l >> 3] = static_cast<uint8_t>(slice[l >> 3] | (1u << (l & 7)));
      if (n < KL) w[n] = topk_weights[t * k + before + n];
      ++n;
    }
    if (n == 0) continue;
    e->origin.push_back(s);
    e->origin.push_back(static_cast<int32_t>(t));
    e->map.insert(e->map.end(), slice.begin(), slice.end());
    e->weights.insert(e->weights.end(), w.begin(), w.end());
  }
}

int64_t check_placement(const ExpectedRows& e, const Placement& p) {
  const int L = p.L, KL = p.KL, MB = (L + 7) / 8;
  const int64_t R = static_cast<int64_t>(e.origin.size() / 2), headers = static_cast<int64_t>(p.headers.size() / 3);
  int64_t wrong = std::llabs(p.R - R);
  std::vector<int64_t> seen(L, 0);  // rows of each expert so far
  for (int64_t i = 0; i < std::min(p.R, R); ++i) {
    const uint8_t* m = e.map.data() + i * MB;
    const int64_t t = e.origin[2 * i + 1];
    bool ok = i < headers && p.headers[3 * i] == header_bits(e.origin[2 * i]) &&
              p.headers[3 * i + 1] == header_bits(t / 256) && p.headers[3 * i + 2] == header_bits(t % 256);
    ok = ok && std::memcmp(p.map.data() + i * MB, m, MB) == 0;
    if (!p.weights.empty()) ok = ok && std::memcmp(p.weights.data() + i * KL, e.weights.data() + i * KL, 4 * KL) == 0;
    int j = 0;
    for (int l = 0; l < L; ++l) {
      if (!bit(m, l)) continue;
      ok = ok && j < KL && p.rows[i * KL + j] == p.offsets[l] + seen[l];
      ++seen[l], ++j;
    }
    for (; j < KL; ++j) ok = ok && p.rows[i * KL + j] == -1;
    wrong += !ok;
  }
  // Blocks: aligned offsets follow from offsets[0] = 0 and block sizes that are multiples of the alignment.
  const int64_t a = p.alignment;
  wrong += p.offsets[0] != 0;
  for (int l = 0; l < L; ++l) {
    wrong += seen[l] != p.counts[l];
    wrong += int64_t{p.offsets[l + 1]} - p.offsets[l] != (int64_t{p.counts[l]} + a - 1) / a * a;
  }
  wrong += p.offsets[L] != p.num_expert_rows;
  return wrong;
}

std::vector<Corruption> corrupt_placement(const ExpectedRows& e, const Placement& p) {
  std::vector<Corruption> out;
  if (p.R == 0) return out;
  const int MB = (p.L + 7) / 8, KL = p.KL;
  const int64_t mid = p.R / 2;
  Placement c = p;
  auto check = [&](const char* what, bool applied) {
    out.push_back({what, applied, applied ? check_placement(e, c) : 0});
    c = p;
  };
  c.map[mid * MB] = static_cast<uint8_t>(c.map[mid * MB] ^ 1u);
  check("one map bit of one received row flipped", true);
  // Entries q = i * KL + j: the first one with a row, and the first after it whose expert (the j-th set bit of
  // row i) differs.
  int64_t qa = -1, qb = -1;
  int la = -1;
  for (int64_t i = 0; i < p.R && qb < 0; ++i)
    for (int l = 0, j = 0; l < p.L && j < KL && qb < 0; ++l) {
      if (!bit(p.map.data() + i * MB, l)) continue;
      const int64_t q = i * KL + j++;
      if (p.rows[q] < 0) continue;
      if (qa < 0)
        qa = q, la = l;
      else if (l != la)
        qb = q;
    }
  if (qb >= 0) std::swap(c.rows[qa], c.rows[qb]);
  check("two recv_expert_rows entries of different experts swapped", qb >= 0);
  if (!c.weights.empty()) {  // every received row has a weight > 0 in entry 0: one ulp up is the next float
    uint32_t u;
    std::memcpy(&u, &c.weights[mid * KL], sizeof(u));
    ++u;
    std::memcpy(&c.weights[mid * KL], &u, sizeof(u));
  }
  check("one weight changed by one ulp", !c.weights.empty());
  return out;
}

}  // namespace epbench
