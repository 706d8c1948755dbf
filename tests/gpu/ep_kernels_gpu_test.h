// SPDX-License-Identifier: Apache-2.0
// What the EP kernels' GPU tests share (ep_dispatch_gpu_test.cu: layout, permute, packed counts and the launchers'
// argument checks; ep_expert_major_gpu_test.cu; ep_combine_gpu_test.cu: reduce, final sum, weight gradient, batched
// copies; ep_low_latency_gpu_test.cu): device buffers, poisoned outputs, exact comparisons, random routing inputs,
// the parameter grids, the host layout and the received rows the later primitives take.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/ep.h"
#include "kernels/ep_params.h"
#include "src/host/dtype_host.h"
#include "src/host/ep_host.h"

namespace ep_test {

using bitep::kernels::DType;
using bitep::kernels::RoutingFormat;
using bitep::kernels::RoutingInput;
using bitep::kernels::WeightFormat;
namespace K = bitep::kernels;
namespace host = bitep::host;

constexpr uint8_t kPoison = 0xA7;

inline bool gpu_visible(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
    (void)cudaGetLastError();
    return false;
  }
  if (n == 0) *why = "cudaGetDeviceCount found 0 devices";
  return n > 0;
}

#define REQUIRE_GPU()                                                                                       \
  do {                                                                                                      \
    std::string why_;                                                                                       \
    if (!gpu_visible(&why_)) GTEST_SKIP() << "no CUDA device visible (" << why_ << "): EP kernels not run"; \
  } while (0)

inline void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device buffer mirroring a host vector; poisoned unless given contents.
template <class T>
class Dev {
 public:
  explicit Dev(size_t n) : n_(n) {
    ck(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    ck(cudaMemset(p_, kPoison, std::max<size_t>(n, 1) * sizeof(T)), "cudaMemset");
  }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) {
    if (!h.empty()) ck(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  ~Dev() { cudaFree(p_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  T* get() const { return n_ ? p_ : nullptr; }
  std::vector<T> host() const {
    std::vector<T> h(n_);
    if (n_) ck(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }

 private:
  T* p_ = nullptr;
  size_t n_;
};

template <class T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  if (n) std::memset(v.data(), kPoison, n * sizeof(T));
  return v;
}

inline void sync(cudaError_t launch) {
  ck(launch, "launch");
  ck(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

// Byte-exact comparison; reports the first difference.
template <class T>
bool same(const std::vector<T>& gpu, const std::vector<T>& ref, const std::string& what, const std::string& where) {
  if (gpu.size() == ref.size() && (gpu.empty() || std::memcmp(gpu.data(), ref.data(), gpu.size() * sizeof(T)) == 0))
    return true;
  size_t i = 0;
  while (i < gpu.size() && i < ref.size() && std::memcmp(&gpu[i], &ref[i], sizeof(T)) == 0) ++i;
  std::ostringstream os;
  os << where << ": " << what << " differs at element " << i << " of " << ref.size();
  if (i < gpu.size() && i < ref.size()) {
    if constexpr (std::is_integral_v<T>)
      os << " (gpu " << +gpu[i] << ", host " << +ref[i] << ")";
    else
      os << " (gpu " << gpu[i] << ", host " << ref[i] << ")";
  }
  ADD_FAILURE() << os.str();
  return false;
}

inline int elem_bytes(DType d) { return d == DType::kF32 ? 4 : 2; }

// Rows of random finite values in [-2, 2] stored as dtype, as raw bytes.
inline std::vector<uint8_t> random_rows(int64_t rows, int64_t H, DType d, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<uint8_t> v(static_cast<size_t>(rows * H * elem_bytes(d)));
  for (int64_t i = 0; i < rows * H; ++i) host::store_from_float(v.data(), d, i, u(rng));
  return v;
}

// ---- routing inputs --------------------------------------------------------------------------------

struct Routing {
  int64_t T;
  int E, k;
  std::vector<uint8_t> bytemap, bitmap;  // [T, E], [T, ceil(E/8)]
  std::vector<int32_t> indices;          // [T, k], random order
  std::vector<float> dense;              // [T, E]
  std::vector<float> compact_bits;       // [T, k] weight of the j-th set bit
  std::vector<float> compact_idx;        // [T, k] weight of indices[t][j]
};

// k distinct experts per token (skewed: low experts hot). invalid: some rows break the format (extra bits,
// pad bits, bytes > 1, repeated / out-of-range indices) to check that both sides apply the same rules.
inline Routing make_routing(int64_t T, int E, int k, uint64_t seed, bool skewed, bool invalid) {
  Routing r{T, E, k, {}, {}, {}, {}, {}, {}};
  std::mt19937_64 rng(seed);
  const int nb = (E + 7) / 8;
  r.bytemap.assign(T * E, 0);
  r.bitmap.assign(T * nb, 0);
  r.indices.assign(T * k, 0);
  r.dense.assign(T * E, 0.0f);
  r.compact_bits.assign(T * k, 0.0f);
  r.compact_idx.assign(T * k, 0.0f);
  std::uniform_real_distribution<float> w(0.01f, 1.0f);
  std::vector<int> perm(E);
  for (int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    if (skewed) {
      std::vector<double> key(E);
      for (int e = 0; e < E; ++e) key[e] = std::uniform_real_distribution<double>(0, 1)(rng) * (e < 4 ? 0.05 : 1.0);
      std::sort(perm.begin(), perm.end(), [&](int a, int b) { return key[a] < key[b]; });
    } else {
      std::shuffle(perm.begin(), perm.end(), rng);
    }
    std::vector<int> chosen(perm.begin(), perm.begin() + k);  // index order
    std::vector<int> sorted = chosen;
    std::sort(sorted.begin(), sorted.end());
    for (int j = 0; j < k; ++j) {
      const int e = chosen[j];
      const float x = w(rng);
      r.indices[t * k + j] = e;
      r.bytemap[t * E + e] = 1;
      r.bitmap[t * nb + e / 8] |= static_cast<uint8_t>(1u << (e % 8));
      r.dense[t * E + e] = x;
      r.compact_idx[t * k + j] = x;
      r.compact_bits[t * k + (std::lower_bound(sorted.begin(), sorted.end(), e) - sorted.begin())] = x;
    }
    if (invalid && t % 3 == 1) {
      const int extra = perm[k % E];
      r.bytemap[t * E + extra] = static_cast<uint8_t>(2 + t % 200);  // a (k+1)-th expert when k < E
      r.bytemap[t * E + chosen[0]] = 0xff;
      r.bitmap[t * nb + extra / 8] |= static_cast<uint8_t>(1u << (extra % 8));
      if (E % 8) r.bitmap[t * nb + nb - 1] |= 0x80;        // a pad bit
      if (k > 1) r.indices[t * k + 1] = r.indices[t * k];  // a repeat
      r.indices[t * k + k - 1] = (t % 2) ? -1 : E;         // out of range
    }
  }
  return r;
}

struct DevRouting {
  Dev<uint8_t> bytemap, bitmap;
  Dev<int32_t> indices;
  Dev<float> dense, compact_bits, compact_idx;
  explicit DevRouting(const Routing& r)
      : bytemap(r.bytemap),
        bitmap(r.bitmap),
        indices(r.indices),
        dense(r.dense),
        compact_bits(r.compact_bits),
        compact_idx(r.compact_idx) {}
};

template <class Bytes, class Ints, class Floats>
RoutingInput routing_input(RoutingFormat f,
                           WeightFormat wf,
                           const Bytes& bytemap,
                           const Bytes& bitmap,
                           const Ints& indices,
                           const Floats& dense,
                           const Floats& cbits,
                           const Floats& cidx) {
  RoutingInput in;
  in.format = f;
  in.map = f == RoutingFormat::kBitmap    ? static_cast<const void*>(bitmap)
           : f == RoutingFormat::kBytemap ? static_cast<const void*>(bytemap)
                                          : static_cast<const void*>(indices);
  in.weight_format = wf;
  in.weights = wf == WeightFormat::kDense     ? dense
               : wf == WeightFormat::kCompact ? (f == RoutingFormat::kTopkIndices ? cidx : cbits)
                                              : nullptr;
  return in;
}
inline RoutingInput host_input(const Routing& r, RoutingFormat f, WeightFormat wf) {
  return routing_input(f, wf, r.bytemap.data(), r.bitmap.data(), r.indices.data(), r.dense.data(),
                       r.compact_bits.data(), r.compact_idx.data());
}
inline RoutingInput dev_input(const DevRouting& d, RoutingFormat f, WeightFormat wf) {
  return routing_input(f, wf, d.bytemap.get(), d.bitmap.get(), d.indices.get(), d.dense.get(), d.compact_bits.get(),
                       d.compact_idx.get());
}

// ---- the routing grid ------------------------------------------------------------------------------

struct Case {
  int64_t T;
  int W, L, k;
  RoutingFormat fmt;
  WeightFormat wf;
  int64_t H;
  DType dtype;
  bool skewed, invalid;
  uint64_t seed;
  int E() const { return W * L; }
  std::string str() const {
    static const char* fmts[] = {"bitmap", "bytemap", "indices"};
    static const char* wfs[] = {"none", "dense", "compact"};
    static const char* dts[] = {"f32", "bf16", "f16"};
    std::ostringstream os;
    os << "T=" << T << " W=" << W << " L=" << L << " E=" << E() << " k=" << k << " " << fmts[int(fmt)]
       << " weights=" << wfs[int(wf)] << " H=" << H << " " << dts[int(dtype)] << (skewed ? " skewed" : "")
       << (invalid ? " invalid" : "");
    return os.str();
  }
};

// T in {0, 1, 7, 1000} (plus `big` token counts that take the multi-segment scan), W in {1, 2, 3, 8},
// L in {1, 3, 8, 9, 64}, k in {1, 2, 8, E} (<= E), every routing format; weight formats, H in
// {1, 7, 64}, dtypes, skew and invalid rows rotate over the cases. Then W in {40, 64} (rank groups) and
// H = 7168 for a few shapes.
inline std::vector<Case> routing_grid(const std::vector<int64_t>& big) {
  std::vector<Case> cases;
  std::vector<int64_t> Ts = {0, 1, 7, 256, 1000};  // 256: the one-block layout's limit (kSingleMaxItems)
  uint64_t n = 0;
  for (int64_t T : Ts)
    for (int W : {1, 2, 3, 8})
      for (int L : {1, 3, 8, 9, 64})
        for (int k0 : {1, 2, 8, -1}) {
          const int E = W * L, k = k0 < 0 ? E : k0;
          if (k0 > E || (k0 < 0 && (E == 1 || E == 2 || E == 8))) continue;  // clipped to E: covered once
          for (int f = 0; f < 3; ++f, ++n)
            cases.push_back({T, W, L, k, RoutingFormat(f), WeightFormat(n % 3),
                             int64_t(n % 3 == 0   ? 1
                                     : n % 3 == 1 ? 7
                                                  : 64),
                             DType((n / 3) % 3), n % 5 == 0, n % 7 == 3, 1000 + n});
        }
  for (int64_t T : big)
    for (int W : {2, 8})
      for (int L : {8, 9})
        for (int f = 0; f < 3; ++f, ++n)
          cases.push_back(
              {T, W, L, 8, RoutingFormat(f), WeightFormat(n % 3), 7, DType(n % 3), n % 2 == 0, n % 4 == 1, 1000 + n});
  // More than 32 ranks: the kernels walk ranks in groups of 32.
  for (int64_t T : {7, 1000, 3000})
    for (int W : {40, 64})
      for (int f = 0; f < 3; ++f, ++n)
        cases.push_back({T, W, W == 40 ? 3 : 1, W == 40 ? 8 : 2, RoutingFormat(f), WeightFormat(n % 3), 7, DType(n % 3),
                         n % 2 == 0, n % 4 == 1, 1000 + n});
  for (int64_t H : {7168})
    for (DType d : {DType::kBF16, DType::kF32, DType::kF16})
      for (int W : {1, 8})
        cases.push_back({1000, W, 32, 8, RoutingFormat::kBitmap, WeightFormat::kCompact, H, d, true, false, 77 + n++});
  return cases;
}

constexpr int kMaxFailingCases = 3;

// Compute capability major of device 0 (the bulk copies run from 9 on).
inline int device_major() {
  int major = 0;
  ck(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "cudaDeviceGetAttribute");
  return major;
}

// Rows whose bulk-copy ring (kernels/bulk_rows.cuh: up to 4 rows in 48 KiB) is 48 KiB or just under it: four rows
// of 12272 or 12288 bytes, three of 16352 or 16384, two of 24528 or 24576. With the bulk kernels' 128 bytes of
// static shared memory (H200) each ring is past the 49024 bytes of dynamic shared memory a block gets without
// opting in.
struct RingLimitRows {
  int64_t H;
  DType dtype;
};
constexpr RingLimitRows kRingLimitRows[] = {{6136, DType::kBF16}, {6144, DType::kBF16}, {4088, DType::kF32},
                                            {4096, DType::kF32},  {8192, DType::kBF16}, {12264, DType::kBF16},
                                            {12288, DType::kBF16}};

// Host layout of a case (also the input of the later primitives).
struct Layout {
  std::vector<int32_t> counts, slot;
};
// The layout of case c over `routing` (host or device), writing counts and token_slot.
inline K::LayoutParams layout_params(const Case& c, const RoutingInput& routing, int32_t* counts, int32_t* token_slot) {
  K::LayoutParams p;
  p.num_tokens = c.T;
  p.num_experts = c.E();
  p.topk = c.k;
  p.num_ranks = c.W;
  p.routing = routing;
  p.counts = counts;
  p.token_slot = token_slot;
  return p;
}
inline Layout host_layout(const Case& c, const Routing& r) {
  Layout out{poisoned<int32_t>(size_t(c.W) * (c.L + 1)), poisoned<int32_t>(size_t(c.T) * c.W)};
  host::ep_layout(layout_params(c, host_input(r, c.fmt, WeightFormat::kNone), out.counts.data(), out.slot.data()));
  if (c.T == 0) std::fill(out.counts.begin(), out.counts.end(), 0);  // the orchestration zeroes them
  return out;
}

// The permute of case c with `self` as this rank, over host x and slots; no buffers.
inline K::PermuteParams permute_params(const Case& c, int self, const std::vector<uint8_t>& x, const Layout& lay) {
  K::PermuteParams p;
  p.num_tokens = c.T;
  p.num_experts = c.E();
  p.topk = c.k;
  p.num_ranks = c.W;
  p.self_rank = self;
  p.hidden = c.H;
  p.dtype = c.dtype;
  p.x = x.data();
  p.token_slot = lay.slot.data();
  return p;
}

// ---- received rows (expert-major, reduce) ----------------------------------------------------------

struct RecvCase {
  int64_t R;
  int L, KL, align;
  int64_t H;
  DType dtype;
  int mode;  // 0: positions only, 1: copy, 2: weighted copy
  bool over_bits, short_counts;
  uint64_t seed;
  std::string str() const {
    std::ostringstream os;
    os << "R=" << R << " L=" << L << " KL=" << KL << " align=" << align << " H=" << H << " dtype=" << int(dtype)
       << " mode=" << mode << (over_bits ? " over-KL-bits" : "") << (short_counts ? " short-counts" : "");
    return os.str();
  }
};

inline std::vector<RecvCase> recv_grid() {
  std::vector<RecvCase> cases;
  uint64_t n = 0;
  for (int64_t R : {0, 1, 7, 1000, 3000, 40000})
    for (int L : {1, 3, 8, 9, 64, 256})
      for (int k : {1, 2, 8, 1 << 20}) {
        const int KL = std::min(k, L);
        if (k != (1 << 20) && k > L) continue;
        if (R >= 3000 && n % 2) {
          ++n;
          continue;
        }
        cases.push_back({R, L, KL,
                         n % 3 == 0   ? 1
                         : n % 3 == 1 ? 8
                                      : 128,
                         int64_t(n % 4 == 0   ? 1
                                 : n % 4 == 1 ? 7
                                              : 64),
                         DType(n % 3), int(n % 3), n % 5 == 2, n % 11 == 4, 500 + n});
        ++n;
      }
  for (DType d : {DType::kBF16, DType::kF32, DType::kF16})
    for (int mode : {1, 2}) cases.push_back({2000, 32, 8, 16, 7168, d, mode, false, false, 900 + n++});
  // The positions' one-block kernels (K::kScanSingleRows = 256 rows): the row masks' at its row limit, within the
  // default 48 KiB of shared memory (L = 64) and opted in past it (L = 2048: 115 KB at R = 256), the scan where the
  // maps and masks pass the device's opt-in limit (L = 5000: 360 KB), and the scan for rows too few for two segments
  // (R = 400); the segmented kernels from one row past the limit. Rows over KL bits, short counts.
  for (bool odd : {false, true}) {
    cases.push_back({256, 64, 8, 16, 64, DType::kBF16, 1, odd, odd, 950 + n++});
    cases.push_back({256, 2048, 8, 8, 64, DType::kBF16, 2, odd, !odd, 950 + n++});
    cases.push_back({256, 5000, 8, 8, 64, DType::kBF16, 0, !odd, !odd, 950 + n++});
    cases.push_back({400, 512, 8, 8, 64, DType::kBF16, 0, !odd, odd, 950 + n++});
    cases.push_back({513, 64, 8, 16, 64, DType::kBF16, 1, odd, !odd, 950 + n++});
  }
  // Experts taken in chunks by the positions' kernels: 1500 local experts are 3 chunks of the segmented kernel
  // (512) and 12 of the one-block one (128); KL = 8 and KL = 40 (rows of up to 40 experts spread over the chunks).
  for (bool odd : {false, true}) {
    cases.push_back({6000, 1500, odd ? 40 : 8, 8, 64, DType::kBF16, odd ? 2 : 0, odd, !odd, 970 + n++});
    cases.push_back({250, 1500, odd ? 8 : 40, 8, 64, DType::kBF16, odd ? 0 : 1, !odd, odd, 970 + n++});
  }
  return cases;
}

struct RecvInput {
  std::vector<uint8_t> map;              // [R, MB]
  std::vector<int32_t> counts, offsets;  // [L], [L + 1]
  std::vector<uint8_t> x;                // [R, H]
  std::vector<float> weights;            // [R, KL]
  int64_t N;
};

inline RecvInput make_recv(const RecvCase& c) {
  std::mt19937_64 rng(c.seed);
  const int MB = K::local_map_bytes(c.L);
  RecvInput in;
  in.map.assign(c.R * MB, 0);
  in.counts.assign(c.L, 0);
  std::vector<int> perm(c.L);
  for (int64_t i = 0; i < c.R; ++i) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    int bits = 1 + static_cast<int>(rng() % c.KL);
    if (i % 13 == 5) bits = 0;                                      // a row using no expert
    if (c.over_bits && i % 4 == 1) bits = std::min(c.L, c.KL + 2);  // more than KL bits: only the first KL count
    std::vector<int> used(perm.begin(), perm.begin() + bits);
    std::sort(used.begin(), used.end());
    for (int j = 0; j < bits; ++j) {
      in.map[i * MB + used[j] / 8] |= static_cast<uint8_t>(1u << (used[j] % 8));
      if (j < c.KL) ++in.counts[used[j]];
    }
  }
  if (c.short_counts)
    for (int l = 0; l < c.L; l += 2) in.counts[l] = std::max(0, in.counts[l] - 1 - l % 3);
  in.offsets.assign(c.L + 1, 0);
  for (int l = 0; l < c.L; ++l) in.offsets[l + 1] = in.offsets[l] + (in.counts[l] + c.align - 1) / c.align * c.align;
  in.N = in.offsets[c.L];
  in.x = random_rows(c.R, c.H, c.dtype, rng);
  std::uniform_real_distribution<float> w(-1.0f, 1.0f);
  in.weights.resize(c.R * c.KL);
  for (float& v : in.weights) v = w(rng);
  return in;
}

// The host's parameters of case c: its maps, offsets and counts, positions into rows ([R, KL]), and by mode its
// rows into ex (mode 1 and 2) with the weights (mode 2).
inline K::ExpertMajorParams expert_params(const RecvCase& c, const RecvInput& in, int32_t* rows, uint8_t* ex) {
  K::ExpertMajorParams p;
  p.num_recv_rows = c.R;
  p.num_local_experts = c.L;
  p.max_row_experts = c.KL;
  p.hidden = c.H;
  p.dtype = c.dtype;
  p.recv_map = in.map.data();
  p.expert_offsets = in.offsets.data();
  p.expert_counts = in.counts.data();
  p.recv_expert_rows = rows;
  p.recv_x = c.mode ? in.x.data() : nullptr;
  p.expert_x = c.mode ? ex : nullptr;
  p.num_expert_rows = in.N;
  p.recv_weights = c.mode == 2 ? in.weights.data() : nullptr;
  return p;
}

// The host's positions of case c's rows (recv_expert_rows [R, KL]), nothing copied: what the combine's kernels read.
inline std::vector<int32_t> host_positions(const RecvCase& c, const RecvInput& in) {
  std::vector<int32_t> rows(c.R * c.KL);
  K::ExpertMajorParams p = expert_params(c, in, rows.data(), nullptr);
  p.recv_x = nullptr;
  p.recv_weights = nullptr;
  host::ep_expert_major(p);
  return rows;
}

}  // namespace ep_test
