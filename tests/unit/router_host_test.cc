// SPDX-License-Identifier: Apache-2.0
// Host reference router vs the fp64 brute-force definition (tests/reference), over a grid of shapes,
// score functions, options and logit dtypes; degenerate rows; gradients vs finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bitep/bitep.h"
#include "src/host/dtype_host.h"
#include "tests/reference/router_reference.h"

namespace {

using bitep::ref::Forward;

constexpr double kMapTol = 1e-5;  // relative selection gap under which fp32 rounding may reorder

struct Case {
  int64_t T;
  int E, k;
  bitepScoreFunction_t fn;
  bool pre, groups, bias;
  float scaling;
  bitepDataType_t dtype;
};

const char* dtype_name(bitepDataType_t dt) { return dt == bitepFloat32 ? "f32" : dt == bitepBfloat16 ? "bf16" : "f16"; }

std::string name(const Case& c) {
  const char* fn = c.fn == bitepScoreSoftmax   ? (c.pre ? "softmaxpre" : "softmax")
                   : c.fn == bitepScoreSigmoid ? "sigmoid"
                                               : "sqrtsoftplus";
  return "T" + std::to_string(c.T) + "_E" + std::to_string(c.E) + "_k" + std::to_string(c.k) + "_" + fn +
         (c.groups ? "_groups" : "") + (c.bias ? "_bias" : "") + (c.scaling != 1.0f ? "_scaled" : "") + "_" +
         dtype_name(c.dtype);
}

// Group settings valid for (E, k): the most groups in {8, 4, 2} that divide E and leave enough
// candidates; group_topk = half of them (at most k).
bool group_config(int E, int k, int* G, int* gk) {
  for (int g : {8, 4, 2}) {
    if (E % g) continue;
    const int gs = E / g;
    for (int top = std::min(g / 2, k); top >= 1; --top) {
      if (k / top >= 1 && k / top <= gs && k <= top * gs) {
        *G = g;
        *gk = top;
        return true;
      }
    }
  }
  return false;
}

bitepRouterConfig_t config_of(const Case& c) {
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = c.E;
  cfg.topk = c.k;
  cfg.score_function = c.fn;
  cfg.use_pre_softmax = c.pre;
  cfg.scaling_factor = c.scaling;
  cfg.logits_dtype = c.dtype;
  if (c.groups) group_config(c.E, c.k, &cfg.num_groups, &cfg.group_topk);
  return cfg;
}

bitep::kernels::DType kernel_dtype(bitepDataType_t dt) {
  return dt == bitepFloat32    ? bitep::kernels::DType::kF32
         : dt == bitepBfloat16 ? bitep::kernels::DType::kBF16
                               : bitep::kernels::DType::kF16;
}

// Logits in the case's dtype: normal(0, 2) from a seed, as raw bytes.
std::vector<uint8_t> make_logits(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  const int bytes = c.dtype == bitepFloat32 ? 4 : 2;
  std::vector<uint8_t> out(static_cast<size_t>(c.T) * c.E * bytes);
  for (int64_t i = 0; i < c.T * c.E; ++i)
    bitep::host::store_from_float(out.data(), kernel_dtype(c.dtype), i, dist(rng));
  return out;
}

std::vector<float> make_bias(int E, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-0.1f, 0.1f);
  std::vector<float> b(E);
  for (float& v : b) v = dist(rng);
  return b;
}

// M: bitep::ref::grad_scale (tests/reference/router_reference.h).
using bitep::ref::grad_scale;

// Gradient error per row: ||got - ref|| / ||M|| (M of grad_scale), NaN counting as infinite; fp16 forgives half a
// subnormal step per element (slack: the rounding of a value below fp16's normal range). Worst row over `rows`.
double grad_err(const std::vector<double>& ref,
                const std::vector<double>& got,
                const std::vector<double>& M,
                int64_t T,
                int E,
                double slack,
                const std::vector<char>& rows) {
  double worst = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    if (!rows[t]) continue;
    double num = 0, den = 0;
    for (int e = 0; e < E; ++e) {
      const double d = std::fabs(got[t * E + e] - ref[t * E + e]);
      num += std::isnan(d) ? INFINITY : std::max(0.0, d - slack) * std::max(0.0, d - slack);
      den += M[t * E + e] * M[t * E + e];
    }
    worst = std::max(worst, std::sqrt(num) / std::max(std::sqrt(den), 1e-30));
  }
  return worst;
}

// By the dtype the gradient is written in: fp32 arithmetic, or its rounding to bf16 / fp16 (half an ulp of the value:
// at most 2^-8 / 2^-11 of it, so of M, with room for the fp32 arithmetic before it).
double grad_tol(bitepDataType_t dt) { return dt == bitepFloat32 ? 1e-5 : dt == bitepFloat16 ? 2e-3 : 1e-2; }
double grad_slack(bitepDataType_t dt) { return dt == bitepFloat16 ? 0x1p-25 : 0.0; }

// The scale of a gradient from the saved tensor: saved holds the fp32 sigmoid y (its rounding and expf's, 2^-22
// absolute at most), and y (1 - y) passes that error on whatever the tolerance: where 1 - y is small it dominates.
// So the saved path is allowed tol ||M|| + ||2^-22 into_sigmoid|| per row, as the scale M + 2^-22 into_sigmoid / tol.
std::vector<double> saved_scale(std::vector<double> M, const std::vector<double>& into_sigmoid, double tol) {
  for (size_t i = 0; i < M.size(); ++i) M[i] += 0x1p-22 * into_sigmoid[i] / tol;
  return M;
}

// One case of the grid: every output of the forward, the layout epilogue and the backward against the fp64 definition.
void check_case(const Case& c) {
  const bitepRouterConfig_t cfg = config_of(c);
  const int E = c.E, k = c.k, B = (E + 7) / 8;
  const int64_t T = c.T;
  const auto logits = make_logits(c, 1234u + static_cast<uint32_t>(E * 31 + k));
  const auto bias = make_bias(E, 99);
  const float* bias_ptr = c.bias ? bias.data() : nullptr;
  const int W = (E % 4 == 0) ? 4 : 1;

  // Poisoned outputs: every element must be written.
  std::vector<float> probs(T * E, NAN), saved(T * E, NAN), w(T * k, NAN);
  std::vector<int32_t> idx(T * k, -7), counts(W, -7);
  std::vector<uint8_t> bitmap(T * B, 0xA5), bytemap(T * E, 0xA5), mask(T * ((W + 7) / 8), 0xA5);

  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.logits = logits.data();
  a.expert_bias = bias_ptr;
  a.probs = probs.data();
  a.routing_map = bitmap.data();
  a.map_format = bitepMapBitmapU8;
  a.topk_weights = w.data();
  a.topk_indices = idx.data();
  a.saved = saved.data();
  a.num_ranks = W;
  a.rank_mask = mask.data();
  a.rank_counts = counts.data();
  ASSERT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();

  // Bytemap run: same routing, every byte in {0, 1}, packs to the bitmap bit for bit.
  bitepRouterForwardArgs_t b = BITEP_ROUTER_FWD_ARGS_INIT;
  b.num_tokens = T;
  b.logits = logits.data();
  b.expert_bias = bias_ptr;
  b.routing_map = bytemap.data();
  b.map_format = bitepMapBytemap;
  ASSERT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &b, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(bitep::ref::pack_bitmap(bytemap.data(), T, E), bitmap);

  std::string err;
  const auto from_bitmap = bitep::ref::indices_from_bitmap(bitmap.data(), T, E, k, &err);
  ASSERT_TRUE(err.empty()) << err;
  const auto from_bytemap = bitep::ref::indices_from_bytemap(bytemap.data(), T, E, k, &err);
  ASSERT_TRUE(err.empty()) << err;
  EXPECT_EQ(from_bitmap, idx) << "topk_indices differ from the bitmap";
  EXPECT_EQ(from_bytemap, idx);

  const auto x = bitep::ref::to_double(logits.data(), c.dtype, T * E);
  const Forward ref = bitep::ref::router_forward(cfg, T, x, bias_ptr, false);
  const auto cmp = bitep::ref::compare_indices(ref, idx, T, k, kMapTol);
  EXPECT_TRUE(cmp.first_unexplained.empty()) << cmp.first_unexplained;
  EXPECT_LE(cmp.near_ties, std::max<int64_t>(2, T / 100)) << "near-ties: " << cmp.near_ties;
  if (cmp.near_ties) std::printf("[ info ] %s: %lld near-tie tokens\n", name(c).c_str(), (long long)cmp.near_ties);

  // Weights on the tokens whose experts match the reference.
  std::vector<char> same(T, 0);
  for (int64_t t = 0; t < T; ++t)
    same[t] = std::equal(idx.begin() + t * k, idx.begin() + (t + 1) * k, ref.indices.begin() + t * k);
  EXPECT_LE(bitep::ref::max_row_rel_err(ref.probs, probs.data(), T, E, same), 2e-5);
  EXPECT_LE(bitep::ref::max_row_rel_err(ref.weights, w.data(), T, k, same), 2e-5);
  EXPECT_LE(bitep::ref::max_row_rel_err(ref.saved, saved.data(), T, E, same), 2e-5);

  // Dispatch layout epilogue.
  std::vector<int32_t> want_counts(W, 0);
  const int L = E / W, MB = (W + 7) / 8;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<uint8_t> want(MB, 0);
    for (int j = 0; j < k; ++j) want[idx[t * k + j] / L / 8] |= static_cast<uint8_t>(1u << (idx[t * k + j] / L % 8));
    for (int r = 0; r < W; ++r) want_counts[r] += (want[r / 8] >> (r % 8)) & 1;
    ASSERT_EQ(0, std::memcmp(want.data(), &mask[t * MB], MB)) << "rank mask of token " << t;
  }
  EXPECT_EQ(want_counts, counts);

  // Backward, from the saved tensor and recomputed from the logits, with the bitmap and with the bytemap as the routing
  // map, against the fp64 definition; both maps give the same bits.
  std::mt19937 rng(7);
  std::normal_distribution<float> gd(0.0f, 1.0f);
  std::vector<float> gp(T * E);
  for (float& v : gp) v = gd(rng);
  const std::vector<double> gp64(gp.begin(), gp.end());
  const auto ref_grad = bitep::ref::router_backward(cfg, T, x, bytemap, gp64, false);
  std::vector<double> into_sigmoid;
  const std::vector<double> M = grad_scale(cfg, T, x, bytemap, gp, false, &into_sigmoid);
  const double tol = grad_tol(c.dtype);
  const int ds = c.dtype == bitepFloat32 ? 4 : 2;
  std::vector<uint8_t> from_bitmap_grad[2];
  for (bitepMapFormat_t fmt : {bitepMapBitmapU8, bitepMapBytemap})
    for (int recompute = 0; recompute < 2; ++recompute) {
      const char* what = fmt == bitepMapBitmapU8 ? (recompute ? "bitmap, recompute" : "bitmap, saved")
                                                 : (recompute ? "bytemap, recompute" : "bytemap, saved");
      std::vector<uint8_t> gl(T * E * ds, 0xFF);  // NaN in every dtype: an element not written fails
      bitepRouterBackwardArgs_t bw = BITEP_ROUTER_BWD_ARGS_INIT;
      bw.num_tokens = T;
      bw.grad_probs = gp.data();
      bw.routing_map = fmt == bitepMapBitmapU8 ? bitmap.data() : bytemap.data();
      bw.map_format = fmt;
      bw.saved = recompute ? nullptr : saved.data();
      bw.logits = logits.data();
      bw.grad_logits = gl.data();
      ASSERT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, &bw, nullptr), bitepSuccess) << bitepGetLastError();
      const auto g = bitep::ref::to_double(gl.data(), c.dtype, T * E);
      const double err =
          grad_err(ref_grad, g, recompute ? M : saved_scale(M, into_sigmoid, tol), T, E, grad_slack(c.dtype), same);
      EXPECT_LE(err, tol) << what;
      if (fmt == bitepMapBitmapU8)
        from_bitmap_grad[recompute] = std::move(gl);
      else
        EXPECT_TRUE(gl == from_bitmap_grad[recompute]) << what << ": not the bitmap's gradient bit for bit";
    }
}

// The shapes: E in {1, 8, 32, 130, 256, 1000, 2048}, k in {1, 2, 8, 32, E}.
std::vector<std::pair<int, int>> shapes() {
  std::vector<std::pair<int, int>> out;
  for (int E : {1, 8, 32, 130, 256, 1000, 2048})
    for (int k0 : {1, 2, 8, 32, -1}) {
      const int k = k0 < 0 ? E : k0;
      if (k <= E && (k0 < 0 || k0 != E)) out.push_back({E, k});
    }
  return out;
}
constexpr bitepDataType_t kDtypes[] = {bitepFloat32, bitepBfloat16, bitepFloat16};

struct Combo {
  bitepScoreFunction_t fn;
  bool pre, groups, bias;
  float scaling;
  bool operator==(const Combo& o) const {
    return fn == o.fn && pre == o.pre && groups == o.groups && bias == o.bias && scaling == o.scaling;
  }
};
Case case_of(int64_t T, int E, int k, const Combo& f, bitepDataType_t dt) {
  return {T, E, k, f.fn, f.pre, f.groups, f.bias, f.scaling, dt};
}
// Every valid combination: score function (softmax post- or pre-top-k, sigmoid, sqrtsoftplus) x group-limited routing
// (group_config) or none x expert_bias or none (sigmoid and sqrtsoftplus only: src/router.cc refuses it with softmax)
// x scaling_factor 1 or 2.5. 24 in all.
std::vector<Combo> every_combo() {
  std::vector<Combo> out;
  const std::pair<bitepScoreFunction_t, bool> paths[] = {{bitepScoreSoftmax, false},
                                                         {bitepScoreSoftmax, true},
                                                         {bitepScoreSigmoid, false},
                                                         {bitepScoreSqrtSoftplus, false}};  // pre: softmax only
  for (const auto& [fn, pre] : paths)
    for (bool groups : {false, true})
      for (bool bias : {false, true})
        for (float scaling : {1.0f, 2.5f})
          if (!bias || fn != bitepScoreSoftmax) out.push_back({fn, pre, groups, bias, scaling});
  return out;
}
// The combinations of RouterGrid, one test each at T = 7 (every dtype), 0 and 1 (fp32) and 4096 (where the fp64
// reference stays quick, not fp16); RouterGridCombos takes the other 18 at T = 7.
constexpr Combo kGridCombos[] = {
    {bitepScoreSoftmax, false, false, false, 1.0f},     {bitepScoreSoftmax, true, false, false, 1.0f},
    {bitepScoreSigmoid, false, false, false, 1.0f},     {bitepScoreSigmoid, false, true, true, 2.5f},
    {bitepScoreSqrtSoftplus, false, false, true, 1.0f}, {bitepScoreSoftmax, false, true, false, 1.0f}};
// And at T = 4096 (k = 8) a few of those others.
struct Case4096 {
  Combo f;
  int E;
  bitepDataType_t dtype;
};
constexpr Case4096 kMoreAt4096[] = {{{bitepScoreSoftmax, true, true, false, 2.5f}, 256, bitepFloat32},
                                    {{bitepScoreSqrtSoftplus, false, true, true, 2.5f}, 256, bitepBfloat16},
                                    {{bitepScoreSigmoid, false, false, true, 1.0f}, 130, bitepFloat32}};

std::vector<Case> grid() {
  std::vector<Case> cases;
  for (const auto& [E, k] : shapes())
    for (const Combo& f : kGridCombos)
      for (bitepDataType_t dt : kDtypes) {
        int G, gk;
        if (f.groups && !group_config(E, k, &G, &gk)) continue;
        cases.push_back(case_of(7, E, k, f, dt));
        if (dt == bitepFloat32) {
          cases.push_back(case_of(0, E, k, f, dt));
          cases.push_back(case_of(1, E, k, f, dt));
        }
        if (E <= 256 && k <= 8 && dt != bitepFloat16) cases.push_back(case_of(4096, E, k, f, dt));
      }
  for (const Case4096& m : kMoreAt4096) cases.push_back(case_of(4096, m.E, 8, m.f, m.dtype));
  return cases;
}

class RouterGrid : public ::testing::TestWithParam<Case> {};
TEST_P(RouterGrid, HostMatchesFp64Reference) { check_case(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Host, RouterGrid, ::testing::ValuesIn(grid()), [](const ::testing::TestParamInfo<Case>& i) {
  return name(i.param);
});

// The rest of the product at T = 7: for each (E, k, dtype), every combination that kGridCombos leaves out (those with
// groups where group_config has none for (E, k)). One test per (E, k, dtype), not per combination: ctest runs each test
// in its own process, and each process registers every test of the binary (some 30 us a test under ASan+UBSan), so the
// 1300 tests of one per combination would cost every process of the binary 0.04 s more. A failure names its
// combination (SCOPED_TRACE, name()).
struct Shape {
  int E, k;
  bitepDataType_t dtype;
};
std::vector<Shape> combo_shapes() {
  std::vector<Shape> out;
  for (const auto& [E, k] : shapes())
    for (bitepDataType_t dt : kDtypes) out.push_back({E, k, dt});
  return out;
}
class RouterGridCombos : public ::testing::TestWithParam<Shape> {};
TEST_P(RouterGridCombos, HostMatchesFp64Reference) {
  const Shape s = GetParam();
  int G, gk, checked = 0;
  for (const Combo& f : every_combo()) {
    if (std::find(std::begin(kGridCombos), std::end(kGridCombos), f) != std::end(kGridCombos)) continue;
    if (f.groups && !group_config(s.E, s.k, &G, &gk)) continue;
    const Case c = case_of(7, s.E, s.k, f, s.dtype);
    SCOPED_TRACE(name(c));
    check_case(c);
    ++checked;
  }
  EXPECT_EQ(checked, group_config(s.E, s.k, &G, &gk) ? 18 : 8);
}
INSTANTIATE_TEST_SUITE_P(
    Host, RouterGridCombos, ::testing::ValuesIn(combo_shapes()), [](const ::testing::TestParamInfo<Shape>& i) {
      return "T7_E" + std::to_string(i.param.E) + "_k" + std::to_string(i.param.k) + "_" + dtype_name(i.param.dtype);
    });

// ---- degenerate rows: exactly k distinct experts, ties to the lower index, NaN last ----------------

// probs: the dense probs too, when given ([T, E]).
std::vector<int32_t> route(const bitepRouterConfig_t& cfg,
                           const std::vector<float>& logits,
                           int64_t T,
                           float* probs = nullptr) {
  std::vector<uint8_t> bitmap(T * ((cfg.num_experts + 7) / 8), 0xFF);
  std::vector<int32_t> idx(T * cfg.topk, -1);
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.logits = logits.data();
  a.probs = probs;
  a.routing_map = bitmap.data();
  a.map_format = bitepMapBitmapU8;
  a.topk_indices = idx.data();
  EXPECT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
  std::string err;
  EXPECT_EQ(bitep::ref::indices_from_bitmap(bitmap.data(), T, cfg.num_experts, cfg.topk, &err), idx);
  EXPECT_TRUE(err.empty()) << err;
  return idx;
}

// The rows (fp32 values, each exactly representable in dt: checked by the fp64 definition's own reading of the bytes)
// in dtype dt, routed by the host backend with expert_bias when given, into a bitmap and (a second run) a bytemap: the
// [T, k] indices, which both maps give too, and which the fp64 definition gives exactly (exact ties are not excused as
// near-ties).
std::vector<int32_t> route_as(bitepRouterConfig_t cfg,
                              bitepDataType_t dt,
                              const std::vector<std::vector<float>>& rows,
                              const float* bias = nullptr) {
  cfg.logits_dtype = dt;
  const int E = cfg.num_experts, k = cfg.topk, B = (E + 7) / 8;
  const int64_t T = static_cast<int64_t>(rows.size());
  std::vector<uint8_t> x(static_cast<size_t>(T) * E * (dt == bitepFloat32 ? 4 : 2));
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) bitep::host::store_from_float(x.data(), kernel_dtype(dt), t * E + e, rows[t][e]);
  const auto x64 = bitep::ref::to_double(x.data(), dt, static_cast<size_t>(T) * E);
  for (int64_t i = 0; i < T * E; ++i) {
    const float want = rows[i / E][i % E];
    EXPECT_TRUE(std::isnan(want) ? std::isnan(x64[i]) : x64[i] == want)
        << want << " is not exact in " << dtype_name(dt);
  }
  std::vector<uint8_t> bitmap(T * B, 0xA5), bytemap(T * E, 0xA5);
  std::vector<int32_t> idx(T * k, -1);
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.logits = x.data();
  a.expert_bias = bias;
  a.routing_map = bitmap.data();
  a.map_format = bitepMapBitmapU8;
  a.topk_indices = idx.data();
  EXPECT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
  a.routing_map = bytemap.data();
  a.map_format = bitepMapBytemap;
  a.topk_indices = nullptr;
  EXPECT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
  std::string err;
  EXPECT_EQ(bitep::ref::indices_from_bitmap(bitmap.data(), T, E, k, &err), idx) << "the bitmap, " << dtype_name(dt);
  EXPECT_TRUE(err.empty()) << err;
  EXPECT_EQ(bitep::ref::indices_from_bytemap(bytemap.data(), T, E, k, &err), idx) << "the bytemap, " << dtype_name(dt);
  EXPECT_TRUE(err.empty()) << err;
  EXPECT_EQ(bitep::ref::router_forward(cfg, T, x64, bias, false).indices, idx)
      << "the fp64 definition, " << dtype_name(dt);
  return idx;
}

// Each row's k indices against want[row], for every dtype.
void expect_routes(const bitepRouterConfig_t& cfg,
                   const std::vector<std::vector<float>>& rows,
                   const std::vector<std::vector<int32_t>>& want,
                   const float* bias,
                   const std::string& what) {
  const int k = cfg.topk;
  for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16, bitepFloat16}) {
    const auto idx = route_as(cfg, dt, rows, bias);
    for (size_t t = 0; t < rows.size(); ++t)
      EXPECT_EQ(std::vector<int32_t>(idx.begin() + t * k, idx.begin() + (t + 1) * k), want[t])
          << what << " " << dtype_name(dt) << " row " << t;
  }
}

const float kInf = std::numeric_limits<float>::infinity(), kNaN = std::numeric_limits<float>::quiet_NaN();

TEST(RouterDegenerate, TiesAllEqualInfNaN) {
  const float inf = kInf, nan = kNaN;
  for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
    for (int pre = 0; pre < (fn == bitepScoreSoftmax ? 2 : 1); ++pre) {
      bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
      cfg.num_experts = 10;
      cfg.topk = 3;
      cfg.score_function = fn;
      cfg.use_pre_softmax = pre;
      const std::vector<std::vector<float>> rows = {
          {1, 1, 1, 1, 1, 1, 1, 1, 1, 1},  // all equal -> 0, 1, 2
          {-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf},
          {nan, nan, nan, nan, nan, nan, nan, nan, nan, nan},    // all NaN -> 0, 1, 2
          {nan, 0, nan, -inf, 5, 5, nan, -inf, 0, nan},          // 4, 5 (tie), then 1 (tie with 8)
          {-inf, nan, -inf, nan, -inf, 2, nan, -inf, nan, nan},  // 5, then -inf ties 0, 2
          {0, 3, 0, 3, 0, 3, 0, 3, 0, 3},                        // 1, 3, 5
      };
      // Pre-top-k softmax: one NaN makes the whole row NaN, and then the lowest indices win.
      std::vector<std::vector<int32_t>> want = {{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {1, 4, 5}, {0, 2, 5}, {1, 3, 5}};
      if (pre) want[3] = want[4] = {0, 1, 2};
      expect_routes(cfg, rows, want, nullptr, "fn " + std::to_string(fn) + " pre " + std::to_string(pre));
    }
  }
}

// Group-limited routing (E = 12, four groups of 3, group_topk = 2, k = 4: a group's score is the sum of its best two
// selection scores). The score functions keep the logits' order (softmax, sigmoid and sqrtsoftplus are increasing, and
// the values here are apart in fp32), so each group's best two and the group order follow from the logits; a group's
// score is NaN where NaN is among its best two (NaN ranks below everything, so only a group with fewer than two
// numbers), and such a group ranks below every other. Ties between groups go to the lower group, ties between experts
// to the lower expert.
TEST(RouterDegenerate, GroupTiesAllEqualInfNaN) {
  const float inf = kInf, nan = kNaN;
  for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
    for (int pre = 0; pre < (fn == bitepScoreSoftmax ? 2 : 1); ++pre) {
      bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
      cfg.num_experts = 12;
      cfg.topk = 4;
      cfg.num_groups = 4;
      cfg.group_topk = 2;
      cfg.score_function = fn;
      cfg.use_pre_softmax = pre;
      const std::vector<std::vector<float>> rows = {
          // All equal: every group ties, groups 0 and 1 are kept; experts 0-3.
          {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
          // All -inf: scores all -inf (softmax), 0 (sigmoid, sqrtsoftplus) or NaN (pre-top-k softmax, -inf - -inf):
          // ties everywhere, as above.
          {-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf},
          // All NaN: as above.
          {nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan},
          // Group 2 first (3 + 3); groups 1 and 3 tie for second (2 + 1 each) and group 1, the lower, is kept (group 3
          // would give 6, 7, 9, 11). Candidates 3-8: 6, 7 (3), 4 (2), 3 (1).
          {-1, -1, -1, 1, 2, 0, 3, 3, -2, 2, 0, 1},
          // Group 2 (2 + 1), then group 1 (1 + 1). Candidates 3-8: 6 (2), then five tie at 1 (3, 4, 5 of group 1 and
          // 7, 8 of group 2, the better group): the lowest, 3, 4, 5.
          {0, 0, 0, 1, 1, 1, 2, 1, 1, -1, -1, -1},
          // Group 0's best two are 3 and 3 (its NaN ranks last); group 1's are 3 and NaN: its score is NaN, last of
          // the groups. Groups 0 (3 + 3) and 2 (2 + 2); candidates 0-2 and 6-8: 1, 2 (3), 6, 7 (2). Pre-top-k softmax:
          // a NaN makes the whole row NaN, every group's score NaN: groups 0 and 1, experts 0-3.
          {nan, 3, 3, nan, nan, 3, 2, 2, -1, 1, 1, 1},
          // -inf in groups 0 (with a 5) and 2 (all). Post-top-k softmax (the scores are the logits): group scores
          // 5 - inf = -inf, 0, -inf, -2; groups 1 and 3; candidates 3-5 and 9-11: 3, 4, 5 (0), 9 (-1), the row's best
          // expert 2 not among them. Sigmoid: scores 0.993 + 0, 1, 0, 0.538; sqrtsoftplus: 2.238 + 0, 1.665, 0, 1.119;
          // pre-top-k softmax (/ e^5 the sum): 1 + 0, 0.013, 0, 0.005: groups 0 and 1 in each, experts 2, 3, 4, 5.
          {-inf, -inf, 5, 0, 0, 0, -inf, -inf, -inf, -1, -1, -1},
      };
      std::vector<std::vector<int32_t>> want = {{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}, {3, 4, 6, 7},
                                                {3, 4, 5, 6}, {1, 2, 6, 7}, {2, 3, 4, 5}};
      if (pre) want[5] = {0, 1, 2, 3};
      if (fn == bitepScoreSoftmax && !pre) want[6] = {3, 4, 5, 9};
      expect_routes(cfg, rows, want, nullptr, "fn " + std::to_string(fn) + " pre " + std::to_string(pre));
    }
  }
}

// expert_bias joins the selection scores (score + bias, sigmoid and sqrtsoftplus) in every row, -inf and NaN logits
// included: sigmoid(-inf) = sqrtsoftplus(-inf) = 0, so a row of -inf selects by the bias alone; NaN + bias is NaN and
// ranks last whatever the bias. Biases here are multiples of 1/4, so equal logits with equal biases tie exactly.
TEST(RouterDegenerate, BiasTiesInfNaN) {
  const float inf = kInf, nan = kNaN;
  const std::vector<float> bias = {0, 0.25f, 0, 0.5f, 0.25f, 0, 0, 0.5f};
  for (bitepScoreFunction_t fn : {bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
    bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
    cfg.num_experts = 8;
    cfg.topk = 3;
    cfg.score_function = fn;
    const std::vector<std::vector<float>> rows = {
        // Equal scores: 3 and 7 (+0.5), then 1 and 4 tie (+0.25): 1.
        {0, 0, 0, 0, 0, 0, 0, 0},
        // Scores 0: the bias alone, as above.
        {-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf},
        // All NaN: 0, 1, 2.
        {nan, nan, nan, nan, nan, nan, nan, nan},
        // NaN at 0, 2, 4, 7 (bias 0.5 at 7 no help): 3 (+0.5), 1 (+0.25), then 5 and 6 tie: 5.
        {nan, 0, nan, 0, nan, 0, 0, nan},
        // Expert 0's logit 1 against 0 + bias elsewhere: sigmoid(1) = 0.731 < 0.5 + 0.25, so 3, 7 (1.0), 1 (0.75, tie
        // with 4); sqrtsoftplus(1) = 1.146 > 0.833 + 0.25 (sqrtsoftplus(0) = sqrt(ln 2)): 0, 3, 7.
        {1, 0, 0, 0, 0, 0, 0, 0},
    };
    std::vector<std::vector<int32_t>> want = {{1, 3, 7}, {1, 3, 7}, {0, 1, 2}, {1, 3, 5}, {1, 3, 7}};
    if (fn == bitepScoreSqrtSoftplus) want[4] = {0, 3, 7};
    expect_routes(cfg, rows, want, bias.data(), "fn " + std::to_string(fn));
  }
}

// expert_bias with group-limited routing (E = 12, four groups of 3, group_topk = 2, k = 4): the group scores sum the
// biased selection scores. With equal logits (score s) group 0's best two are s + 0.5 and s + 0.25, groups 1-3's each
// s + 0.25 and s (summed in the same order, so the three tie exactly): groups 0 and 1 (the lowest of the tie; group 3
// would give 11 for 2), experts 0 (+0.5), 1 and 5 (+0.25), then 2, 3, 4 tie at s: 2.
TEST(RouterDegenerate, GroupsAndBiasTiesInfNaN) {
  const float inf = kInf, nan = kNaN;
  const std::vector<float> bias = {0.5f, 0.25f, 0, 0, 0, 0.25f, 0.25f, 0, 0, 0, -0.5f, 0.25f};
  for (bitepScoreFunction_t fn : {bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
    bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
    cfg.num_experts = 12;
    cfg.topk = 4;
    cfg.num_groups = 4;
    cfg.group_topk = 2;
    cfg.score_function = fn;
    const std::vector<std::vector<float>> rows = {
        {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},  // as above: 0, 1, 2, 5
        // Scores 0: the bias alone (s = 0), as above.
        {-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf},
        // Group 0 NaN, last of the groups; groups 1-3 tie: 1 and 2. Candidates 3-8: 5, 6 (+0.25), then 3, 4.
        {nan, nan, nan, 0, 0, 0, 0, 0, 0, 0, 0, 0},
        // All NaN: groups 0 and 1, experts 0-3.
        {nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan},
    };
    const std::vector<std::vector<int32_t>> want = {{0, 1, 2, 5}, {0, 1, 2, 5}, {3, 4, 5, 6}, {0, 1, 2, 3}};
    expect_routes(cfg, rows, want, bias.data(), "fn " + std::to_string(fn));
  }
}

// The pre-top-k softmax takes its exps below FLT_MIN as 0, as the device does (ex2.approx.ftz:
// kernels/router_common.cuh, softmax_exp): probabilities that small tie at 0, and the lower experts win. The fp64
// definition ranks them by value.
TEST(RouterDegenerate, PreSoftmaxExpsBelowFltMinAreZero) {
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = 10;
  cfg.topk = 3;
  cfg.use_pre_softmax = 1;
  // e^-87 = 1.6e-38 stays (FLT_MIN = 1.18e-38); e^-88 = 6.1e-39 and below are 0.
  const std::vector<float> logits = {-95, 0,   -88, -90, -87, -89, -91, -92, -93, -94,   // 1, 4, then 0 of the zeros
                                     -99, -98, -97, -96, 0,   -95, -94, -93, -92, -91};  // 4, then 0 and 1
  std::vector<float> probs(logits.size(), -1.0f);
  EXPECT_EQ(route(cfg, logits, 2, probs.data()), (std::vector<int32_t>{0, 1, 4, 0, 1, 4}));
  EXPECT_EQ(probs[0], 0.0f);  // chosen, at 0
  EXPECT_GT(probs[4], 0.0f);  // e^-87 kept
  EXPECT_EQ(probs[2], 0.0f);  // not chosen
  EXPECT_EQ(probs[10], 0.0f);
  EXPECT_EQ(probs[11], 0.0f);
  EXPECT_EQ(probs[14], 1.0f);
  // Without the flush (the fp64 definition) the next largest values win: -88, and -91 and -92.
  const auto ref =
      bitep::ref::router_forward(cfg, 2, std::vector<double>(logits.begin(), logits.end()), nullptr, false);
  EXPECT_EQ(ref.indices, (std::vector<int32_t>{1, 2, 4, 4, 8, 9}));
}

TEST(RouterDegenerate, KEqualsEAndBiasTies) {
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = 9;
  cfg.topk = 9;
  cfg.score_function = bitepScoreSigmoid;
  std::vector<float> logits(2 * 9, NAN);
  const auto idx = route(cfg, logits, 2);
  for (int j = 0; j < 18; ++j) EXPECT_EQ(idx[j], j % 9);
}

// Group-limited routing that keeps every group (group_topk == num_groups, num_groups = 1 among them) selects as no
// groups do: the fp64 definition, which scores and ranks the groups literally, gives the same experts and values with
// and without them (so src/router.cc's shortcut is the definition's own result), and the host backend matches it.
TEST(RouterGroups, AllGroupsKeptSelectsAsNoGroups) {
  struct G {
    int E, k, groups;
    bitepScoreFunction_t fn;
    int pre;
    bool bias;
  };
  for (const G g : {G{384, 8, 1, bitepScoreSigmoid, 0, true}, G{160, 8, 1, bitepScoreSigmoid, 0, true},
                    G{256, 8, 8, bitepScoreSigmoid, 0, true}, G{64, 6, 4, bitepScoreSoftmax, 1, false},
                    G{60, 4, 3, bitepScoreSoftmax, 0, false}}) {
    const int64_t T = 64;
    Case c{T, g.E, g.k, g.fn, g.pre != 0, false, g.bias, 2.5f, bitepFloat32};
    bitepRouterConfig_t none = config_of(c);
    bitepRouterConfig_t all = none;
    all.num_groups = g.groups;
    all.group_topk = g.groups;
    const std::string what = name(c) + " num_groups = group_topk = " + std::to_string(g.groups);
    const auto bytes = make_logits(c, 17 + g.E);
    std::vector<float> x(static_cast<size_t>(T) * g.E);
    std::memcpy(x.data(), bytes.data(), bytes.size());
    const std::vector<double> x64(x.begin(), x.end());
    const auto bias = make_bias(g.E, 5);
    const float* b = g.bias ? bias.data() : nullptr;
    const Forward want = bitep::ref::router_forward(none, T, x64, b, false);
    const Forward lit = bitep::ref::router_forward(all, T, x64, b, false);
    EXPECT_EQ(lit.indices, want.indices) << what << ": the definition's experts";
    EXPECT_EQ(lit.weights, want.weights) << what << ": the definition's weights";
    // The host backend with the group config: the definition's experts (normal(0, 2) logits, no near-ties at this
    // size) and weights within fp32 rounding.
    std::vector<int32_t> idx(static_cast<size_t>(T) * g.k, -1);
    std::vector<float> w(static_cast<size_t>(T) * g.k, NAN);
    bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
    a.num_tokens = T;
    a.logits = x.data();
    a.expert_bias = b;
    a.topk_indices = idx.data();
    a.topk_weights = w.data();
    ASSERT_EQ(bitepRouterForward(bitepBackendHost, &all, &a, nullptr), bitepSuccess) << bitepGetLastError();
    int64_t compared = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (want.margin[t] < kMapTol) continue;  // a near-tie fp32 may order either way
      ++compared;
      for (int j = 0; j < g.k; ++j) {
        const size_t i = static_cast<size_t>(t) * g.k + j;
        EXPECT_EQ(idx[i], want.indices[i]) << what << ": host expert, token " << t;
        EXPECT_NEAR(w[i], want.weights[i], 1e-6 * std::max(1.0, std::fabs(want.weights[i])))
            << what << ": host weight, token " << t;
      }
    }
    EXPECT_GE(compared, T - 2) << what << ": tokens compared";
  }
}

// ---- gradient formulas vs finite differences of the fp64 forward ---------------------------------

TEST(RouterGradient, Fp64BackwardMatchesFiniteDifferences) {
  struct Fn {
    bitepScoreFunction_t fn;
    int pre;
    bool aux;
  };
  for (const Fn f : {Fn{bitepScoreSoftmax, 0, false}, Fn{bitepScoreSoftmax, 1, false}, Fn{bitepScoreSigmoid, 0, false},
                     Fn{bitepScoreSqrtSoftplus, 0, false}, Fn{bitepScoreSoftmax, 0, true},
                     Fn{bitepScoreSigmoid, 0, true}, Fn{bitepScoreSqrtSoftplus, 0, true}}) {
    for (int k : {1, 3}) {
      bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
      cfg.num_experts = 12;
      cfg.topk = k;
      cfg.score_function = f.fn;
      cfg.use_pre_softmax = f.pre;
      cfg.scaling_factor = f.aux ? 1.0f : 1.5f;
      const int64_t T = 4;
      const int E = 12;
      std::mt19937 rng(k * 7 + f.fn);
      std::normal_distribution<double> d(0.0, 1.5);
      std::vector<double> x(T * E), g(T * E);
      for (double& v : x) v = d(rng);
      for (double& v : g) v = d(rng);
      const auto base = bitep::ref::router_forward(cfg, T, x, nullptr, f.aux);
      const auto grad = bitep::ref::router_backward(cfg, T, x, base.bytemap, g, f.aux);
      const double h = 1e-6;
      for (int64_t i = 0; i < T * E; ++i) {
        auto xp = x, xm = x;
        xp[i] += h;
        xm[i] -= h;
        const auto fp = bitep::ref::router_forward(cfg, T, xp, nullptr, f.aux);
        const auto fm = bitep::ref::router_forward(cfg, T, xm, nullptr, f.aux);
        ASSERT_EQ(fp.bytemap, base.bytemap) << "map moved under the perturbation";
        ASSERT_EQ(fm.bytemap, base.bytemap);
        double lp = 0, lm = 0;
        for (int64_t j = 0; j < T * E; ++j) lp += g[j] * fp.probs[j], lm += g[j] * fm.probs[j];
        const double fd = (lp - lm) / (2 * h);
        EXPECT_NEAR(grad[i], fd, 1e-6 * std::max(1.0, std::fabs(fd)))
            << "fn " << f.fn << " pre " << f.pre << " aux " << f.aux << " k " << k << " element " << i;
      }
    }
  }
}

// ---- one host forward / backward with every output, for the tests below -------------------------------------------

// The forward's outputs (each poisoned before): weights, probs, saved, the bitmap and the bytemap it unpacks to.
struct HostOut {
  std::vector<float> w, probs, saved;
  std::vector<uint8_t> bitmap, bytemap;
};
HostOut host_forward(const bitepRouterConfig_t& cfg, const std::vector<float>& x, int64_t T) {
  const int E = cfg.num_experts, k = cfg.topk, B = (E + 7) / 8;
  HostOut o{std::vector<float>(T * k, NAN), std::vector<float>(T * E, NAN), std::vector<float>(T * E, NAN),
            std::vector<uint8_t>(T * B, 0xA5), std::vector<uint8_t>(T * E)};
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.logits = x.data();
  a.routing_map = o.bitmap.data();
  a.map_format = bitepMapBitmapU8;
  a.topk_weights = o.w.data();
  a.probs = o.probs.data();
  a.saved = o.saved.data();
  EXPECT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
  for (int64_t i = 0; i < T * E; ++i) o.bytemap[i] = (o.bitmap[i / E * B + i % E / 8] >> (i % E % 8)) & 1;
  return o;
}
// The backward from the forward's bitmap, from its saved tensor (recompute false) or the logits; grad_logits poisoned.
std::vector<float> host_backward(const bitepRouterConfig_t& cfg,
                                 const std::vector<float>& x,
                                 int64_t T,
                                 const HostOut& fwd,
                                 const std::vector<float>& grad_probs,
                                 bool recompute) {
  std::vector<float> gl(T * cfg.num_experts, NAN);
  bitepRouterBackwardArgs_t bw = BITEP_ROUTER_BWD_ARGS_INIT;
  bw.num_tokens = T;
  bw.grad_probs = grad_probs.data();
  bw.routing_map = fwd.bitmap.data();
  bw.map_format = bitepMapBitmapU8;
  bw.saved = recompute ? nullptr : fwd.saved.data();
  bw.logits = x.data();
  bw.grad_logits = gl.data();
  EXPECT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, &bw, nullptr), bitepSuccess) << bitepGetLastError();
  return gl;
}

// sqrtsoftplus'(x) = sigmoid(x) / (2 sqrt(softplus(x))) is 0 / 0 once e^x underflows (x < -104 in fp32, and x = -inf
// in any precision), and loses bits in the subnormals before: the backward gave NaN for a masked (-inf) expert,
// routed or not (0 * NaN). Each element here against the fp64 definition within 1e-5 of its own scale M (not the
// row's), less what fp32 cannot hold (2^-126); every element finite.
TEST(RouterGradient, SqrtSoftplusFarBelowZero) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> row = {-inf,   -1e4f,  -200.0f, -104.5f, -100.0f, -90.0f,
                                  -30.0f, -20.5f, -19.5f,  -5.0f,   0.0f,    3.0f};
  const int E = static_cast<int>(row.size());
  for (int k : {1, 3, E}) {
    bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
    cfg.num_experts = E;
    cfg.topk = k;
    cfg.score_function = bitepScoreSqrtSoftplus;
    cfg.scaling_factor = 1.5f;
    // Row 0 as written; row 1 reversed (another order of the same values); row 2 all -inf but one.
    std::vector<float> logits(row);
    logits.insert(logits.end(), row.rbegin(), row.rend());
    std::vector<float> last(E, -inf);
    last[5] = -90.0f;
    logits.insert(logits.end(), last.begin(), last.end());
    const int64_t T = 3;
    const HostOut fwd = host_forward(cfg, logits, T);

    std::mt19937 rng(11 + k);
    std::normal_distribution<float> gd(0.0f, 1.0f);
    std::vector<float> gp(T * E);
    for (float& v : gp) v = gd(rng);
    const std::vector<double> x(logits.begin(), logits.end());
    const auto ref =
        bitep::ref::router_backward(cfg, T, x, fwd.bytemap, std::vector<double>(gp.begin(), gp.end()), false);
    const auto M = grad_scale(cfg, T, x, fwd.bytemap, gp, false, nullptr);
    for (int recompute = 0; recompute < 2; ++recompute) {
      const std::vector<float> gl = host_backward(cfg, logits, T, fwd, gp, recompute);
      for (int64_t i = 0; i < T * E; ++i) {
        ASSERT_TRUE(std::isfinite(ref[i]) && std::isfinite(M[i])) << "the fp64 definition, element " << i;
        EXPECT_TRUE(std::isfinite(gl[i]))
            << "k " << k << " recompute " << recompute << " token " << i / E << " logit " << logits[i] << ": " << gl[i];
        EXPECT_LE(std::fabs(gl[i] - ref[i]), 1e-5 * M[i] + 0x1p-126)
            << "k " << k << " recompute " << recompute << " token " << i / E << " logit " << logits[i] << ": got "
            << gl[i] << ", fp64 " << ref[i];
      }
    }
  }
}

// ---- cases mutation testing found unguarded (each test fails with the change it names) ------------------------

void expect_values(const std::vector<float>& got, const std::vector<double>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i]))
      EXPECT_EQ(got[i], want[i]) << what << " " << i;
    else
      EXPECT_NEAR(got[i], want[i], 1e-6 * std::max(1.0, std::fabs(want[i]))) << what << " " << i;
  }
}
bitepRouterConfig_t router_config(int E, int k, bitepScoreFunction_t fn, int pre, float scaling) {
  bitepRouterConfig_t c = BITEP_ROUTER_CONFIG_INIT;
  c.num_experts = E;
  c.topk = k;
  c.score_function = fn;
  c.use_pre_softmax = pre;
  c.scaling_factor = scaling;
  return c;
}

// The softmax subtracts the row's maximum: logits near 100 (e^x past FLT_MAX) and near -200 (e^x 0). A maximum
// started at 0 in place of -inf gives NaN / 0 weights here; the grid's normal(0, 2) logits never show it.
TEST(RouterMutants, SoftmaxOfLogitsFarFromZero) {
  const std::vector<float> x = {100, 99.5f, 98, 97, 96, 95, 94, 93, -200, -200.5f, -201, -202, -203, -204, -205, -206};
  for (int pre = 0; pre < 2; ++pre) {
    const bitepRouterConfig_t cfg = router_config(8, 2, bitepScoreSoftmax, pre, 1.0f);
    const HostOut o = host_forward(cfg, x, 2);
    const auto ref = bitep::ref::router_forward(cfg, 2, std::vector<double>(x.begin(), x.end()), nullptr, false);
    expect_values(o.w, ref.weights, pre ? "pre-top-k weights" : "post-top-k weights");
    expect_values(o.probs, ref.probs, pre ? "pre-top-k probs" : "post-top-k probs");
  }
}

// Sigmoid / sqrtsoftplus weights normalised over scores that are all 0 (every logit -inf): the epsilon keeps them 0,
// where a division by the bare sum gives NaN.
TEST(RouterMutants, NormalisedWeightsOfZeroScoresAreZero) {
  const std::vector<float> x(8, -std::numeric_limits<float>::infinity());
  for (bitepScoreFunction_t fn : {bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
    const bitepRouterConfig_t cfg = router_config(8, 2, fn, 0, 1.0f);
    const HostOut o = host_forward(cfg, x, 1);
    for (float v : o.w) EXPECT_EQ(v, 0.0f) << "fn " << fn;
  }
}

// scaling_factor on every score function's weights and probs, never on the saved tensor; and the backward from that
// saved tensor at that scaling. The grid scales sigmoid alone.
TEST(RouterMutants, ScalingOnEveryScoreFunctionNotOnSaved) {
  const int E = 16, T = 3;
  std::vector<float> x(T * E);
  for (int i = 0; i < T * E; ++i) x[i] = std::sin(1.7f * static_cast<float>(i)) * 3.0f;
  const std::vector<double> x64(x.begin(), x.end());
  for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid, bitepScoreSqrtSoftplus})
    for (int pre = 0; pre < (fn == bitepScoreSoftmax ? 2 : 1); ++pre) {
      const bitepRouterConfig_t cfg = router_config(E, 4, fn, pre, 2.5f);
      const std::string what = "fn " + std::to_string(fn) + " pre " + std::to_string(pre);
      const HostOut o = host_forward(cfg, x, T);
      const auto ref = bitep::ref::router_forward(cfg, T, x64, nullptr, false);
      expect_values(o.w, ref.weights, what + " weights");
      expect_values(o.probs, ref.probs, what + " probs");
      expect_values(o.saved, ref.saved, what + " saved");
      std::vector<float> gp(T * E);
      for (int i = 0; i < T * E; ++i) gp[i] = std::cos(0.9f * static_cast<float>(i));
      ASSERT_EQ(o.bytemap, ref.bytemap) << what;
      const auto want =
          bitep::ref::router_backward(cfg, T, x64, ref.bytemap, std::vector<double>(gp.begin(), gp.end()), false);
      const std::vector<float> gl = host_backward(cfg, x, T, o, gp, /*recompute=*/false);
      for (int64_t i = 0; i < T * E; ++i)
        EXPECT_NEAR(gl[i], want[i], 1e-5 * std::max(1.0, std::fabs(want[i]))) << what << " grad " << i;
    }
}

// The sigmoid's backward recomputed from logits far below zero: sigmoid'(x) from e^-|x| stays finite where e^-x
// overflows (x < -88; inf / inf at routed and unrouted experts alike).
TEST(RouterMutants, SigmoidRecomputeFarBelowZero) {
  const std::vector<float> x = {-1e4f, -200, -100, -89, -50, 0, 2, 3};
  const bitepRouterConfig_t cfg = router_config(8, 3, bitepScoreSigmoid, 0, 1.0f);
  const HostOut fwd = host_forward(cfg, x, 1);
  const std::vector<float> gl = host_backward(cfg, x, 1, fwd, std::vector<float>(8, 1.0f), /*recompute=*/true);
  const auto want = bitep::ref::router_backward(cfg, 1, std::vector<double>(x.begin(), x.end()), fwd.bytemap,
                                                std::vector<double>(8, 1.0), false);
  for (int e = 0; e < 8; ++e) {
    EXPECT_TRUE(std::isfinite(gl[e])) << e << ": " << gl[e];
    EXPECT_NEAR(gl[e], want[e], 1e-5 * std::max(1.0, std::fabs(want[e]))) << e;
  }
}

// ---- aux-loss scores and loss -----------------------------------------------------------------

// The scores and their gradient in bf16 and in fp32 (there the tolerance is the fp32 arithmetic's alone); the loss
// and its gradient. Here grad_err is about 0.2 for sigmoid and sqrtsoftplus gradients without the normalisation's
// - dot / d^2 term, and at least 0.6 and 0.3 for a gradient of zero and one of half the size.
TEST(AuxLoss, ScoresLossAndGradientsMatchFp64) {
  for (bitepDataType_t dt : {bitepBfloat16, bitepFloat32})
    for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
      const Case c{257, 64, 6, fn, false, false, false, 1.0f, dt};
      SCOPED_TRACE(name(c));
      bitepRouterConfig_t cfg = config_of(c);
      const auto logits = make_logits(c, 5);
      const int64_t T = c.T;
      const int E = c.E;
      std::vector<float> scores(T * E, NAN), saved(T * E, NAN);
      std::vector<uint8_t> bytemap(T * E, 0xA5);
      bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
      a.num_tokens = T;
      a.logits = logits.data();
      a.probs = scores.data();
      a.routing_map = bytemap.data();
      a.map_format = bitepMapBytemap;
      a.saved = saved.data();
      ASSERT_EQ(bitepAuxScoresForward(bitepBackendHost, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
      const auto x = bitep::ref::to_double(logits.data(), c.dtype, T * E);
      const auto ref = bitep::ref::router_forward(cfg, T, x, nullptr, true);
      std::string err;
      const auto idx = bitep::ref::indices_from_bytemap(bytemap.data(), T, E, c.k, &err);
      ASSERT_TRUE(err.empty()) << err;
      const auto cmp = bitep::ref::compare_indices(ref, idx, T, c.k, kMapTol);
      EXPECT_TRUE(cmp.first_unexplained.empty()) << cmp.first_unexplained;
      EXPECT_LE(bitep::ref::max_row_rel_err(ref.probs, scores.data(), T, E), 2e-5);
      EXPECT_LE(bitep::ref::max_row_rel_err(ref.saved, saved.data(), T, E), 2e-5);

      // Scores backward, saved and recompute.
      std::vector<float> gs(T * E);
      std::mt19937 rng(3);
      std::normal_distribution<float> gd(0.0f, 1.0f);
      for (float& v : gs) v = gd(rng);
      const auto ref_g =
          bitep::ref::router_backward(cfg, T, x, ref.bytemap, std::vector<double>(gs.begin(), gs.end()), true);
      std::vector<double> into_sigmoid;
      const std::vector<double> M = grad_scale(cfg, T, x, ref.bytemap, gs, true, &into_sigmoid);
      const double tol = grad_tol(dt);
      const int ds = dt == bitepFloat32 ? 4 : 2;
      for (int recompute = 0; recompute < 2; ++recompute) {
        std::vector<uint8_t> gl(T * E * ds, 0xFF);  // NaN in every dtype: an element not written fails
        bitepRouterBackwardArgs_t bw = BITEP_ROUTER_BWD_ARGS_INIT;
        bw.num_tokens = T;
        bw.grad_probs = gs.data();
        bw.saved = recompute ? nullptr : saved.data();
        bw.logits = logits.data();
        bw.grad_logits = gl.data();
        ASSERT_EQ(bitepAuxScoresBackward(bitepBackendHost, &cfg, &bw, nullptr), bitepSuccess) << bitepGetLastError();
        const auto g = bitep::ref::to_double(gl.data(), dt, T * E);
        const double e = grad_err(ref_g, g, recompute ? M : saved_scale(M, into_sigmoid, tol), T, E, grad_slack(dt),
                                  std::vector<char>(T, 1));
        EXPECT_LE(e, tol) << (recompute ? "recompute" : "saved");
      }

      // Loss and its gradient; two runs bit-identical.
      std::vector<int32_t> tpe(E);
      for (int e = 0; e < E; ++e) tpe[e] = (e * 37) % 11;
      bitepAuxLossArgs_t la = BITEP_AUX_LOSS_ARGS_INIT;
      la.num_tokens = T;
      la.num_experts = E;
      la.topk = c.k;
      la.total_num_tokens = 4 * T;
      la.coeff = 1e-2f;
      la.probs = scores.data();
      la.tokens_per_expert = tpe.data();
      float loss1 = NAN, loss2 = NAN;
      la.loss = &loss1;
      ASSERT_EQ(bitepAuxLossForward(bitepBackendHost, &la, nullptr), bitepSuccess) << bitepGetLastError();
      la.loss = &loss2;
      ASSERT_EQ(bitepAuxLossForward(bitepBackendHost, &la, nullptr), bitepSuccess);
      EXPECT_EQ(std::memcmp(&loss1, &loss2, 4), 0);
      const double want =
          bitep::ref::aux_loss(T, E, c.k, 4 * T, 1e-2, std::vector<double>(scores.begin(), scores.end()), tpe);
      EXPECT_NEAR(loss1, want, 1e-6 * std::fabs(want));
      std::vector<float> gp(T * E, NAN);
      const float gl = 0.5f;
      la.grad_loss = &gl;
      la.grad_probs = gp.data();
      ASSERT_EQ(bitepAuxLossBackward(bitepBackendHost, &la, nullptr), bitepSuccess) << bitepGetLastError();
      const double C = E * 1e-2 / (c.k * double(4 * T) * double(4 * T));
      for (int64_t i = 0; i < T * E; ++i) ASSERT_NEAR(gp[i], C * tpe[i % E] * 0.5, 1e-6 * C * 11) << i;
    }
}

}  // namespace
