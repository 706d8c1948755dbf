// SPDX-License-Identifier: Apache-2.0
// fp64 brute-force router: full sorts, no shortcuts, written from the definition in DESIGN.md.
#include "tests/reference/router_reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>

namespace bitep::ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kEps = 1e-20;

// Larger first, ties to the lower index, NaN last.
bool before(double a, int ia, double b, int ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na || nb) return na == nb ? ia < ib : nb;
  if (a != b) return a > b;
  return ia < ib;
}

// All of `ids` sorted by `v` in selection order.
std::vector<int> ranked(const std::vector<double>& v, std::vector<int> ids) {
  std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return before(v[a], a, v[b], b); });
  return ids;
}

// Gap between the last kept and the first dropped value of a ranking (inf when nothing is dropped
// or a value is not finite).
double boundary_gap(const std::vector<double>& v, const std::vector<int>& order, int kept) {
  if (kept >= static_cast<int>(order.size())) return kInf;
  const double a = v[order[kept - 1]], b = v[order[kept]];
  if (!std::isfinite(a) || !std::isfinite(b)) return kInf;
  return (a - b) / std::max({std::fabs(a), std::fabs(b), 1e-30});
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
// sqrtsoftplus'(x) = sigmoid(x) / (2 sqrt(softplus(x))); below -40 it is e^(x / 2) / 2 to double rounding (e^x <
// 2^-57), which stays finite where the quotient is 0 / 0 (x = -inf).
double sqrtsoftplus_grad(double x) {
  return x < -40.0 ? 0.5 * std::exp(0.5 * x) : sigmoid(x) / (2.0 * std::sqrt(softplus(x)));
}

void softmax(std::vector<double>& v) {
  double m = -kInf;
  for (double x : v) m = std::fmax(m, x);
  double s = 0.0;
  for (double& x : v) s += (x = std::exp(x - m));
  for (double& x : v) x /= s;
}

uint16_t u16(const void* p, size_t i) { return static_cast<const uint16_t*>(p)[i]; }

}  // namespace

std::vector<double> to_double(const void* data, bitepDataType_t dtype, size_t n) {
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (dtype == bitepFloat32) {
      out[i] = static_cast<const float*>(data)[i];
    } else if (dtype == bitepBfloat16) {
      uint32_t u = static_cast<uint32_t>(u16(data, i)) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      out[i] = f;
    } else {  // fp16, exact: sign * mantissa * 2^exp
      const uint16_t h = u16(data, i);
      const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
      const double sign = (h & 0x8000) ? -1.0 : 1.0;
      if (e == 0x1f)
        out[i] = m ? std::numeric_limits<double>::quiet_NaN() : sign * kInf;
      else if (e == 0)
        out[i] = sign * std::ldexp(m, -24);
      else
        out[i] = sign * std::ldexp(m + 1024, e - 25);
    }
  }
  return out;
}

namespace {

// A token's scores s (the score function, softmax over all for the pre-top-k softmax and the aux scores,
// the aux scores normalised) and TE's saved tensor before the selection.
void token_scores(
    const bitepRouterConfig_t& cfg, const double* x, bool aux, std::vector<double>* s, std::vector<double>* saved) {
  const int E = cfg.num_experts, k = cfg.topk;
  const bool softmax_fn = cfg.score_function == bitepScoreSoftmax;
  const bool pre = softmax_fn && (aux || cfg.use_pre_softmax);
  s->assign(E, 0.0);
  saved->assign(E, -kInf);
  for (int e = 0; e < E; ++e) {
    if (cfg.score_function == bitepScoreSigmoid)
      (*s)[e] = sigmoid(x[e]);
    else if (cfg.score_function == bitepScoreSqrtSoftplus)
      (*s)[e] = std::sqrt(softplus(x[e]));
    else
      (*s)[e] = x[e];
  }
  if (pre) softmax(*s);
  if (aux && !softmax_fn && k > 1) {
    double sum = 0.0;
    for (double v : *s) sum += v;
    for (double& v : *s) v /= (sum + kEps);
  }
  for (int e = 0; e < E; ++e) {
    if (cfg.score_function == bitepScoreSqrtSoftplus)
      (*saved)[e] = x[e];
    else if (cfg.score_function == bitepScoreSigmoid)
      (*saved)[e] = sigmoid(x[e]);
    else if (pre)
      (*saved)[e] = (*s)[e];
  }
}

// The weights of the chosen experts (ascending) from the scores; the post-top-k softmax also writes its
// values into saved.
std::vector<double> token_weights(const bitepRouterConfig_t& cfg,
                                  const std::vector<double>& s,
                                  const std::vector<int>& chosen,
                                  bool aux,
                                  std::vector<double>* saved) {
  const int k = static_cast<int>(chosen.size());
  const bool softmax_fn = cfg.score_function == bitepScoreSoftmax;
  std::vector<double> w(k);
  for (int j = 0; j < k; ++j) w[j] = s[chosen[j]];
  if (aux) return w;
  if (softmax_fn && !cfg.use_pre_softmax) {
    softmax(w);
    for (int j = 0; j < k; ++j) (*saved)[chosen[j]] = w[j];
  } else if (!softmax_fn && k > 1) {
    double sum = 0.0;
    for (double v : w) sum += v;
    for (double& v : w) v /= (sum + kEps);
  }
  for (double& v : w) v *= cfg.scaling_factor;
  return w;
}

// Selection scores: the scores plus the expert bias (not for softmax, nor for the aux scores).
std::vector<double> selection(const bitepRouterConfig_t& cfg,
                              const std::vector<double>& s,
                              const float* expert_bias,
                              bool aux) {
  std::vector<double> sel(s);
  if (!aux && expert_bias && cfg.score_function != bitepScoreSoftmax)
    for (size_t e = 0; e < sel.size(); ++e) sel[e] += expert_bias[e];
  return sel;
}

// Group scores of group-limited routing: the sum of each group's best k / group_topk selection scores.
std::vector<double> group_scores(const bitepRouterConfig_t& cfg, const std::vector<double>& sel) {
  const int G = cfg.num_groups, gs = cfg.num_experts / G, per = cfg.topk / cfg.group_topk;
  std::vector<double> gscore(G);
  for (int g = 0; g < G; ++g) {
    std::vector<int> ids(gs);
    std::iota(ids.begin(), ids.end(), g * gs);
    ids = ranked(sel, ids);
    double sum = 0.0;
    for (int j = 0; j < per; ++j) sum += sel[ids[j]];
    gscore[g] = sum;
  }
  return gscore;
}

}  // namespace

Forward router_forward(
    const bitepRouterConfig_t& cfg, int64_t T, const std::vector<double>& logits, const float* expert_bias, bool aux) {
  const int E = cfg.num_experts, k = cfg.topk;
  Forward f;
  f.probs.assign(T * E, 0.0);
  f.bytemap.assign(T * E, 0);
  f.indices.assign(T * k, 0);
  f.weights.assign(T * k, 0.0);
  f.saved.assign(T * E, -kInf);
  f.sel.assign(T * E, 0.0);
  f.margin.assign(T, kInf);
  std::vector<int> all(E);
  std::iota(all.begin(), all.end(), 0);
  std::vector<double> s, saved;
  for (int64_t t = 0; t < T; ++t) {
    token_scores(cfg, &logits[t * E], aux, &s, &saved);
    const std::vector<double> sel = selection(cfg, s, expert_bias, aux);
    std::copy(sel.begin(), sel.end(), f.sel.begin() + t * E);

    std::vector<int> cand = all;
    double margin = kInf;
    if (!aux && cfg.num_groups > 0) {
      const int gs = E / cfg.num_groups;
      const std::vector<double> gscore = group_scores(cfg, sel);
      std::vector<int> gids(cfg.num_groups);
      std::iota(gids.begin(), gids.end(), 0);
      gids = ranked(gscore, gids);
      margin = std::min(margin, boundary_gap(gscore, gids, cfg.group_topk));
      cand.clear();
      for (int j = 0; j < cfg.group_topk; ++j)
        for (int e = gids[j] * gs; e < (gids[j] + 1) * gs; ++e) cand.push_back(e);
    }
    std::vector<int> order = ranked(sel, cand);
    margin = std::min(margin, boundary_gap(sel, order, k));
    f.margin[t] = margin;
    std::vector<int> chosen(order.begin(), order.begin() + k);
    std::sort(chosen.begin(), chosen.end());

    const std::vector<double> w = token_weights(cfg, s, chosen, aux, &saved);
    std::copy(saved.begin(), saved.end(), f.saved.begin() + t * E);
    for (int j = 0; j < k; ++j) {
      f.indices[t * k + j] = chosen[j];
      f.weights[t * k + j] = w[j];
      f.bytemap[t * E + chosen[j]] = 1;
      if (!aux) f.probs[t * E + chosen[j]] = w[j];
    }
    if (aux) std::copy(s.begin(), s.end(), f.probs.begin() + t * E);
  }
  return f;
}

TokenValues token_values(const bitepRouterConfig_t& cfg,
                         const double* x,
                         const float* expert_bias,
                         const std::vector<int>& chosen,
                         bool aux) {
  const int E = cfg.num_experts;
  TokenValues v;
  std::vector<double> s;
  token_scores(cfg, x, aux, &s, &v.saved);
  v.sel = selection(cfg, s, expert_bias, aux);
  v.weights = token_weights(cfg, s, chosen, aux, &v.saved);
  v.probs.assign(E, 0.0);
  if (aux)
    v.probs = s;
  else
    for (size_t j = 0; j < chosen.size(); ++j) v.probs[chosen[j]] = v.weights[j];
  return v;
}

bool near_tie_selection(const bitepRouterConfig_t& cfg,
                        const std::vector<double>& sel,
                        const std::vector<int>& chosen,
                        bool aux,
                        double tol,
                        std::string* why) {
  const int E = cfg.num_experts, k = cfg.topk;
  auto fail = [&](const std::string& m) {
    if (why) *why = m;
    return false;
  };
  if (static_cast<int>(chosen.size()) != k)
    return fail(std::to_string(chosen.size()) + " experts, expected " + std::to_string(k));
  for (int j = 0; j < k; ++j)
    if (chosen[j] < 0 || chosen[j] >= E || (j > 0 && chosen[j] <= chosen[j - 1]))
      return fail("experts not distinct, ascending and in [0, E)");
  for (double v : sel)
    if (!std::isfinite(v)) return fail("a selection score is not finite: no rounding excuse");
  // b is below a by rounding at most: a >= b - tol * scale.
  auto not_below = [&](double a, double b) { return a >= b - tol * std::max({std::fabs(a), std::fabs(b), 1e-30}); };
  std::vector<char> in(E, 0), cand(E, 1);
  for (int e : chosen) in[e] = 1;
  if (!aux && cfg.num_groups > 0) {
    const int G = cfg.num_groups, gs = E / G;
    const std::vector<double> gscore = group_scores(cfg, sel);
    std::vector<int> gids(G);
    std::iota(gids.begin(), gids.end(), 0);
    gids = ranked(gscore, gids);
    const double cut = gscore[gids[cfg.group_topk - 1]];
    std::vector<char> used(G, 0);
    int nused = 0;
    for (int e : chosen) nused += !used[e / gs], used[e / gs] = 1;
    if (nused > cfg.group_topk) return fail("experts from " + std::to_string(nused) + " groups, at most group_topk");
    // Each used group within rounding of the group_topk-th group score; the groups clearly above it must all
    // have been taken, so that their experts compete below.
    for (int g = 0; g < G; ++g) {
      if (used[g] && !not_below(gscore[g], cut))
        return fail("group " + std::to_string(g) + " is not among the top groups, even within rounding");
      if (!not_below(cut, gscore[g])) used[g] = 1;
    }
    int taken = 0;  // the groups this selection must have taken: those it used and those clearly above
    for (int g = 0; g < G; ++g) taken += used[g];
    if (taken > cfg.group_topk)
      return fail(std::to_string(taken) + " groups used or clearly above the cut, more than group_topk");
    for (int e = 0; e < E; ++e) cand[e] = used[e / gs];
    // Fewer: the other groups taken gave no expert, so there must be that many groups at the cut whose experts
    // all lose to every chosen one, up to rounding.
    int spare = 0;
    for (int g = 0; g < G && taken + spare < cfg.group_topk; ++g) {
      if (used[g] || !not_below(gscore[g], cut)) continue;
      bool loses = true;
      for (int u = g * gs; u < (g + 1) * gs && loses; ++u)
        for (int c : chosen) loses = loses && not_below(sel[c], sel[u]);
      spare += loses;
    }
    if (taken + spare < cfg.group_topk)
      return fail("experts from " + std::to_string(taken) +
                  " groups, and no group at the cut that could have given none");
  }
  // Within the candidates every chosen expert is at least every dropped one, up to rounding.
  for (int c : chosen)
    for (int u = 0; u < E; ++u)
      if (cand[u] && !in[u] && !not_below(sel[c], sel[u]))
        return fail("expert " + std::to_string(c) + " chosen over " + std::to_string(u) + " beyond rounding");
  return true;
}

std::vector<double> router_backward(const bitepRouterConfig_t& cfg,
                                    int64_t T,
                                    const std::vector<double>& logits,
                                    const std::vector<uint8_t>& bytemap,
                                    const std::vector<double>& grad_probs,
                                    bool aux) {
  const int E = cfg.num_experts, k = cfg.topk;
  const bool softmax_fn = cfg.score_function == bitepScoreSoftmax;
  const bool pre = softmax_fn && (aux || cfg.use_pre_softmax);
  const double scale = aux ? 1.0 : cfg.scaling_factor;
  std::vector<double> out(T * E, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const double* x = &logits[t * E];
    std::vector<char> m(E);
    for (int e = 0; e < E; ++e) m[e] = aux ? 1 : bytemap[t * E + e];
    std::vector<double> g(E);
    for (int e = 0; e < E; ++e) g[e] = m[e] ? grad_probs[t * E + e] * scale : 0.0;
    std::vector<double> y(E);  // the score function's output
    for (int e = 0; e < E; ++e) {
      if (cfg.score_function == bitepScoreSigmoid)
        y[e] = sigmoid(x[e]);
      else if (cfg.score_function == bitepScoreSqrtSoftplus)
        y[e] = std::sqrt(softplus(x[e]));
      else
        y[e] = x[e];
    }
    if (!softmax_fn && k > 1) {  // d(y_i / (S + eps)) over the routed set
      double S = 0.0, dot = 0.0;
      for (int e = 0; e < E; ++e)
        if (m[e]) S += y[e], dot += g[e] * y[e];
      const double d = S + kEps;
      for (int e = 0; e < E; ++e) g[e] = m[e] ? g[e] / d - dot / (d * d) : 0.0;
    }
    if (softmax_fn) {
      std::vector<double> p;
      std::vector<int> ids;
      for (int e = 0; e < E; ++e)
        if (pre || m[e]) p.push_back(x[e]), ids.push_back(e);
      softmax(p);
      double dot = 0.0;
      for (size_t j = 0; j < ids.size(); ++j) dot += g[ids[j]] * p[j];
      std::vector<double> gn(E, 0.0);
      for (size_t j = 0; j < ids.size(); ++j) gn[ids[j]] = p[j] * (g[ids[j]] - dot);
      g = gn;
    }
    for (int e = 0; e < E; ++e) {
      if (cfg.score_function == bitepScoreSigmoid) g[e] *= y[e] * (1.0 - y[e]);
      if (cfg.score_function == bitepScoreSqrtSoftplus) g[e] *= sqrtsoftplus_grad(x[e]);
      out[t * E + e] = g[e];
    }
  }
  return out;
}

double aux_loss(int64_t T,
                int E,
                int k,
                int64_t total_tokens,
                double coeff,
                const std::vector<double>& probs,
                const std::vector<int32_t>& tokens_per_expert) {
  double total = 0.0;
  for (int e = 0; e < E; ++e) {
    double col = 0.0;
    for (int64_t t = 0; t < T; ++t) col += probs[t * E + e];
    total += col * tokens_per_expert[e];
  }
  const double n = static_cast<double>(total_tokens);
  return total * E * coeff / (k * n * n);
}

std::vector<uint8_t> pack_bitmap(const uint8_t* bytemap, int64_t T, int E) {
  const int B = (E + 7) / 8;
  std::vector<uint8_t> out(T * B, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e)
      if (bytemap[t * E + e]) out[t * B + e / 8] |= static_cast<uint8_t>(1u << (e % 8));
  return out;
}

namespace {
std::vector<int32_t> indices_from(
    int64_t T, int E, int k, std::string* error, const std::function<int(int64_t, int)>& bit) {
  std::vector<int32_t> out(T * k, -1);
  for (int64_t t = 0; t < T; ++t) {
    int n = 0;
    for (int e = 0; e < E; ++e) {
      const int b = bit(t, e);
      if (b < 0) {
        if (error && error->empty()) *error = "token " + std::to_string(t) + ": a pad bit or non-{0,1} byte is set";
        continue;
      }
      if (!b) continue;
      if (n < k) out[t * k + n] = e;
      ++n;
    }
    if (n != k && error && error->empty())
      *error =
          "token " + std::to_string(t) + " has " + std::to_string(n) + " experts set, expected " + std::to_string(k);
  }
  return out;
}
}  // namespace

std::vector<int32_t> indices_from_bytemap(const uint8_t* bytemap, int64_t T, int E, int k, std::string* error) {
  return indices_from(T, E, k, error, [&](int64_t t, int e) {
    const uint8_t v = bytemap[t * E + e];
    return v > 1 ? -1 : static_cast<int>(v);
  });
}

std::vector<int32_t> indices_from_bitmap(const uint8_t* bitmap, int64_t T, int E, int k, std::string* error) {
  const int B = (E + 7) / 8;
  std::string pad_error;
  for (int64_t t = 0; t < T && pad_error.empty(); ++t)
    if (E % 8 != 0 && (bitmap[t * B + B - 1] >> (E % 8)) != 0)
      pad_error = "token " + std::to_string(t) + ": a pad bit past expert " + std::to_string(E - 1) + " is set";
  auto out = indices_from(T, E, k, error, [&](int64_t t, int e) { return (bitmap[t * B + e / 8] >> (e % 8)) & 1; });
  if (error && error->empty()) *error = pad_error;
  return out;
}

MapCompare compare_indices(const Forward& ref, const std::vector<int32_t>& got, int64_t T, int k, double tol) {
  MapCompare c;
  for (int64_t t = 0; t < T; ++t) {
    if (std::equal(got.begin() + t * k, got.begin() + (t + 1) * k, ref.indices.begin() + t * k)) continue;
    ++c.differing_tokens;
    const double m = ref.margin[t];
    if (m > 0.0 && m < tol) {
      ++c.near_ties;
    } else if (c.first_unexplained.empty()) {
      std::ostringstream os;
      os << "token " << t << ": got {";
      for (int j = 0; j < k; ++j) os << (j ? "," : "") << got[t * k + j];
      os << "} expected {";
      for (int j = 0; j < k; ++j) os << (j ? "," : "") << ref.indices[t * k + j];
      os << "}, selection margin " << m << " (not a near-tie under " << tol << ")";
      c.first_unexplained = os.str();
    }
  }
  return c;
}

double max_row_rel_err(const std::vector<double>& ref,
                       const float* got,
                       int64_t T,
                       int width,
                       const std::vector<char>& rows_to_check,
                       double floor) {
  double worst = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    if (!rows_to_check.empty() && !rows_to_check[t]) continue;
    double num = 0.0, den = 0.0;
    for (int i = 0; i < width; ++i) {
      const double r = ref[t * width + i], g = got[t * width + i];
      if (std::isinf(r) && g == r) continue;
      const double d = g - r;
      num += std::isnan(d) ? kInf : d * d;
      den += r * r;
    }
    worst = std::max(worst, std::sqrt(num) / std::max(std::sqrt(den), floor));
  }
  return worst;
}

std::vector<double> grad_scale(const bitepRouterConfig_t& c,
                               int64_t T,
                               const std::vector<double>& x,
                               const std::vector<uint8_t>& bytemap,
                               const std::vector<float>& gp,
                               bool aux,
                               std::vector<double>* into_sigmoid) {
  const int E = c.num_experts, k = c.topk;
  const bool softmax = c.score_function == bitepScoreSoftmax, pre = softmax && (aux || c.use_pre_softmax);
  const double scale = aux ? 1.0 : c.scaling_factor;
  std::vector<double> out(static_cast<size_t>(T) * E, 0.0);
  if (into_sigmoid != nullptr) into_sigmoid->assign(static_cast<size_t>(T) * E, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const double* xr = &x[t * E];
    double* m = &out[t * E];
    std::vector<char> routed(E);
    std::vector<double> g(E);
    for (int e = 0; e < E; ++e) {
      routed[e] = aux || bytemap[t * E + e];
      g[e] = routed[e] ? std::fabs(gp[t * E + e] * scale) : 0.0;
    }
    if (softmax) {
      double mx = -INFINITY, s = 0.0, S = 0.0;
      std::vector<double> a(E, 0.0);
      for (int e = 0; e < E; ++e)
        if (pre || routed[e]) mx = std::fmax(mx, xr[e]);
      for (int e = 0; e < E; ++e)
        if (pre || routed[e]) s += (a[e] = std::exp(xr[e] - mx));
      for (int e = 0; e < E; ++e) a[e] /= s, S += g[e] * a[e];
      for (int e = 0; e < E; ++e) m[e] = (pre || routed[e]) ? a[e] * (g[e] + S) : 0.0;
      continue;
    }
    std::vector<double> y(E), dv(E);
    for (int e = 0; e < E; ++e) {
      const double sg = 1.0 / (1.0 + std::exp(-xr[e]));
      if (c.score_function == bitepScoreSigmoid) {
        y[e] = sg, dv[e] = sg * (1.0 - sg);
      } else {
        y[e] = std::sqrt(softplus(xr[e]));
        dv[e] = sqrtsoftplus_grad(xr[e]);
      }
    }
    if (k > 1) {
      double d = 1e-20, S = 0.0;
      for (int e = 0; e < E; ++e)
        if (routed[e]) d += y[e];
      for (int e = 0; e < E; ++e)
        if (routed[e]) S += g[e] * y[e] / d;
      for (int e = 0; e < E; ++e) m[e] = routed[e] ? (g[e] + S) / d * std::fabs(dv[e]) : 0.0;
      if (into_sigmoid != nullptr && c.score_function == bitepScoreSigmoid)
        for (int e = 0; e < E; ++e) (*into_sigmoid)[t * E + e] = routed[e] ? (g[e] + S) / d : 0.0;
    } else {
      for (int e = 0; e < E; ++e) m[e] = g[e] * std::fabs(dv[e]);
      if (into_sigmoid != nullptr && c.score_function == bitepScoreSigmoid)
        for (int e = 0; e < E; ++e) (*into_sigmoid)[t * E + e] = g[e];
    }
  }
  return out;
}

}  // namespace bitep::ref
