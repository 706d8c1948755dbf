// SPDX-License-Identifier: Apache-2.0
// Router parameters shared by the host reference (src/host/router_host.cc) and the CUDA kernels
// (kernels/router_topk*.cu, router_backward*.cu). Plain C++: no CUDA types. All pointers live on the backend's memory.
#pragma once

#include <cstdint>

namespace bitep::kernels {

enum class ScoreFn : int { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum class MapFormat : int { kNone = 0, kBytemap = 1, kBitmap = 2 };

// Which router function: TE's fused top-k router, or TE's aux-loss score function (scores over all
// experts, normalised over all E for sigmoid/sqrtsoftplus when k > 1; no groups, bias, scaling).
enum class RouterMode : int { kTopk = 0, kAuxScores = 1 };

constexpr float kNormEpsilon = 1e-20f;  // TE's epsilon in the sigmoid/sqrtsoftplus normalisation
// Below it sqrtsoftplus'(x) is e^(x / 2) / 2 (router_common.cuh's sqrtsoftplus_grad_f).
constexpr float kSqrtSoftplusTail = -20.0f;

struct RouterForwardParams {
  RouterMode mode = RouterMode::kTopk;
  int64_t num_tokens = 0;
  int num_experts = 0;
  int topk = 0;
  ScoreFn score_fn = ScoreFn::kSoftmax;
  bool use_pre_softmax = false;
  int num_groups = 0;  // 0: no group-limited routing
  int group_topk = 0;
  float scaling_factor = 1.0f;
  DType logits_dtype = DType::kF32;

  const void* logits = nullptr;        // [num_tokens, num_experts] logits_dtype
  const float* expert_bias = nullptr;  // [num_experts] or null (sigmoid/sqrtsoftplus only)
  float* probs = nullptr;              // [num_tokens, num_experts] fp32 or null (kAuxScores: the scores)
  uint8_t* routing_map = nullptr;      // BYTEMAP [T, E] or BITMAP_U8 [T, ceil(E/8)] or null
  MapFormat map_format = MapFormat::kNone;
  float* topk_weights = nullptr;    // [num_tokens, topk] or null, ascending expert order
  int32_t* topk_indices = nullptr;  // [num_tokens, topk] or null, ascending
  float* saved = nullptr;           // [num_tokens, num_experts] fp32 or null
  int num_ranks = 0;                // dispatch layout epilogue, 0 = off
  uint8_t* rank_mask = nullptr;     // [num_tokens, ceil(num_ranks/8)] or null
  int32_t* rank_counts = nullptr;   // [num_ranks] or null (overwritten)
  bool spec_kernels = true;         // the score paths' own kernels where they exist (false: the any-path ones)
  // The post-top-k softmax at E 65-256 runs at two octets a lane (half the lanes a token) from this many tokens on
  // (router_topk_spec.cuh two_octet_post); -1: 64 x the device's SMs.
  int two_octet_min_tokens = -1;
  // The post-top-k softmax at E 129-2048 takes its instance with longer lane caches from this k on
  // (router_topk_spec.cuh many_wins_post); -1: many_wins_min_topk(E, fp32 logits).
  int many_wins_min_topk = -1;
  // E a multiple of 8 below the bucket's width takes the pre-top-k softmax's and the normalised sigmoid's instances for
  // whole octets (router_topk_spec.cuh whole_octets_kernel); false: their general body, as before them.
  bool whole_octets = true;
  // Launched dependent on the kernel before it on the stream (BITEP_LAUNCH_PDL; device_info.cuh
  // launch_maybe_dependent): every kernel waits for that one before it touches memory.
  bool pdl = false;
};

// The k from which the post-top-k softmax at 32 lanes a token takes its many-wins instance by default, by octets a lane
// and, where the sweeps split them, by the logits' dtype (the keys each instance caches: router_topk_select.cuh
// cache_size; the sweeps: router_topk_spec.cuh many_wins_post and bench/NOTES.md, "Router v45" to "v47"). No such
// instance at 128 experts or fewer (a k past any E): there several tokens share a warp.
constexpr int many_wins_min_topk(int num_experts, bool f32_logits) {
  if (num_experts > 1024) return 21;
  if (num_experts > 512) return f32_logits ? 16 : 31;
  if (num_experts > 256) return 12;
  if (num_experts > 128) return f32_logits ? 16 : 12;
  return num_experts + 1;
}

struct RouterBackwardParams {
  RouterMode mode = RouterMode::kTopk;
  int64_t num_tokens = 0;
  int num_experts = 0;
  int topk = 0;
  ScoreFn score_fn = ScoreFn::kSoftmax;
  bool use_pre_softmax = false;
  float scaling_factor = 1.0f;
  DType logits_dtype = DType::kF32;

  const float* grad_probs = nullptr;     // [T, E] fp32
  const uint8_t* routing_map = nullptr;  // [T, E] BYTEMAP or [T, ceil(E/8)] BITMAP_U8 (kTopk only)
  MapFormat map_format = MapFormat::kNone;
  const float* saved = nullptr;  // [T, E] forward's saved tensor, or null: recompute from logits
  const void* logits = nullptr;  // [T, E] logits_dtype (used when saved is null)
  void* grad_logits = nullptr;   // [T, E] logits_dtype
  bool spec_kernels = true;      // as RouterForwardParams::spec_kernels
  bool pdl = false;              // as RouterForwardParams::pdl
};

struct AuxLossParams {
  int64_t num_tokens = 0;
  int num_experts = 0;
  int topk = 0;
  int64_t total_num_tokens = 0;
  float coeff = 0.0f;
  const float* probs = nullptr;                // [T, E]
  const int32_t* tokens_per_expert = nullptr;  // [E]
  float* loss = nullptr;                       // [1]
  const float* grad_loss = nullptr;            // [1]
  float* grad_probs = nullptr;                 // [T, E]
  bool pdl = false;                            // as RouterForwardParams::pdl
};

// C = E * coeff / (k * N * N), TE's aux-loss coefficient, in fp32 as TE computes it.
inline float aux_loss_scale(const AuxLossParams& p) {
  double n = static_cast<double>(p.total_num_tokens);
  return static_cast<float>(static_cast<double>(p.num_experts) * p.coeff / (static_cast<double>(p.topk) * n * n));
}

inline int bitmap_bytes(int num_bits) { return (num_bits + 7) / 8; }

#if defined(__CUDACC__)
#define BITEP_HOST_DEVICE __host__ __device__
#else
#define BITEP_HOST_DEVICE
#endif

// The steps a call's scores take, derived from its parameters here once for every kernel and the host
// reference (RouterForwardParams or RouterBackwardParams).
struct ScorePath {
  bool aux;      // aux-loss scores (RouterMode::kAuxScores)
  bool softmax;  // score_fn is softmax
  bool pre;      // softmax over all experts before the top-k (use_pre_softmax, or aux scores)
  bool post;     // softmax over the selected experts only (post-top-k)
  bool norm;     // sigmoid / sqrtsoftplus outputs normalised over the selected (aux: all E) when k > 1
};

// A top-k router's path with the post-top-k softmax (TE's default): the kernels compiled for it.
constexpr ScorePath kPostSoftmaxPath{false, true, false, true, false};

template <class Params>
BITEP_HOST_DEVICE inline ScorePath score_path(const Params& p) {
  ScorePath s{};
  s.aux = p.mode == RouterMode::kAuxScores;
  s.softmax = p.score_fn == ScoreFn::kSoftmax;
  s.pre = s.softmax && (s.aux || p.use_pre_softmax);
  s.post = s.softmax && !s.pre;
  s.norm = !s.softmax && p.topk > 1;
  return s;
}

// expert_bias joins the selection scores (sigmoid / sqrtsoftplus top-k only, never the weights).
BITEP_HOST_DEVICE inline bool selection_bias(const RouterForwardParams& p) {
  return p.mode == RouterMode::kTopk && p.expert_bias != nullptr && p.score_fn != ScoreFn::kSoftmax;
}

}  // namespace bitep::kernels
