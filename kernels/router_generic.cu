// SPDX-License-Identifier: Apache-2.0
// Generic router forward: one block per token, any E, any k, any group layout (what the warp-per-token
// kernel of router_topk.cu does not take: E > 2048, k > 64, and groups that are neither a power of two of
// octets nor router_topk.cu's unaligned_groups). Same semantics and formulas (src/host/router_host.cc); slower.
//
// Scores are recomputed from the logits (L1/L2-resident while the block works on the row); the
// selection keys are cached in shared memory when E fits. Top-k is a radix select on the uint32 keys
// (four 8-bit digit passes find the k-th key tau), then the ties at tau go to the lowest expert
// indices: expert e is selected iff key > tau, or key == tau and e <= the index of the last tied
// expert taken. Its cost does not grow with k. Group scores use the same machinery per group.
#include <climits>

#include "kernels/router.h"
#include "kernels/router_common.cuh"

namespace bitep::kernels {
namespace {

using namespace router_detail;

[[maybe_unused]] constexpr char kName[] = "router_forward_generic";
constexpr int kThreads = 256;
constexpr int kHeaderWords = 256 + 32 + 8;  // digit histogram, reduction scratch, results

struct GenLayout {
  int group_size;  // E / num_groups (0 = no group routing)
  int per_group;   // k / group_topk
  int mask_bytes;  // ceil(W / 8)
  int experts_per_rank;
};

// Warp arg-max over (key, index): largest key, lowest index among equal keys.
__device__ __forceinline__ void warp_argmax(uint32_t& key, int& idx) {
  const uint32_t m = seg_max_u32<32>(key);
  idx = seg_min_i32<32>(key == m ? idx : INT_MAX);
  key = m;
}

// Radix select over n keys key_at(i) (i in [0, n)): the k-th largest key *tau (1 <= k <= n) and the
// index *last of the last key equal to tau that the top k take (ties in ascending index order).
// All threads of the block call it; the results are in every thread.
template <class KeyAt>
__device__ void block_select(int n, int k, KeyAt key_at, uint32_t* hist, uint32_t* res, uint32_t* tau, int* last) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t prefix = 0u, pmask = 0u;
  int need = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t kk = key_at(i);
      if ((kk & pmask) == prefix) atomicAdd(&hist[(kk >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {  // lane l owns digits [8l, 8l + 8); find the digit holding the need-th largest
      uint32_t c[8];
      int own = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) c[j] = hist[8 * lane + j], own += static_cast<int>(c[j]);
      int above = own;  // inclusive suffix sum over lanes >= lane
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int y = __shfl_down_sync(kFullMask, above, d);
        if (lane + d < 32) above += y;
      }
      above -= own;  // keys in digits of higher lanes
      if (above < need && need <= above + own) {
        int acc = above;
        for (int j = 7; j >= 0; --j) {
          if (acc + static_cast<int>(c[j]) >= need) {
            res[0] = static_cast<uint32_t>(8 * lane + j);
            res[1] = static_cast<uint32_t>(need - acc);
            break;
          }
          acc += static_cast<int>(c[j]);
        }
      }
    }
    __syncthreads();
    prefix |= res[0] << shift;
    pmask |= 255u << shift;
    need = static_cast<int>(res[1]);
    __syncthreads();
  }
  // The need-th key equal to tau in index order: contiguous chunks per thread, scanned in thread order.
  const int chunk = (n + blockDim.x - 1) / blockDim.x;
  const int lo = min(n, static_cast<int>(threadIdx.x) * chunk), hi = min(n, lo + chunk);
  int cnt = 0;
  for (int i = lo; i < hi; ++i) cnt += key_at(i) == prefix;
  const int before = block_exclusive_scan(cnt, reinterpret_cast<int*>(hist));
  if (before < need && need <= before + cnt) {
    int seen = before;
    for (int i = lo; i < hi; ++i)
      if (key_at(i) == prefix && ++seen == need) {
        res[2] = static_cast<uint32_t>(i);
        break;
      }
  }
  __syncthreads();
  *tau = prefix;
  *last = static_cast<int>(res[2]);
  __syncthreads();
}

template <bool kCache>
__global__ void __launch_bounds__(kThreads) router_forward_generic(const RouterForwardParams p, const GenLayout lay) {
  dependent_start();  // BITEP_LAUNCH_PDL (a no-op in a plain launch): nothing read or written before it
  extern __shared__ uint32_t smem[];
  uint32_t* hist = smem;
  float* scratch = reinterpret_cast<float*>(smem + 256);
  uint32_t* res = smem + 288;
  const int num_groups = lay.group_size > 0 ? p.num_groups : 0;
  float* gscore = reinterpret_cast<float*>(smem + kHeaderWords);
  uint32_t* kcache = smem + kHeaderWords + num_groups;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int E = p.num_experts, k = p.topk;
  const DType dt = p.logits_dtype;
  const ScoreFn fn = p.score_fn;
  const ScorePath path = score_path(p);
  const bool aux = path.aux, pre = path.pre, post = path.post, norm = path.norm;
  const bool use_bias = selection_bias(p);
  const bool select = !aux || p.routing_map != nullptr;
  const bool groups = num_groups > 0;
  const float scale = p.scaling_factor;

  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    const int64_t row = t * E;
    auto logit = [&](int e) { return load_one(p.logits, dt, row + e); };

    // 1. scores, recomputable per expert: score(e) = f(logit) [pre: exp(x - mx) / sum] [aux norm: / nsum].
    float mx = 0.0f, sum = 1.0f, nsum = 1.0f;
    if (pre) {
      float m = -INFINITY;
      for (int e = threadIdx.x; e < E; e += blockDim.x) m = fmaxf(m, logit(e));
      mx = block_max_f32(m, scratch);
      float s = 0.0f;
      for (int e = threadIdx.x; e < E; e += blockDim.x) s = __fadd_rn(s, softmax_exp(logit(e), mx));
      sum = block_sum_f32(s, scratch);
    }
    auto raw_score = [&](int e) {
      const float x = logit(e);
      if (pre) return softmax_exp(x, mx) / sum;
      if (fn == ScoreFn::kSigmoid) return sigmoid_f(x);
      if (fn == ScoreFn::kSqrtSoftplus) return sqrtsoftplus_f(x);
      return x;
    };
    if (aux && norm) {
      float s = 0.0f;
      for (int e = threadIdx.x; e < E; e += blockDim.x) s = __fadd_rn(s, raw_score(e));
      nsum = __fadd_rn(block_sum_f32(s, scratch), kNormEpsilon);
    }
    auto score = [&](int e) { return (aux && norm) ? raw_score(e) / nsum : raw_score(e); };
    auto raw_key = [&](int e) {
      const float v = score(e);
      return select_key(use_bias ? __fadd_rn(v, __ldg(p.expert_bias + e)) : v);
    };

    if (p.saved != nullptr && !post) {
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const float x = logit(e);
        p.saved[row + e] = fn == ScoreFn::kSqrtSoftplus ? x : (fn == ScoreFn::kSigmoid ? sigmoid_f(x) : raw_score(e));
      }
    }
    if (aux && p.probs != nullptr)
      for (int e = threadIdx.x; e < E; e += blockDim.x) p.probs[row + e] = score(e);
    if (!select) continue;

    if (kCache) {
      for (int e = threadIdx.x; e < E; e += blockDim.x) kcache[e] = raw_key(e);
      __syncthreads();
    }
    auto key0 = [&](int e) { return kCache ? kcache[e] : raw_key(e); };

    // 2. group-limited routing: each warp scores whole groups (best per_group keys, summed in selection
    // order from 0.0f), then a radix select keeps the best group_topk groups.
    uint32_t gtau = 0u;
    int glast = INT_MAX;
    if (groups) {
      const int gs = lay.group_size;
      for (int g = warp; g < num_groups; g += nwarps) {
        float s = 0.0f;
        uint32_t lk = 0xffffffffu;
        int li = -1;
        for (int j = 0; j < lay.per_group; ++j) {
          uint32_t bk = 0u;
          int bi = INT_MAX;
          for (int i = lane; i < gs; i += 32) {
            const int e = g * gs + i;
            const uint32_t kk = key0(e);
            const bool ok = kk < lk || (kk == lk && e > li);
            if (ok && kk > bk) bk = kk, bi = e;
          }
          warp_argmax(bk, bi);
          s = __fadd_rn(s, key_value(bk));
          lk = bk, li = bi;
        }
        if (lane == 0) gscore[g] = s;
      }
      __syncthreads();
      block_select(
          num_groups, p.group_topk, [&](int g) { return select_key(gscore[g]); }, hist, res, &gtau, &glast);
    }
    auto key = [&](int e) {
      const uint32_t kk = key0(e);
      if (!groups) return kk;
      const int g = e / lay.group_size;
      const uint32_t gk = select_key(gscore[g]);
      return (gk > gtau || (gk == gtau && g <= glast)) ? kk : kKeyNone;
    };
    if (kCache && groups) {
      for (int e = threadIdx.x; e < E; e += blockDim.x) kcache[e] = key(e);  // each thread its own entries
      __syncthreads();
    }
    auto final_key = [&](int e) { return (kCache && groups) ? kcache[e] : key(e); };

    // 3. top-k.
    uint32_t tau;
    int last;
    block_select(E, k, final_key, hist, res, &tau, &last);
    auto chosen = [&](int e) {
      const uint32_t kk = final_key(e);
      return kk > tau || (kk == tau && e <= last);
    };

    // 4. weights.
    float wm = 0.0f, ws = 1.0f;
    if (post) {
      float m = -INFINITY;
      for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (chosen(e)) m = fmaxf(m, score(e));
      wm = block_max_f32(m, scratch);
      float s = 0.0f;
      for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (chosen(e)) s = __fadd_rn(s, expf(score(e) - wm));
      ws = block_sum_f32(s, scratch);
    } else if (!aux && norm) {
      float s = 0.0f;
      for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (chosen(e)) s = __fadd_rn(s, score(e));
      ws = __fadd_rn(block_sum_f32(s, scratch), kNormEpsilon);
    }
    auto weight = [&](int e) {  // unscaled
      const float v = score(e);
      if (post) return expf(v - wm) / ws;
      if (!aux && norm) return v / ws;
      return v;
    };

    // 5. outputs.
    const bool bytemap = p.routing_map != nullptr && p.map_format == MapFormat::kBytemap;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      const bool c = chosen(e);
      const float w = c ? weight(e) : 0.0f;
      if (!aux && p.probs != nullptr) p.probs[row + e] = c ? __fmul_rn(w, scale) : 0.0f;
      if (post && p.saved != nullptr) p.saved[row + e] = c ? w : -INFINITY;
      if (bytemap) p.routing_map[row + e] = c ? 1 : 0;
    }
    if (p.routing_map != nullptr && p.map_format == MapFormat::kBitmap) {
      const int nb = map_bytes_of(E);
      for (int j = threadIdx.x; j < nb; j += blockDim.x) {
        uint32_t byte = 0u;
        for (int b = 0; b < 8 && 8 * j + b < E; ++b) byte |= static_cast<uint32_t>(chosen(8 * j + b)) << b;
        p.routing_map[t * nb + j] = static_cast<uint8_t>(byte);
      }
    }
    if (p.topk_indices != nullptr || p.topk_weights != nullptr) {
      const int chunk = (E + blockDim.x - 1) / blockDim.x;
      const int lo = min(E, static_cast<int>(threadIdx.x) * chunk), hi = min(E, lo + chunk);
      int cnt = 0;
      for (int e = lo; e < hi; ++e) cnt += chosen(e);
      int pos = block_exclusive_scan(cnt, reinterpret_cast<int*>(hist));
      for (int e = lo; e < hi; ++e)
        if (chosen(e)) {
          if (p.topk_indices != nullptr) p.topk_indices[t * k + pos] = e;
          if (p.topk_weights != nullptr) p.topk_weights[t * k + pos] = __fmul_rn(weight(e), scale);
          ++pos;
        }
    }
    if (p.num_ranks > 0) {
      const int W = p.num_ranks, L = lay.experts_per_rank;
      for (int j = threadIdx.x; j < lay.mask_bytes; j += blockDim.x) {
        uint32_t byte = 0u;
        for (int b = 0; b < 8 && 8 * j + b < W; ++b) {
          const int r = 8 * j + b;
          bool any = false;
          for (int e = r * L; e < (r + 1) * L && !any; ++e) any = chosen(e);
          if (any) {
            byte |= 1u << b;
            if (p.rank_counts != nullptr) atomicAdd(p.rank_counts + r, 1);
          }
        }
        if (p.rank_mask != nullptr) p.rank_mask[t * lay.mask_bytes + j] = static_cast<uint8_t>(byte);
      }
    }
    __syncthreads();  // shared memory (cache, group scores, scratch) is reused by the next token
  }
}

}  // namespace

cudaError_t router_forward_max_groups(int* max_groups) {
  int optin = 0;
  const cudaError_t err = smem_optin_bytes(&optin);
  if (err != cudaSuccess) return err;
  *max_groups = optin / static_cast<int>(sizeof(uint32_t)) - kHeaderWords;
  return cudaSuccess;
}

cudaError_t launch_router_forward_generic(const RouterForwardParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0) return cudaSuccess;
  GenLayout lay{};
  const bool groups = p.mode == RouterMode::kTopk && p.num_groups > 0;
  lay.group_size = groups ? p.num_experts / p.num_groups : 0;
  lay.per_group = groups ? p.topk / p.group_topk : 0;
  lay.mask_bytes = p.num_ranks > 0 ? map_bytes_of(p.num_ranks) : 0;
  lay.experts_per_rank = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 1;

  int sms = 0, optin = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  err = smem_optin_bytes(&optin);
  if (err != cudaSuccess) return err;
  const size_t header = sizeof(uint32_t) * (kHeaderWords + static_cast<size_t>(groups ? p.num_groups : 0));
  const size_t with_cache = header + sizeof(uint32_t) * static_cast<size_t>(p.num_experts);
  // Group scores must fit in shared memory (num_groups up to ~56K on H100); the key cache is optional.
  if (header > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
  const bool cache = with_cache <= static_cast<size_t>(optin);
  const size_t smem = cache ? with_cache : header;
  auto* kern = cache ? &router_forward_generic<true> : &router_forward_generic<false>;
  if (smem > 48 * 1024) {
    err = raise_dynamic_smem(reinterpret_cast<const void*>(kern), smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t want = static_cast<int64_t>(sms) * 8;
  const unsigned grid = static_cast<unsigned>(p.num_tokens < want ? p.num_tokens : want);
  return launch_maybe_dependent(p.pdl, kern, dim3(grid), dim3(kThreads), smem, stream, p, lay);
}

}  // namespace bitep::kernels
