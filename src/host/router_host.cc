// SPDX-License-Identifier: Apache-2.0
// Host reference router: the semantics every backend implements, in fp32, one token at a time.
#include "src/host/router_host.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "src/host/dtype_host.h"

namespace bitep::host {
namespace {

using kernels::DType;
using kernels::MapFormat;
using kernels::RouterMode;
using kernels::ScoreFn;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Selection order: larger first; equal values go to the lower index; NaN ranks below everything.
inline bool ranks_before(float a, int ia, float b, int ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na || nb) return na == nb ? ia < ib : nb;
  if (a != b) return a > b;
  return ia < ib;
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }
// sigmoid'(x) from x as t / (1 + t)^2, t = exp(-|x|): no cancellation (kernels/router_common.cuh).
inline float sigmoid_gradf(float x) {
  const float t = std::exp(-std::fabs(x)), u = 1.0f + t;
  return t / (u * u);
}
inline float softplusf(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
inline float sqrtsoftplusf(float x) { return std::sqrt(softplusf(x)); }
// sqrtsoftplus'(x), finite down to x = -inf (kernels/router_common.cuh's sqrtsoftplus_grad_f).
inline float sqrtsoftplus_gradf(float x) {
  if (x < kernels::kSqrtSoftplusTail) return 0.5f * std::exp(0.5f * x);
  return sigmoidf(x) / (2.0f * sqrtsoftplusf(x));
}

// The sum of fp32 values accumulated in fp64 and rounded once: the reference's row sums (softmax, normalisations,
// their backward's dot products) within half an fp32 ulp of exact, where an fp32 running sum drifts with the row's
// length (~1e-5 relative over 2048 similar values, past the GPU tests' 1e-6).
struct RowSum {
  double s = 0.0;
  void add(float v) { s += v; }
  void add(float a, float b) { s += static_cast<double>(a) * b; }
  float get() const { return static_cast<float>(s); }
};

// In-place softmax over v[idx[0..n)] (max-subtracted, fp32 exps, ascending order). flush: exps below FLT_MIN are 0, as
// the device's pre-top-k softmax takes them (kernels/router_common.cuh, softmax_exp).
void softmax_inplace(float* v, int n, bool flush = false) {
  float m = kNegInf;
  for (int i = 0; i < n; ++i) m = std::fmax(m, v[i]);
  RowSum sum;
  for (int i = 0; i < n; ++i) {
    v[i] = std::exp(v[i] - m);
    if (flush && v[i] < std::numeric_limits<float>::min()) v[i] = 0.0f;
    sum.add(v[i]);
  }
  const float s = sum.get();
  for (int i = 0; i < n; ++i) v[i] = v[i] / s;
}

// The k best of `cand` (expert ids) by `sel`, written to `out` in selection order.
void select_topk(const float* sel, std::vector<int>& cand, int k, int* out) {
  auto cmp = [sel](int a, int b) { return ranks_before(sel[a], a, sel[b], b); };
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), cmp);
  std::copy(cand.begin(), cand.begin() + k, out);
}

void load_row(const void* base, DType dt, int64_t offset, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = load_as_float(base, dt, offset + i);
}

bool map_bit(const uint8_t* map, MapFormat fmt, int64_t t, int e, int num_experts) {
  if (fmt == MapFormat::kBytemap) return map[t * num_experts + e] != 0;
  const int64_t row_bytes = kernels::bitmap_bytes(num_experts);
  return (map[t * row_bytes + e / 8] >> (e % 8)) & 1;
}

}  // namespace

void router_forward(const kernels::RouterForwardParams& p) {
  const int E = p.num_experts, k = p.topk;
  const kernels::ScorePath path = kernels::score_path(p);
  const bool aux = path.aux;
  std::vector<float> logits(E), scores(E), sel(E), vals(k);
  std::vector<int> cand, chosen(k), group_cand, chosen_groups;
  std::vector<float> group_score;
  const int row_bytes = kernels::bitmap_bytes(E);
  const int W = p.num_ranks;
  const int mask_bytes = W > 0 ? kernels::bitmap_bytes(W) : 0;
  if (p.rank_counts != nullptr) std::fill(p.rank_counts, p.rank_counts + W, 0);

  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t row = t * E;
    load_row(p.logits, p.logits_dtype, row, E, logits.data());

    // 1. score function over all experts (post-top-k softmax scores are the logits themselves).
    const bool pre_softmax = path.pre;
    for (int e = 0; e < E; ++e) {
      float x = logits[e];
      switch (p.score_fn) {
        case ScoreFn::kSoftmax:
          scores[e] = x;
          break;
        case ScoreFn::kSigmoid:
          scores[e] = sigmoidf(x);
          break;
        case ScoreFn::kSqrtSoftplus:
          scores[e] = sqrtsoftplusf(x);
          break;
      }
    }
    if (pre_softmax) softmax_inplace(scores.data(), E, true);
    if (aux && path.norm) {
      RowSum sum;
      for (int e = 0; e < E; ++e) sum.add(scores[e]);
      const float s = sum.get();
      for (int e = 0; e < E; ++e) scores[e] = scores[e] / (s + kernels::kNormEpsilon);
    }
    if (p.saved != nullptr) {
      float* sv = p.saved + row;
      for (int e = 0; e < E; ++e) {
        if (p.score_fn == ScoreFn::kSqrtSoftplus)
          sv[e] = logits[e];
        else if (p.score_fn == ScoreFn::kSigmoid)
          sv[e] = sigmoidf(logits[e]);
        else if (pre_softmax)
          sv[e] = scores[e];
        else
          sv[e] = kNegInf;  // post-top-k softmax: filled at the selected experts below
      }
    }

    // 2. selection scores: + expert_bias (sigmoid/sqrtsoftplus only, selection only).
    const bool use_bias = kernels::selection_bias(p);
    for (int e = 0; e < E; ++e) sel[e] = use_bias ? scores[e] + p.expert_bias[e] : scores[e];

    // 3. group-limited candidates.
    cand.clear();
    if (!aux && p.num_groups > 0) {
      const int G = p.num_groups, gs = E / G, per_group = k / p.group_topk;
      group_score.assign(G, 0.0f);
      std::vector<int> tmp(per_group);
      for (int g = 0; g < G; ++g) {
        group_cand.resize(gs);
        std::iota(group_cand.begin(), group_cand.end(), g * gs);
        select_topk(sel.data(), group_cand, per_group, tmp.data());
        float s = 0.0f;
        for (int j = 0; j < per_group; ++j) s += sel[tmp[j]];
        group_score[g] = s;
      }
      chosen_groups.resize(G);
      std::iota(chosen_groups.begin(), chosen_groups.end(), 0);
      std::vector<int> best(p.group_topk);
      select_topk(group_score.data(), chosen_groups, p.group_topk, best.data());
      std::sort(best.begin(), best.end());
      for (int g : best)
        for (int e = g * gs; e < (g + 1) * gs; ++e) cand.push_back(e);
    } else {
      cand.resize(E);
      std::iota(cand.begin(), cand.end(), 0);
    }

    // 4. top-k, then ascending expert order (the bitmap's order).
    select_topk(sel.data(), cand, k, chosen.data());
    std::sort(chosen.begin(), chosen.end());

    // 5. weights of the chosen experts.
    for (int j = 0; j < k; ++j) vals[j] = scores[chosen[j]];
    if (!aux) {
      if (path.post) {
        softmax_inplace(vals.data(), k);
        if (p.saved != nullptr)
          for (int j = 0; j < k; ++j) p.saved[row + chosen[j]] = vals[j];
      } else if (path.norm) {
        RowSum sum;
        for (int j = 0; j < k; ++j) sum.add(vals[j]);
        const float s = sum.get();
        for (int j = 0; j < k; ++j) vals[j] = vals[j] / (s + kernels::kNormEpsilon);
      }
      for (int j = 0; j < k; ++j) vals[j] = vals[j] * p.scaling_factor;
    }

    // 6. outputs.
    if (p.probs != nullptr) {
      float* pr = p.probs + row;
      if (aux) {
        std::copy(scores.begin(), scores.end(), pr);
      } else {
        std::fill(pr, pr + E, 0.0f);
        for (int j = 0; j < k; ++j) pr[chosen[j]] = vals[j];
      }
    }
    if (p.routing_map != nullptr) {
      if (p.map_format == MapFormat::kBytemap) {
        uint8_t* m = p.routing_map + row;
        std::memset(m, 0, E);
        for (int j = 0; j < k; ++j) m[chosen[j]] = 1;
      } else {
        uint8_t* m = p.routing_map + t * row_bytes;
        std::memset(m, 0, row_bytes);
        for (int j = 0; j < k; ++j) m[chosen[j] / 8] |= static_cast<uint8_t>(1u << (chosen[j] % 8));
      }
    }
    if (p.topk_weights != nullptr)
      for (int j = 0; j < k; ++j) p.topk_weights[t * k + j] = vals[j];
    if (p.topk_indices != nullptr)
      for (int j = 0; j < k; ++j) p.topk_indices[t * k + j] = chosen[j];
    if (W > 0) {
      const int L = E / W;
      uint8_t mask[64] = {0};  // up to 512 ranks per stack row; larger W uses the heap
      std::vector<uint8_t> big;
      uint8_t* mk = mask;
      if (mask_bytes > static_cast<int>(sizeof(mask))) {
        big.assign(mask_bytes, 0);
        mk = big.data();
      }
      for (int j = 0; j < k; ++j) {
        const int r = chosen[j] / L;
        if (!((mk[r / 8] >> (r % 8)) & 1)) {
          mk[r / 8] |= static_cast<uint8_t>(1u << (r % 8));
          if (p.rank_counts != nullptr) ++p.rank_counts[r];
        }
      }
      if (p.rank_mask != nullptr) std::memcpy(p.rank_mask + t * mask_bytes, mk, mask_bytes);
    }
  }
}

void router_backward(const kernels::RouterBackwardParams& p) {
  const int E = p.num_experts;
  const kernels::ScorePath path = kernels::score_path(p);
  const bool aux = path.aux;
  const bool pre_softmax = path.pre;
  std::vector<float> g(E), act(E), x(E);
  std::vector<char> routed(E);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t row = t * E;
    for (int e = 0; e < E; ++e) {
      g[e] = p.grad_probs[row + e];
      routed[e] = aux ? 1 : map_bit(p.routing_map, p.map_format, t, e, E);
    }
    // The forward's activation: from the saved tensor, or recomputed from the logits.
    if (p.saved != nullptr) {
      for (int e = 0; e < E; ++e) act[e] = p.saved[row + e];
      if (p.score_fn == ScoreFn::kSqrtSoftplus) x = act;  // saved holds the logits
    } else {
      load_row(p.logits, p.logits_dtype, row, E, x.data());
      if (p.score_fn == ScoreFn::kSigmoid) {
        for (int e = 0; e < E; ++e) act[e] = sigmoidf(x[e]);
      } else if (p.score_fn == ScoreFn::kSqrtSoftplus) {
        act = x;
      } else if (pre_softmax) {
        act = x;
        softmax_inplace(act.data(), E, true);
      } else {  // post-top-k softmax over the routed logits
        std::vector<float> v;
        for (int e = 0; e < E; ++e)
          if (routed[e]) v.push_back(x[e]);
        softmax_inplace(v.data(), static_cast<int>(v.size()));
        size_t j = 0;
        for (int e = 0; e < E; ++e) act[e] = routed[e] ? v[j++] : kNegInf;
      }
    }
    if (!aux)
      for (int e = 0; e < E; ++e) g[e] = routed[e] ? g[e] * p.scaling_factor : 0.0f;

    // Backward of the sigmoid/sqrtsoftplus normalisation (over the routed experts, or all E for aux).
    std::vector<float> y(E);  // sigmoid or sqrtsoftplus output
    if (p.score_fn == ScoreFn::kSigmoid) y = act;
    if (p.score_fn == ScoreFn::kSqrtSoftplus)
      for (int e = 0; e < E; ++e) y[e] = sqrtsoftplusf(x[e]);
    if (path.norm) {
      RowSum sum, dot_sum;
      for (int e = 0; e < E; ++e)
        if (routed[e]) {
          sum.add(y[e]);
          dot_sum.add(g[e], y[e]);
        }
      const float d = sum.get() + kernels::kNormEpsilon, dot = dot_sum.get();
      for (int e = 0; e < E; ++e) g[e] = routed[e] ? g[e] / d - dot / (d * d) : 0.0f;
    }
    // Softmax backward: over the routed experts (post top-k), or over all experts (pre top-k).
    if (p.score_fn == ScoreFn::kSoftmax) {
      RowSum dot_sum;
      for (int e = 0; e < E; ++e)
        if (routed[e] || pre_softmax) dot_sum.add(g[e], act[e]);
      const float dot = dot_sum.get();
      for (int e = 0; e < E; ++e) g[e] = (routed[e] || pre_softmax) ? act[e] * (g[e] - dot) : 0.0f;
    }
    if (p.score_fn == ScoreFn::kSigmoid) {  // recompute: from the logits, without cancellation in 1 - y
      for (int e = 0; e < E; ++e) g[e] = g[e] * (p.saved != nullptr ? y[e] * (1.0f - y[e]) : sigmoid_gradf(x[e]));
    }
    if (p.score_fn == ScoreFn::kSqrtSoftplus)
      for (int e = 0; e < E; ++e) g[e] = g[e] * sqrtsoftplus_gradf(x[e]);
    for (int e = 0; e < E; ++e) store_from_float(p.grad_logits, p.logits_dtype, row + e, g[e]);
  }
}

void aux_loss_forward(const kernels::AuxLossParams& p) {
  const int E = p.num_experts;
  double total = 0.0;
  for (int e = 0; e < E; ++e) {
    double col = 0.0;
    for (int64_t t = 0; t < p.num_tokens; ++t) col += p.probs[t * E + e];
    total += col * static_cast<double>(p.tokens_per_expert[e]);
  }
  p.loss[0] = static_cast<float>(total * static_cast<double>(kernels::aux_loss_scale(p)));
}

void aux_loss_backward(const kernels::AuxLossParams& p) {
  const int E = p.num_experts;
  const float c = kernels::aux_loss_scale(p) * p.grad_loss[0];
  for (int64_t t = 0; t < p.num_tokens; ++t)
    for (int e = 0; e < E; ++e) p.grad_probs[t * E + e] = c * static_cast<float>(p.tokens_per_expert[e]);
}

}  // namespace bitep::host
