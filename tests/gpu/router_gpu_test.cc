// SPDX-License-Identifier: Apache-2.0
// The CUDA router kernels (kernels/router_*.cu) against the host reference backend and the fp64 oracle
// (tests/reference/router_reference.h), through the public C API. Every test SKIPs with the reason when
// no CUDA device is visible.
//
// Tolerances, per row, against the host backend on the same inputs, or else against the fp64 oracle (the
// host sums in sequence in fp32 and drifts on long rows of similar values, where the kernels' tree sums
// stay closer to exact). GPU and host differ only in summation order and in the device's expf / log1pf,
// so the bounds scale with the width w of the sums: w = E for the pre-top-k softmax and the aux-score
// normalisation, w = k for the post-top-k softmax and the sigmoid / sqrtsoftplus normalisation;
// f = max(1, sqrt(w / 32)).
//   probs, topk weights, saved (fp32 outputs, whatever the logits dtype): ||got - want|| / ||want|| <= 1e-6 f.
//   grad_logits: ||got - want|| / ||M|| where M is the backward's magnitude without cancellation (fp64,
//     M_e >= |grad_e|; softmax: act_e (|g_e| + sum_j |g_j| act_j), normalisations alike): a plain relative
//     error is unbounded where act * (g - dot) cancels, even between two host runs. fp32 4e-6 f; bf16
//     1e-2 and fp16 2e-3 (one unit in the last place of the output on some elements; fp16 also one
//     subnormal step absolute).
// Maps and indices: equal to the host's except near-ties, which the fp64 oracle must explain (gap
// between the last kept and first dropped selection score below kNearTie, relative); counted and printed.
// Degenerate rows (ties, all equal, +-inf, NaN) must match the host exactly.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "bitep/bitep.h"
#include "kernels/router.h"
#include "src/host/dtype_host.h"
#include "tests/reference/inputs.h"
#include "tests/reference/router_reference.h"

namespace {

constexpr double kNearTie = 1e-5;
constexpr size_t kGuard = 64;  // poisoned bytes past every output: a write there is a bug
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- GPU presence --------------------------------------------------------------------------------

bool gpu_visible(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
    (void)cudaGetLastError();
    return false;
  }
  if (n == 0) {
    *why = "cudaGetDeviceCount found 0 devices";
    return false;
  }
  int avail = 0;
  if (bitepCudaAvailable(&avail) != bitepSuccess || !avail) {
    *why = "bitepCudaAvailable() says no cuda backend";
    return false;
  }
  return true;
}

#define REQUIRE_GPU()                                                    \
  do {                                                                   \
    std::string why_;                                                    \
    if (!gpu_visible(&why_)) GTEST_SKIP() << "no CUDA device: " << why_; \
  } while (0)

#define CUDA_OK(cmd) ASSERT_EQ((cmd), cudaSuccess) << #cmd << ": " << cudaGetErrorString(cudaGetLastError())

// ---- buffers -------------------------------------------------------------------------------------

// Device buffer of `bytes` plus a poisoned guard; `offset` bytes of slack in front (misaligned views).
struct DevBuf {
  char* base = nullptr;
  size_t bytes = 0, offset = 0;
  DevBuf() = default;
  explicit DevBuf(size_t n, size_t off = 0) : bytes(n), offset(off) {
    if (cudaMalloc(&base, off + n + kGuard) != cudaSuccess) base = nullptr;
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() {
    if (base) cudaFree(base);
  }
  void* ptr() const { return base ? base + offset : nullptr; }
  void poison() const { cudaMemset(base, 0xff, offset + bytes + kGuard); }
  void upload(const void* src) const { cudaMemcpy(ptr(), src, bytes, cudaMemcpyHostToDevice); }
  template <class T>
  std::vector<T> download() const {
    std::vector<T> out(bytes / sizeof(T));
    if (!out.empty()) cudaMemcpy(out.data(), ptr(), out.size() * sizeof(T), cudaMemcpyDeviceToHost);
    return out;
  }
  bool guard_intact() const {
    std::vector<uint8_t> g(kGuard);
    cudaMemcpy(g.data(), base + offset + bytes, kGuard, cudaMemcpyDeviceToHost);
    return std::all_of(g.begin(), g.end(), [](uint8_t b) { return b == 0xff; });
  }
};

// Host buffer with the same guard.
struct HostBuf {
  std::vector<uint8_t> mem;
  size_t bytes = 0;
  explicit HostBuf(size_t n) : mem(n + kGuard, 0xff), bytes(n) {}
  void* ptr() { return mem.data(); }
  template <class T>
  std::vector<T> get() const {
    std::vector<T> out(bytes / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), mem.data(), out.size() * sizeof(T));
    return out;
  }
  bool guard_intact() const {
    return std::all_of(mem.begin() + bytes, mem.end(), [](uint8_t b) { return b == 0xff; });
  }
};

int dsize(bitepDataType_t dt) { return dt == bitepFloat32 ? 4 : 2; }
int row_map_bytes(bitepMapFormat_t f, int E) { return f == bitepMapBytemap ? E : (E + 7) / 8; }

const char* fn_name(const bitepRouterConfig_t& c) {
  if (c.score_function == bitepScoreSigmoid) return "sigmoid";
  if (c.score_function == bitepScoreSqrtSoftplus) return "sqrtsoftplus";
  return c.use_pre_softmax ? "softmax-pre" : "softmax-post";
}
const char* dt_name(bitepDataType_t d) { return d == bitepFloat32 ? "fp32" : d == bitepBfloat16 ? "bf16" : "fp16"; }

// ---- inputs --------------------------------------------------------------------------------------

using bitep::ref::gauss;
using bitep::ref::mix;

// Logits [T, E] as bytes of dtype dt. Every 16th row is coarsely quantised (many exact ties).
std::vector<uint8_t> make_logits(int64_t T, int E, bitepDataType_t dt, uint64_t seed, float spread = 2.0f) {
  std::vector<uint8_t> out(static_cast<size_t>(T) * E * dsize(dt));
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      float v = spread * gauss(seed, static_cast<uint64_t>(t) * E + e);
      if (t % 16 == 5) v = std::round(v * 2.0f) / 2.0f;
      const size_t i = static_cast<size_t>(t) * E + e;
      if (dt == bitepFloat32) {
        std::memcpy(out.data() + 4 * i, &v, 4);
      } else {
        const uint16_t h = dt == bitepBfloat16 ? bitep::host::float_to_bf16(v) : bitep::host::float_to_half(v);
        std::memcpy(out.data() + 2 * i, &h, 2);
      }
    }
  return out;
}

std::vector<uint8_t> encode(const std::vector<float>& v, bitepDataType_t dt) {
  std::vector<uint8_t> out(v.size() * dsize(dt));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == bitepFloat32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = dt == bitepBfloat16 ? bitep::host::float_to_bf16(v[i]) : bitep::host::float_to_half(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<float> decode(const std::vector<uint8_t>& b, bitepDataType_t dt) {
  const size_t n = b.size() / dsize(dt);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (dt == bitepFloat32) {
      std::memcpy(&out[i], b.data() + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, b.data() + 2 * i, 2);
      out[i] = dt == bitepBfloat16 ? bitep::host::bf16_to_float(h) : bitep::host::half_to_float(h);
    }
  }
  return out;
}

std::vector<float> make_bias(int E, uint64_t seed) {
  std::vector<float> b(E);
  for (int e = 0; e < E; ++e) b[e] = 0.05f * gauss(seed ^ 0xb1a5, e);
  return b;
}

// ---- running the API on either backend -----------------------------------------------------------

struct FwdSpec {
  bool probs = true, saved = true, weights = true, indices = true;
  bitepMapFormat_t map = bitepMapBytemap;
  int num_ranks = 0;
  bool aux = false;
  size_t logits_offset = 0;                   // bytes of misalignment of the logits pointer (cuda only)
  size_t probs_offset = 0, saved_offset = 0;  // likewise, probs and saved
  size_t bias_offset = 0;                     // likewise, expert_bias
};

struct FwdOut {
  bitepResult_t rc = bitepInternalError;
  std::string error;
  std::vector<float> probs, saved, weights;
  std::vector<int32_t> indices, rank_counts;
  std::vector<uint8_t> map, rank_mask;
  bool guards = true;
};

FwdOut run_forward(bitepBackend_t be,
                   const bitepRouterConfig_t& cfg,
                   int64_t T,
                   const std::vector<uint8_t>& logits,
                   const std::vector<float>& bias,
                   const FwdSpec& s) {
  const int E = cfg.num_experts, k = cfg.topk, W = s.num_ranks;
  const size_t TE = static_cast<size_t>(T) * E, Tk = static_cast<size_t>(T) * k;
  const size_t nmap = s.map == bitepMapNone ? 0 : static_cast<size_t>(T) * row_map_bytes(s.map, E);
  const size_t nmask = W > 0 ? static_cast<size_t>(T) * ((W + 7) / 8) : 0;
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.map_format = s.map;
  a.num_ranks = W;
  FwdOut out;
  auto finish = [&](auto& lg, auto& b, auto& pr, auto& sv, auto& w, auto& ix, auto& mp, auto& rm, auto& rc) {
    a.logits = lg.ptr();
    a.expert_bias = bias.empty() ? nullptr : static_cast<const float*>(b.ptr());
    a.probs = s.probs ? static_cast<float*>(pr.ptr()) : nullptr;
    a.saved = s.saved ? static_cast<float*>(sv.ptr()) : nullptr;
    a.topk_weights = s.weights ? static_cast<float*>(w.ptr()) : nullptr;
    a.topk_indices = s.indices ? static_cast<int32_t*>(ix.ptr()) : nullptr;
    a.routing_map = s.map == bitepMapNone ? nullptr : mp.ptr();
    a.rank_mask = W > 0 ? static_cast<uint8_t*>(rm.ptr()) : nullptr;
    a.rank_counts = W > 0 ? static_cast<int32_t*>(rc.ptr()) : nullptr;
    out.rc = s.aux ? bitepAuxScoresForward(be, &cfg, &a, nullptr) : bitepRouterForward(be, &cfg, &a, nullptr);
    if (out.rc != bitepSuccess) out.error = bitepGetLastError();
  };
  if (be == bitepBackendCuda) {
    DevBuf lg(logits.size(), s.logits_offset), b(bias.size() * 4, s.bias_offset), pr(TE * 4, s.probs_offset),
        sv(TE * 4, s.saved_offset), w(Tk * 4), ix(Tk * 4), mp(nmap), rm(nmask), rc(W * 4);
    lg.upload(logits.data());
    if (!bias.empty()) b.upload(bias.data());
    for (const DevBuf* d : {&pr, &sv, &w, &ix, &mp, &rm, &rc}) d->poison();
    finish(lg, b, pr, sv, w, ix, mp, rm, rc);
    if (cudaDeviceSynchronize() != cudaSuccess) {
      out.rc = bitepCudaError;
      out.error = cudaGetErrorString(cudaGetLastError());
      return out;
    }
    out.probs = pr.download<float>(), out.saved = sv.download<float>(), out.weights = w.download<float>();
    out.indices = ix.download<int32_t>(), out.map = mp.download<uint8_t>(), out.rank_mask = rm.download<uint8_t>();
    out.rank_counts = rc.download<int32_t>();
    for (const DevBuf* d : {&pr, &sv, &w, &ix, &mp, &rm, &rc}) out.guards = out.guards && d->guard_intact();
  } else {
    HostBuf lg(logits.size()), b(bias.size() * 4), pr(TE * 4), sv(TE * 4), w(Tk * 4), ix(Tk * 4), mp(nmap), rm(nmask),
        rc(W * 4);
    std::memcpy(lg.ptr(), logits.data(), logits.size());
    if (!bias.empty()) std::memcpy(b.ptr(), bias.data(), bias.size() * 4);
    finish(lg, b, pr, sv, w, ix, mp, rm, rc);
    out.probs = pr.get<float>(), out.saved = sv.get<float>(), out.weights = w.get<float>();
    out.indices = ix.get<int32_t>(), out.map = mp.get<uint8_t>(), out.rank_mask = rm.get<uint8_t>();
    out.rank_counts = rc.get<int32_t>();
    for (const HostBuf* h : {&pr, &sv, &w, &ix, &mp, &rm, &rc}) out.guards = out.guards && h->guard_intact();
  }
  return out;
}

// The GPU forward of cfg with every output, once writing a bytemap and once a bitmap (the backward tests' maps and
// saved tensor); a failed launch fails the calling test (ASSERT_NO_FATAL_FAILURE).
void forward_both_maps(
    const bitepRouterConfig_t& cfg, int64_t T, const std::vector<uint8_t>& logits, FwdOut* bytemap, FwdOut* bitmap) {
  FwdSpec spec;
  *bytemap = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
  ASSERT_EQ(bytemap->rc, bitepSuccess) << bytemap->error;
  spec.map = bitepMapBitmapU8;
  *bitmap = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
  ASSERT_EQ(bitmap->rc, bitepSuccess) << bitmap->error;
}

struct BwdOut {
  bitepResult_t rc = bitepInternalError;
  std::string error;
  std::vector<float> grad;  // grad_logits decoded to fp32
  bool guards = true;
};

// Bytes of misalignment of each backward buffer (cuda only).
struct BwdOffsets {
  size_t grad_probs = 0, map = 0, input = 0, grad_logits = 0;  // input: saved or logits
};

// saved empty: recompute from logits. map: format fmt (ignored for aux).
BwdOut run_backward(bitepBackend_t be,
                    const bitepRouterConfig_t& cfg,
                    int64_t T,
                    const std::vector<float>& grad_probs,
                    const std::vector<uint8_t>& map,
                    bitepMapFormat_t fmt,
                    const std::vector<float>& saved,
                    const std::vector<uint8_t>& logits,
                    bool aux,
                    const BwdOffsets& off = {}) {
  const size_t TE = static_cast<size_t>(T) * cfg.num_experts;
  const size_t gbytes = TE * dsize(cfg.logits_dtype);
  bitepRouterBackwardArgs_t a = BITEP_ROUTER_BWD_ARGS_INIT;
  a.num_tokens = T;
  a.map_format = aux ? bitepMapNone : fmt;
  BwdOut out;
  std::vector<uint8_t> graw;
  if (be == bitepBackendCuda) {
    DevBuf gp(TE * 4, off.grad_probs), mp(map.size(), off.map), sv(saved.size() * 4, off.input),
        lg(logits.size(), off.input), gl(gbytes, off.grad_logits);
    gp.upload(grad_probs.data());
    if (!map.empty()) mp.upload(map.data());
    if (!saved.empty()) sv.upload(saved.data());
    if (!logits.empty()) lg.upload(logits.data());
    gl.poison();
    a.grad_probs = static_cast<const float*>(gp.ptr());
    a.routing_map = aux ? nullptr : mp.ptr();
    a.saved = saved.empty() ? nullptr : static_cast<const float*>(sv.ptr());
    a.logits = saved.empty() ? lg.ptr() : nullptr;
    a.grad_logits = gl.ptr();
    out.rc = aux ? bitepAuxScoresBackward(be, &cfg, &a, nullptr) : bitepRouterBackward(be, &cfg, &a, nullptr);
    if (out.rc != bitepSuccess) out.error = bitepGetLastError();
    if (cudaDeviceSynchronize() != cudaSuccess) {
      out.rc = bitepCudaError;
      out.error = cudaGetErrorString(cudaGetLastError());
      return out;
    }
    graw = gl.download<uint8_t>();
    out.guards = gl.guard_intact();
  } else {
    HostBuf gl(gbytes);
    std::vector<float> gp = grad_probs, sv = saved;
    std::vector<uint8_t> mp = map, lg = logits;
    a.grad_probs = gp.data();
    a.routing_map = aux ? nullptr : mp.data();
    a.saved = saved.empty() ? nullptr : sv.data();
    a.logits = saved.empty() ? lg.data() : nullptr;
    a.grad_logits = gl.ptr();
    out.rc = aux ? bitepAuxScoresBackward(be, &cfg, &a, nullptr) : bitepRouterBackward(be, &cfg, &a, nullptr);
    if (out.rc != bitepSuccess) out.error = bitepGetLastError();
    graw = gl.get<uint8_t>();
    out.guards = gl.guard_intact();
  }
  out.grad = decode(graw, cfg.logits_dtype);
  return out;
}

// ---- comparisons ---------------------------------------------------------------------------------

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// Relative error of each row of got against want, ||got - want|| / ||want|| (NaN-aware: equal NaNs and
// equal infinities match; `rows`: only those, others 0).
template <class W>
std::vector<double> row_errors(const std::vector<W>& want,
                               const std::vector<float>& got,
                               int64_t T,
                               int width,
                               const std::vector<char>& rows = {}) {
  std::vector<double> err(T, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    if (!rows.empty() && !rows[t]) continue;
    double num = 0.0, den = 0.0;
    for (int i = 0; i < width; ++i) {
      const double w = want[t * width + i], g = got[t * width + i];
      if ((std::isnan(w) && std::isnan(g)) || (std::isinf(w) && w == g)) continue;
      const double d = g - w;
      num += std::isfinite(d) ? d * d : std::numeric_limits<double>::infinity();
      den += std::isfinite(w) ? w * w : 0.0;
    }
    err[t] = std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
  }
  return err;
}

// Worst row of min(a, b): a row passes when the GPU is close to the host or to the fp64 oracle (the host's
// sequential fp32 sums drift on long rows of similar values; the kernels' tree sums are closer to exact).
double worst_of_min(const std::vector<double>& a, const std::vector<double>& b) {
  double w = 0.0;
  for (size_t i = 0; i < a.size(); ++i) w = std::max(w, std::min(a[i], b[i]));
  return w;
}

int64_t count_bit_diffs(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) n += std::memcmp(&a[i], &b[i], 4) != 0;
  return n;
}

// f of the header: the width of the sums behind a value.
double width_factor(const bitepRouterConfig_t& c, bool aux) {
  const bool full = (c.score_function == bitepScoreSoftmax && (c.use_pre_softmax || aux)) ||
                    (aux && c.score_function != bitepScoreSoftmax && c.topk > 1);
  const int w = full ? c.num_experts : c.topk;
  return w > 32 ? std::sqrt(w / 32.0) : 1.0;
}

double grad_tol(bitepDataType_t dt, double f) {
  return dt == bitepFloat32 ? 4e-6 * f : dt == bitepBfloat16 ? 1e-2 : 2e-3;
}

// M of the header, fp64, from the logits, the map (bytemap) and grad_probs. into_sigmoid (optional):
// for sigmoid rows, the magnitude of the gradient reaching the sigmoid (M_e / sigmoid'(x_e)), else 0.
std::vector<double> grad_scale(const bitepRouterConfig_t& c,
                               int64_t T,
                               const std::vector<double>& x,
                               const std::vector<uint8_t>& bytemap,
                               const std::vector<float>& gp,
                               bool aux,
                               std::vector<double>* into_sigmoid = nullptr) {
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
        y[e] = std::sqrt(xr[e] > 20.0 ? xr[e] : std::log1p(std::exp(xr[e])));
        dv[e] = sg / (2.0 * y[e]);
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

// ||got - want|| / ||M|| of each row (NaN-aware; a row whose M is not finite uses ||want||).
template <class W>
std::vector<double> grad_errors(const std::vector<W>& want,
                                const std::vector<float>& got,
                                const std::vector<double>& M,
                                int64_t T,
                                int E,
                                double slack) {
  std::vector<double> err(T, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    double num = 0.0, den = 0.0, dw = 0.0;
    for (int e = 0; e < E; ++e) {
      const double w = want[t * E + e], g = got[t * E + e];
      if ((std::isnan(w) && std::isnan(g)) || (std::isinf(w) && w == g)) continue;
      const double d = std::max(0.0, std::fabs(g - w) - slack);
      num += std::isfinite(d) ? d * d : std::numeric_limits<double>::infinity();
      den += M[t * E + e] * M[t * E + e];
      dw += std::isfinite(w) ? w * w : 0.0;
    }
    if (!std::isfinite(den)) den = dw;
    err[t] = std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
  }
  return err;
}

std::string describe(const bitepRouterConfig_t& c, int64_t T) {
  std::ostringstream os;
  os << "T=" << T << " E=" << c.num_experts << " k=" << c.topk << " " << fn_name(c) << " " << dt_name(c.logits_dtype);
  if (c.num_groups) os << " groups=" << c.num_groups << "/" << c.group_topk;
  if (c.scaling_factor != 1.0f) os << " scale=" << c.scaling_factor;
  return os.str();
}

bitepRouterConfig_t make_config(int E, int k, bitepScoreFunction_t fn, int pre, bitepDataType_t dt) {
  bitepRouterConfig_t c = BITEP_ROUTER_CONFIG_INIT;
  c.num_experts = E;
  c.topk = k;
  c.score_function = fn;
  c.use_pre_softmax = pre;
  c.logits_dtype = dt;
  return c;
}

// The k the forward kernel must have been compiled for (kernels/router.h last_router_forward_topk) after a run that
// writes probs and saved: kernel is last_router_forward_kernel's. The spec kernels (1-4) at E 65-512 have an instance
// for k = 8 (router_topk_spec.cuh kconst_kernel), but for the bf16 post-top-k kernel at E 129-256, which takes it for
// the compact outputs alone (OptionalOutputs checks that one); 0 everywhere else.
int want_topk_instance(int kernel, int E, int k, bitepDataType_t dt) {
  const bool compact_only = dt == bitepBfloat16 && kernel == 1 && E > 128 && E <= 256;
  return kernel > 0 && k == 8 && E > 64 && E <= 512 && !compact_only ? 8 : 0;
}

// Rank mask and counts implied by a bytemap.
void ranks_from_map(const std::vector<uint8_t>& bytemap,
                    int64_t T,
                    int E,
                    int W,
                    std::vector<uint8_t>* mask,
                    std::vector<int32_t>* counts) {
  const int L = E / W, mb = (W + 7) / 8;
  mask->assign(static_cast<size_t>(T) * mb, 0);
  counts->assign(W, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int r = 0; r < W; ++r) {
      bool any = false;
      for (int e = r * L; e < (r + 1) * L; ++e) any = any || bytemap[t * E + e];
      if (any) {
        (*mask)[t * mb + r / 8] |= static_cast<uint8_t>(1u << (r % 8));
        ++(*counts)[r];
      }
    }
}

struct CaseStats {
  int64_t near_ties = 0, differing = 0, cases = 0;
};

// One configuration: GPU (bytemap and bitmap) against the host backend and the oracle, forward and
// backward. exact: degenerate rows, GPU indices must equal the host's.
void check_case(const bitepRouterConfig_t& cfg,
                int64_t T,
                const std::vector<uint8_t>& logits,
                const std::vector<float>& bias,
                bool aux,
                int num_ranks,
                CaseStats* stats,
                bool exact = false,
                size_t logits_offset = 0) {
  const int E = cfg.num_experts, k = cfg.topk;
  const std::string what = describe(cfg, T) + (aux ? " aux" : "") + (bias.empty() ? "" : " bias") +
                           (num_ranks ? " W=" + std::to_string(num_ranks) : "") + (logits_offset ? " misaligned" : "");
  SCOPED_TRACE(what);
  ++stats->cases;
  FwdSpec s;
  s.aux = aux;
  s.weights = s.indices = !aux;
  s.num_ranks = num_ranks;
  s.logits_offset = logits_offset;
  const FwdOut host = run_forward(bitepBackendHost, cfg, T, logits, bias, s);
  ASSERT_EQ(host.rc, bitepSuccess) << host.error;
  const FwdOut gpu = run_forward(bitepBackendCuda, cfg, T, logits, bias, s);
  ASSERT_EQ(gpu.rc, bitepSuccess) << gpu.error;
  FwdSpec sb = s;
  sb.map = bitepMapBitmapU8;
  const FwdOut gpub = run_forward(bitepBackendCuda, cfg, T, logits, bias, sb);
  ASSERT_EQ(gpub.rc, bitepSuccess) << gpub.error;
  EXPECT_TRUE(gpu.guards && gpub.guards) << "a kernel wrote past an output buffer";
  if (T == 0) return;

  // Maps: valid (k distinct experts, pad bits 0), bitmap == packed bytemap, compact == map.
  std::string err;
  const std::vector<int32_t> gidx = bitep::ref::indices_from_bytemap(gpu.map.data(), T, E, k, &err);
  ASSERT_TRUE(err.empty()) << "GPU bytemap: " << err;
  (void)bitep::ref::indices_from_bitmap(gpub.map.data(), T, E, k, &err);
  ASSERT_TRUE(err.empty()) << "GPU bitmap: " << err;
  ASSERT_EQ(bitep::ref::pack_bitmap(gpu.map.data(), T, E), gpub.map) << "GPU bitmap != packed GPU bytemap";
  const std::vector<int32_t> hidx = bitep::ref::indices_from_bytemap(host.map.data(), T, E, k, &err);
  ASSERT_TRUE(err.empty()) << "host bytemap: " << err;
  if (!aux) {
    EXPECT_EQ(gpu.indices, gidx) << "GPU topk_indices != GPU map";
    EXPECT_EQ(gpub.indices, gidx) << "GPU topk_indices (bitmap run) != GPU map";
  }

  // Against the oracle (and the host): every difference a near-tie.
  const std::vector<double> xd = bitep::ref::to_double(logits.data(), cfg.logits_dtype, T * E);
  const auto ref = bitep::ref::router_forward(cfg, T, xd, bias.empty() ? nullptr : bias.data(), aux);
  std::vector<char> same(T, 0);
  int64_t diff = 0;
  for (int64_t t = 0; t < T; ++t) {
    same[t] = std::equal(gidx.begin() + t * k, gidx.begin() + (t + 1) * k, hidx.begin() + t * k);
    diff += !same[t];
  }
  if (exact) {
    EXPECT_EQ(diff, 0) << "degenerate rows: GPU experts differ from the host's";
  } else {
    const auto cg = bitep::ref::compare_indices(ref, gidx, T, k, kNearTie);
    EXPECT_TRUE(cg.first_unexplained.empty()) << "GPU vs oracle: " << cg.first_unexplained;
    const auto ch = bitep::ref::compare_indices(ref, hidx, T, k, kNearTie);
    EXPECT_TRUE(ch.first_unexplained.empty()) << "host vs oracle (host bug?): " << ch.first_unexplained;
    stats->near_ties += cg.near_ties;
  }
  stats->differing += diff;

  // Values on the rows where GPU and host chose the same experts.
  const double f = width_factor(cfg, aux);
  const double tol = 1e-6 * f;
  std::vector<char> same_ref(T, 0);  // rows where the GPU chose the oracle's experts
  for (int64_t t = 0; t < T; ++t)
    same_ref[t] = same[t] && std::equal(gidx.begin() + t * k, gidx.begin() + (t + 1) * k, ref.indices.begin() + t * k);
  auto value_err = [&](const std::vector<float>& h, const std::vector<double>& r, const std::vector<float>& g, int w) {
    return worst_of_min(row_errors(h, g, T, w, same), row_errors(r, g, T, w, same_ref));
  };
  EXPECT_LE(value_err(host.probs, ref.probs, gpu.probs, E), tol) << "probs";
  EXPECT_LE(value_err(host.saved, ref.saved, gpu.saved, E), tol) << "saved";
  // Rows where the GPU chose other experts than the host: a top-k within rounding, with the values of its
  // own experts in fp64 (exact cases have none: they failed above).
  int64_t bad_rows = 0;
  std::string first_bad;
  for (int64_t t = 0; t < T && !exact; ++t) {
    if (same[t]) continue;
    const std::vector<int> chosen(gidx.begin() + t * k, gidx.begin() + (t + 1) * k);
    const auto v = bitep::ref::token_values(cfg, &xd[t * E], bias.empty() ? nullptr : bias.data(), chosen, aux);
    std::string why;
    bool ok = bitep::ref::near_tie_selection(cfg, v.sel, chosen, aux, kNearTie, &why);
    auto err = [&](const std::vector<double>& want, const std::vector<float>& got, int w) {
      return row_errors(want, std::vector<float>(got.begin() + t * w, got.begin() + (t + 1) * w), 1, w)[0];
    };
    const double e_probs = err(v.probs, gpu.probs, E), e_saved = err(v.saved, gpu.saved, E);
    const double e_w = aux ? 0.0 : err(v.weights, gpu.weights, k);
    if (ok && std::max({e_probs, e_saved, e_w}) > tol)
      ok = false, why = "values of its experts off: probs " + std::to_string(e_probs) + ", saved " +
                        std::to_string(e_saved) + ", weights " + std::to_string(e_w);
    if (!ok && bad_rows++ == 0) first_bad = "token " + std::to_string(t) + ": " + why;
  }
  EXPECT_EQ(bad_rows, 0) << "rows where the GPU chose other experts than the host: " << first_bad;
  EXPECT_EQ(count_bit_diffs(gpu.probs, gpub.probs), 0) << "probs differ between the bytemap and bitmap runs";
  if (!aux) {
    EXPECT_LE(value_err(host.weights, ref.weights, gpu.weights, k), tol) << "topk_weights";
    for (int64_t t = 0; t < T; ++t)  // compact weights are the dense probs at the indices
      for (int j = 0; j < k; ++j) {
        const float w = gpu.weights[t * k + j], pv = gpu.probs[t * E + gidx[t * k + j]];
        if (std::memcmp(&w, &pv, 4) != 0) {
          ADD_FAILURE() << "token " << t << ": topk_weights[" << j << "] = " << w << " but probs = " << pv;
          t = T;
          break;
        }
      }
  }
  if (num_ranks > 0) {
    std::vector<uint8_t> mask;
    std::vector<int32_t> counts;
    ranks_from_map(gpu.map, T, E, num_ranks, &mask, &counts);
    EXPECT_EQ(gpu.rank_mask, mask) << "rank_mask";
    EXPECT_EQ(gpu.rank_counts, counts) << "rank_counts";
    EXPECT_EQ(gpub.rank_counts, counts) << "rank_counts (bitmap run)";
  }

  // Backward: GPU from saved, GPU recompute, host from the same saved / logits / map.
  std::vector<float> gp(static_cast<size_t>(T) * E);
  for (size_t i = 0; i < gp.size(); ++i) gp[i] = gauss(0x9a9a, i);
  const double gt = grad_tol(cfg.logits_dtype, f);
  const double slack = cfg.logits_dtype == bitepFloat16 ? 5.97e-8 : 0.0;  // one fp16 subnormal step
  const std::vector<double> x64 = bitep::ref::to_double(logits.data(), cfg.logits_dtype, T * E);
  std::vector<double> into_sig;
  const std::vector<double> M = grad_scale(cfg, T, x64, gpu.map, gp, aux, &into_sig);
  // Saved vs recompute: recompute takes sigmoid' from the logits (exact to a few ulps), the saved path
  // from the fp32 sigmoid output y it holds, whose own rounding (and the forward's expf, a few ulps:
  // 2^-22 absolute in y, conservatively) bounds what y (1 - y) can say, whatever the tolerance: where
  // 1 - y is small, or y underflowed to 0 (x < -88), that term dominates. So this comparison allows
  // gt ||M|| + ||2^-22 g_sigmoid|| per row, as the scale M + 2^-22 g_sigmoid / gt.
  std::vector<double> M_sr = M;
  for (size_t i = 0; i < M_sr.size(); ++i) M_sr[i] += 0x1p-22 * into_sig[i] / gt;
  const std::vector<double> gref =
      bitep::ref::router_backward(cfg, T, x64, gpu.map, std::vector<double>(gp.begin(), gp.end()), aux);
  auto grad_err = [&](const std::vector<float>& host_grad, const std::vector<float>& got) {
    return worst_of_min(grad_errors(host_grad, got, M, T, E, slack), grad_errors(gref, got, M, T, E, slack));
  };
  for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8}) {
    const std::vector<uint8_t>& map = fmt == bitepMapBytemap ? gpu.map : gpub.map;
    const BwdOut gs = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, gpu.saved, {}, aux);
    ASSERT_EQ(gs.rc, bitepSuccess) << gs.error;
    const BwdOut gr = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, {}, logits, aux);
    ASSERT_EQ(gr.rc, bitepSuccess) << gr.error;
    const BwdOut hs = run_backward(bitepBackendHost, cfg, T, gp, map, fmt, gpu.saved, {}, aux);
    ASSERT_EQ(hs.rc, bitepSuccess) << hs.error;
    const BwdOut hr = run_backward(bitepBackendHost, cfg, T, gp, map, fmt, {}, logits, aux);
    ASSERT_EQ(hr.rc, bitepSuccess) << hr.error;
    EXPECT_TRUE(gs.guards && gr.guards) << "backward wrote past grad_logits";
    EXPECT_LE(grad_err(hs.grad, gs.grad), gt) << "grad_logits from saved vs host (or the fp64 oracle)";
    EXPECT_LE(grad_err(hr.grad, gr.grad), gt) << "grad_logits recomputed vs host (or the fp64 oracle)";
    const auto sr = grad_errors(gs.grad, gr.grad, M_sr, T, E, slack);
    EXPECT_LE(sr.empty() ? 0.0 : *std::max_element(sr.begin(), sr.end()), gt)
        << "grad_logits: saved vs recompute on the GPU";
    if (fmt == bitepMapBitmapU8 && !exact && count_bit_diffs(gs.grad, gr.grad) != 0)
      std::cout << "[ info ] " << what << ": saved / recompute gradients differ in "
                << count_bit_diffs(gs.grad, gr.grad) << " elements (within tolerance)\n";
  }
}

void report(const char* name, const CaseStats& s) {
  std::cout << "[ near-ties ] " << name << ": " << s.cases << " cases, " << s.differing
            << " tokens where GPU and host chose different experts, " << s.near_ties
            << " GPU tokens differing from the fp64 oracle, all near-ties (gap < " << kNearTie << ")\n";
}

// ---- tests ---------------------------------------------------------------------------------------

class RouterGrid : public ::testing::TestWithParam<int> {};

// T in {0, 1, 7, 4096} (4096 capped to 2^20 / E rows for E > 256: the fp64 oracle is the slow part),
// every k in {1, 2, 8, 32, E} <= E, every score function and softmax placement, all three logit dtypes
// (4096-row cases: fp32 and bf16).
TEST_P(RouterGrid, MatchesHostAndOracle) {
  REQUIRE_GPU();
  const int E = GetParam();
  CaseStats stats;
  std::vector<int> ks;
  for (int k : {1, 2, 8, 32, E})
    if (k <= E && std::find(ks.begin(), ks.end(), k) == ks.end()) ks.push_back(k);
  const int64_t big = std::min<int64_t>(4096, std::max<int64_t>(64, (int64_t{1} << 20) / E));
  for (int64_t T : {int64_t{0}, int64_t{1}, int64_t{7}, big})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16, bitepFloat16}) {
      if (T == big && dt == bitepFloat16) continue;
      const auto logits = make_logits(T, E, dt, 1000 + E * 7 + T);
      for (int k : ks)
        for (int f = 0; f < 4; ++f) {
          const bitepScoreFunction_t fn = f < 2    ? bitepScoreSoftmax
                                          : f == 2 ? bitepScoreSigmoid
                                                   : bitepScoreSqrtSoftplus;
          bitepRouterConfig_t cfg = make_config(E, k, fn, f == 1, dt);
          if (f == 3) cfg.scaling_factor = 1.5f;
          check_case(cfg, T, logits, {}, false, 0, &stats);
          if (HasFatalFailure()) return;
        }
    }
  report(("E=" + std::to_string(E)).c_str(), stats);
}

INSTANTIATE_TEST_SUITE_P(Experts,
                         RouterGrid,
                         ::testing::Values(1, 8, 32, 64, 100, 130, 256, 512, 1000, 2048, 3000),
                         [](const ::testing::TestParamInfo<int>& i) { return "E" + std::to_string(i.param); });

// Group-limited routing, expert_bias, scaling: DeepSeek-V3 (E = 256, 8 groups, keep 4, k = 8) and layouts
// that take the warp-per-token kernel (whole octets per group) or the generic one (E = 160, 20 per group;
// E = 1024 with 2 groups; E = 4096).
TEST(RouterGpu, GroupsBiasScaling) {
  REQUIRE_GPU();
  CaseStats stats;
  struct G {
    int E, k, groups, gtopk;
  };
  for (const G g : {G{256, 8, 8, 4}, G{64, 4, 8, 2}, G{160, 6, 8, 3}, G{512, 8, 4, 2}, G{2048, 32, 16, 4},
                    G{1024, 8, 2, 1}, G{4096, 8, 8, 4}, G{256, 16, 32, 8}})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (bitepScoreFunction_t fn : {bitepScoreSigmoid, bitepScoreSqrtSoftplus, bitepScoreSoftmax}) {
        const int64_t T = g.E > 1024 ? 129 : 1031;
        bitepRouterConfig_t cfg = make_config(g.E, g.k, fn, 0, dt);
        cfg.num_groups = g.groups;
        cfg.group_topk = g.gtopk;
        cfg.scaling_factor = 2.5f;
        const auto logits = make_logits(T, g.E, dt, 77 + g.E);
        const std::vector<float> bias = fn == bitepScoreSoftmax ? std::vector<float>{} : make_bias(g.E, g.E);
        check_case(cfg, T, logits, bias, false, 0, &stats);
        if (HasFatalFailure()) return;
      }
  report("groups", stats);
}

constexpr int64_t kDegenerateRows = 11;

// Row t of the degenerate set (t < kDegenerateRows; any other t an ordinary row): all equal, ties, -inf,
// +inf, NaN, mixtures, signed zeros, saturation and underflow.
float degenerate_logit(int64_t t, int e, int E) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float x = 0.0f;
  switch (t) {
    case 0:
      x = 0.5f;
      break;  // all equal
    case 1:
      x = -kInf;
      break;  // all -inf
    case 2:
      x = nan;
      break;  // all NaN
    case 3:
      x = e % 3 == 0 ? nan : static_cast<float>(e % 5 - 2);
      break;
    case 4:
      x = e % 2 ? kInf : -kInf;
      break;
    case 5:
      x = static_cast<float>(e % 4);
      break;  // many exact ties
    case 6:
      x = e % 7 == 0 ? kInf : 1.0f;
      break;
    case 7:
      x = e < E / 2 ? nan : -kInf;
      break;
    case 8:
      x = e % 2 ? -0.0f : 0.0f;
      break;  // signed zeros tie
    case 9:
      x = 30.0f + static_cast<float>(e % 3);
      break;  // sigmoid saturates to 1
    case 10:
      x = -100.0f - static_cast<float>(e % 2);
      break;  // exp underflows
    default:
      x = static_cast<float>((e * 7) % 11) - 5.0f;
      break;
  }
  return x;
}

// Degenerate rows: all equal, ties, -inf, +inf, NaN, mixtures; exactly k distinct experts, the host's.
TEST(RouterGpu, DegenerateRows) {
  REQUIRE_GPU();
  CaseStats stats;
  for (int E : {8, 64, 100, 128, 130, 256, 512, 2048, 3000})
    for (int k : {1, 8, E}) {
      if (k > E) continue;
      const int64_t T = 12;
      std::vector<float> v(static_cast<size_t>(T) * E);
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) v[t * E + e] = degenerate_logit(t, e, E);
      for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
        for (int f = 0; f < 4; ++f) {
          const bitepScoreFunction_t fn = f < 2    ? bitepScoreSoftmax
                                          : f == 2 ? bitepScoreSigmoid
                                                   : bitepScoreSqrtSoftplus;
          const bitepRouterConfig_t cfg = make_config(E, k, fn, f == 1, dt);
          check_case(cfg, T, encode(v, dt), {}, false, 0, &stats, /*exact=*/true);
          if (HasFatalFailure()) return;
        }
    }
  report("degenerate", stats);
}

// The degenerate rows through group-limited routing: ties, NaN and -inf inside a group's best keys (its
// score), between the group scores, and past the kept groups. Groups of one octet (q = 1), of four (DeepSeek-V3),
// group scores of one and two keys (the pair butterfly) and of four (the rounds), one octet a lane and two.
TEST(RouterGpu, DegenerateRowsGrouped) {
  REQUIRE_GPU();
  CaseStats stats;
  struct G {
    int E, k, groups, gtopk;
  };
  for (const G g :
       {G{256, 8, 8, 4}, G{64, 4, 8, 2}, G{256, 16, 32, 8}, G{128, 4, 4, 4}, G{512, 8, 4, 2}, G{512, 8, 16, 8}})
    for (bool with_bias : {false, true}) {
      const int64_t T = 12;
      std::vector<float> v(static_cast<size_t>(T) * g.E);
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < g.E; ++e) v[t * g.E + e] = degenerate_logit(t, e, g.E);
      for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
        for (bitepScoreFunction_t fn : {bitepScoreSigmoid, bitepScoreSoftmax}) {
          if (with_bias && fn == bitepScoreSoftmax) continue;  // softmax scores take no bias
          bitepRouterConfig_t cfg = make_config(g.E, g.k, fn, fn == bitepScoreSoftmax, dt);
          cfg.num_groups = g.groups;
          cfg.group_topk = g.gtopk;
          // A bias of a few values, so biased keys tie across experts too.
          std::vector<float> bias;
          if (with_bias)
            for (int e = 0; e < g.E; ++e) bias.push_back(static_cast<float>(e % 3) * 0.25f);
          check_case(cfg, T, encode(v, dt), bias, false, 0, &stats, /*exact=*/true);
          if (HasFatalFailure()) return;
        }
    }
  report("degenerate grouped", stats);
}

// A lane's cache of its best keys runs dry when it wins more rounds than the cache holds (2 or 3), and the lane then
// rescans its registers between rounds (kernels/router_topk_kernel.cuh): rows whose m best experts (m = 1 .. 16,
// distinct values) all sit in the slots of one lane, so that lane wins up to k rounds, beside rows of random logits.
// (The degenerate rows reach the rescans through ties alone.) One octet a lane at 16 lanes a token (E = 128) and 32 (E
// = 256), two (E = 512); the post-top-k softmax (its maps exact against the host), the pre-top-k softmax, the
// normalised sigmoid, and DeepSeek-V3's groups and bias; the spec kernel and its k = 8 instance asserted.
TEST(RouterGpu, TopkFromOneLane) {
  REQUIRE_GPU();
  CaseStats stats;
  const int64_t T = 300;
  for (int E : {128, 256, 512}) {
    const int octets = E / 8, lanes = octets <= 16 ? 16 : 32, ns = octets / lanes;
    std::vector<float> v(static_cast<size_t>(T) * E);
    for (int64_t t = 0; t < T; ++t) {
      for (int e = 0; e < E; ++e) v[t * E + e] = std::max(-2.5f, std::min(2.5f, 0.5f * gauss(0x1a7e + E, t * E + e)));
      if (t % 4 == 3) continue;  // a random row
      const int lane = static_cast<int>((t * 7) % lanes), m = 1 + static_cast<int>(t % (8 * ns));
      for (int i = 0; i < m; ++i) {
        const int slot = i % ns, b = 7 - (i / ns + static_cast<int>(t)) % 8;  // the lane's experts, scattered
        v[t * E + (slot * lanes + lane) * 8 + b] = 3.0f + 0.0625f * static_cast<float>(i);  // bf16-exact, distinct
      }
    }
    std::vector<float> small_bias(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) small_bias[e] = 0.01f * static_cast<float>(e % 5);
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (int k : {4, 8})
        for (int path = 0; path < 4; ++path) {  // post-top-k softmax, pre-top-k, sigmoid, DeepSeek-V3's groups
          if (path == 3 && (E != 256 || k != 8)) continue;
          bitepRouterConfig_t cfg =
              make_config(E, k, path >= 2 ? bitepScoreSigmoid : bitepScoreSoftmax, path == 1 ? 1 : 0, dt);
          std::vector<float> bias;
          if (path == 3) {
            cfg.num_groups = 8;
            cfg.group_topk = 4;
            cfg.scaling_factor = 2.5f;
            bias = small_bias;
          }
          check_case(cfg, T, encode(v, dt), bias, false, 0, &stats, /*exact=*/path == 0);
          if (HasFatalFailure()) return;
          const int want_kernel = path == 0 ? 1 : (path == 1 ? 2 : (path == 3 ? 4 : 3));
          const std::string what = describe(cfg, T);  // check_case's last run writes probs and saved
          EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), want_kernel) << what << ": the kernel chosen";
          EXPECT_EQ(bitep::kernels::last_router_forward_topk(), want_topk_instance(want_kernel, E, k, dt))
              << what << ": the instance for k = 8";
        }
  }
  report("top-k from one lane", stats);
}

// Dispatch layout epilogue: rank masks and counts (counts overwritten: the poison must go).
TEST(RouterGpu, RankEpilogue) {
  REQUIRE_GPU();
  CaseStats stats;
  struct R {
    int E, k, W;
  };
  for (const R r : {R{8, 2, 1}, R{8, 3, 8}, R{64, 6, 4}, R{130, 8, 10}, R{130, 8, 130}, R{256, 8, 8}, R{256, 8, 256},
                    R{2048, 32, 64}, R{3000, 8, 8}})
    for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid}) {
      const int64_t T = r.E > 1000 ? 100 : 777;
      const bitepRouterConfig_t cfg = make_config(r.E, r.k, fn, 0, bitepBfloat16);
      check_case(cfg, T, make_logits(T, r.E, bitepBfloat16, 5 + r.W), {}, false, r.W, &stats);
      if (HasFatalFailure()) return;
    }
  report("ranks", stats);
}

// Aux-loss scores (forward: scores over all E and their top-k map; backward).
TEST(RouterGpu, AuxScores) {
  REQUIRE_GPU();
  CaseStats stats;
  for (int E : {1, 8, 130, 256, 2048, 3000})
    for (int k : {1, 4})
      for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16, bitepFloat16})
        for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
          if (k > E) continue;
          const int64_t T = E > 1000 ? 65 : 513;
          const bitepRouterConfig_t cfg = make_config(E, k, fn, 0, dt);
          check_case(cfg, T, make_logits(T, E, dt, 31 + E), {}, true, 0, &stats);
          if (HasFatalFailure()) return;
        }
  report("aux scores", stats);
}

// Logits that are 4-byte but not 16-byte aligned: every row takes the scalar load path.
TEST(RouterGpu, MisalignedLogits) {
  REQUIRE_GPU();
  CaseStats stats;
  for (int E : {64, 256, 3000}) {
    const int64_t T = 300;
    const bitepRouterConfig_t cfg = make_config(E, 8, bitepScoreSigmoid, 0, bitepFloat32);
    check_case(cfg, T, make_logits(T, E, bitepFloat32, 9), {}, false, 0, &stats, false, /*logits_offset=*/4);
    if (HasFatalFailure()) return;
  }
  report("misaligned", stats);
}

// The backward with each input and the output misaligned (one at a time, then all): the same bits as
// with aligned buffers. The warp-per-token kernel stages whole aligned octets by async copies and the
// others through registers; both must read the same values (E = 64: 8 lanes a token; 256: one octet a
// lane; 512: two).
TEST(RouterGpu, BackwardMisalignedInputs) {
  REQUIRE_GPU();
  const int64_t T = 300;
  for (int E : {64, 256, 512})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid}) {
        const bitepRouterConfig_t cfg = make_config(E, 8, fn, 0, dt);
        const auto logits = make_logits(T, E, dt, 77 + E);
        FwdOut fwd, fwdb;
        ASSERT_NO_FATAL_FAILURE(forward_both_maps(cfg, T, logits, &fwd, &fwdb));
        std::vector<float> gp(static_cast<size_t>(T) * E);
        for (size_t i = 0; i < gp.size(); ++i) gp[i] = gauss(0x5151, i);
        const size_t es = dsize(dt);
        const BwdOffsets cases[] = {{4, 0, 0, 0},  {0, 1, 0, 0},  {0, 0, 4, 0},
                                    {0, 0, es, 0}, {0, 0, 0, es}, {4, 3, 4, es}};
        for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8})
          for (bool recompute : {false, true}) {
            const std::vector<uint8_t>& map = fmt == bitepMapBytemap ? fwd.map : fwdb.map;
            const std::vector<float> saved = recompute ? std::vector<float>{} : fwd.saved;
            const std::vector<uint8_t> lg = recompute ? logits : std::vector<uint8_t>{};
            const BwdOut base = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, saved, lg, false);
            ASSERT_EQ(base.rc, bitepSuccess) << base.error;
            for (const BwdOffsets& o : cases) {
              if (!recompute && o.input % 4 != 0) continue;  // the saved tensor is fp32
              const BwdOut got = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, saved, lg, false, o);
              ASSERT_EQ(got.rc, bitepSuccess) << got.error;
              EXPECT_TRUE(got.guards) << "backward wrote past grad_logits";
              ASSERT_EQ(got.grad.size(), base.grad.size());
              EXPECT_EQ(0, std::memcmp(got.grad.data(), base.grad.data(), got.grad.size() * sizeof(float)))
                  << "E=" << E << " " << dt_name(dt) << " " << fn_name(cfg) << (recompute ? " recompute" : " saved")
                  << (fmt == bitepMapBitmapU8 ? " bitmap" : " bytemap") << " offsets " << o.grad_probs << "/" << o.map
                  << "/" << o.input << "/" << o.grad_logits;
            }
          }
      }
}

// BITEP_ROUTER_SPEC=0 (read by the library per call) for one scope: the any-path router kernels only.
struct AnyPathKernels {
  AnyPathKernels() { setenv("BITEP_ROUTER_SPEC", "0", 1); }
  ~AnyPathKernels() { unsetenv("BITEP_ROUTER_SPEC"); }
};

template <class V>
bool same_bits(const V& a, const V& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
}

// Every output of two forward runs, bit for bit (an output neither run wrote is empty in both).
void expect_same_outputs(const FwdOut& got, const FwdOut& want, const std::string& what) {
  EXPECT_TRUE(same_bits(got.probs, want.probs)) << what << ": probs";
  EXPECT_TRUE(same_bits(got.saved, want.saved)) << what << ": saved";
  EXPECT_TRUE(same_bits(got.weights, want.weights)) << what << ": topk_weights";
  EXPECT_TRUE(same_bits(got.indices, want.indices)) << what << ": topk_indices";
  EXPECT_TRUE(same_bits(got.map, want.map)) << what << ": routing map";
  EXPECT_TRUE(same_bits(got.rank_mask, want.rank_mask)) << what << ": rank_mask";
  EXPECT_TRUE(same_bits(got.rank_counts, want.rank_counts)) << what << ": rank_counts";
}

// Weights of the forward's post-top-k softmax whose sum ran in another order (kernels/router_topk.cu, the
// holders): the same zeros, -inf and NaN as `want`, every other value within (2 k + 2) ulps relative (the
// two sums of k positive terms each within (k - 1) u of the exact one, then a rounding each). Returns the
// elements outside that, and the count of those that differ at all in `*differing`.
int64_t weights_outside(const std::vector<float>& got, const std::vector<float>& want, int k, int64_t* differing) {
  if (got.size() != want.size()) return static_cast<int64_t>(std::max(got.size(), want.size()));
  const double rel = (2.0 * k + 2.0) * std::ldexp(1.0, -24);
  int64_t bad = 0;
  *differing = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float a = got[i], b = want[i];
    if (std::memcmp(&a, &b, 4) == 0) continue;
    ++*differing;
    const bool ok = std::isnan(a) ? std::isnan(b)
                                  : (std::isfinite(a) && std::isfinite(b) && a != 0.0f && b != 0.0f &&
                                     std::fabs(static_cast<double>(a) - b) <= rel * std::fabs(static_cast<double>(b)));
    if (!ok) ++bad;
  }
  return bad;
}

// The kernels compiled for one score path (kernels/router_topk_spec.cuh FwdSpec, router_backward.cu BwdSpec) give
// the any-path kernels' outputs, which the other tests hold to the host reference: the same bits for every
// map, index and gradient; the forward's post-top-k softmax weights (probs, saved, topk_weights) within
// weights_outside's bound where k fits the lanes of a token (the holders sum in round order), the same bits
// past it. E = 64: 8 lanes a token; 100: 16 lanes, E % 8 != 0; 128: 16 lanes, whole rows (the holders' wide
// stores); 256: one octet a lane; 512: two (the backward staged); 1000: four; 2048: eight. k: 8, and for the post-top-k
// softmax also 1, 3, the lanes (G) and G + 1. The pre-top-k softmax and the normalised sigmoid also with groups (8 of
// them, 4 kept: a group is an octet at E = 64, four lanes at 256, eight octets over two slots at 512; E = 100 takes the
// generic kernel), expert bias, a scaling factor and the dispatch-layout epilogue (4 ranks).
TEST(RouterGpu, SpecKernelsMatchAnyPath) {
  REQUIRE_GPU();
  const int64_t T = 333;
  struct Path {
    bitepScoreFunction_t fn;
    int pre;
    int k;         // 0: 8 (32 at E = 2048); -1: the lanes of a token; -2: one more
    bool grouped;  // 8 groups, 4 kept, bias (sigmoid), scaling 2.5, 4 ranks
  };
  const Path paths[] = {
      {bitepScoreSoftmax, 0, 0, false},  {bitepScoreSoftmax, 1, 0, false}, {bitepScoreSigmoid, 0, 0, false},
      {bitepScoreSoftmax, 0, 1, false},  {bitepScoreSoftmax, 0, 3, false}, {bitepScoreSoftmax, 0, -1, false},
      {bitepScoreSoftmax, 0, -2, false}, {bitepScoreSigmoid, 0, 0, true},  {bitepScoreSoftmax, 1, 0, true}};
  for (int E : {64, 100, 128, 256, 512, 1000, 2048})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (const Path& path : paths) {
        const int lanes = std::min(32, (E + 7) / 8 <= 8 ? 8 : ((E + 7) / 8 <= 16 ? 16 : 32));
        if (E == 2048 && path.k != 0) continue;
        if (path.grouped && E > 512) continue;  // the any-path kernel in both runs
        const int k = path.k > 0 ? path.k : (path.k == -1 ? lanes : (path.k == -2 ? lanes + 1 : (E == 2048 ? 32 : 8)));
        const bool holders = path.fn == bitepScoreSoftmax && path.pre == 0 && E <= 2048 && k <= lanes;
        bitepRouterConfig_t cfg = make_config(E, k, path.fn, path.pre, dt);
        std::vector<float> bias;
        if (path.grouped) {
          cfg.num_groups = E == 100 ? 4 : 8;
          cfg.group_topk = 4;
          cfg.scaling_factor = 2.5f;
          if (path.fn == bitepScoreSigmoid) bias = make_bias(E, E + 1);
        }
        // The kernel that must run (kernels/router.h last_router_forward_kernel): groups of 25 experts (E =
        // 100) are not whole octets, so the generic kernel (-1); the post-top-k softmax's own kernels for k up
        // to the lanes, the pre-top-k softmax's and the sigmoid's up to E = 512, the sigmoid's in DeepSeek-V3's
        // shape (E = 256 grouped: 4 octets a group, k = 8) its own (4); else the any-path one (0).
        int want_kernel = 0;
        if (path.grouped && E == 100)
          want_kernel = -1;
        else if (path.fn == bitepScoreSoftmax && path.pre == 0)
          want_kernel = holders ? 1 : 0;
        else if (E <= 512)
          want_kernel = path.pre ? 2 : (path.grouped && E == 256 && k == 8 ? 4 : 3);
        // The first rows degenerate (NaN, +-inf, signed zeros, ties): the spec kernels' shortcuts (the
        // softmax's maximum from the first top-k round, the packed bf16 keys, the holders) must give the
        // any-path's selection there too, and its weights as above.
        auto logits = make_logits(T, E, dt, 21 + E);
        std::vector<float> deg(static_cast<size_t>(kDegenerateRows) * E);
        for (int64_t t = 0; t < kDegenerateRows; ++t)
          for (int e = 0; e < E; ++e) deg[t * E + e] = degenerate_logit(t, e, E);
        const auto deg_bytes = encode(deg, dt);
        std::copy(deg_bytes.begin(), deg_bytes.end(), logits.begin());
        std::vector<float> gp(static_cast<size_t>(T) * E);
        for (size_t i = 0; i < gp.size(); ++i) gp[i] = gauss(0x5eed, i);
        const std::string what = "E=" + std::to_string(E) + " k=" + std::to_string(k) + " " + dt_name(dt) + " " +
                                 fn_name(cfg) + (path.grouped ? " grouped" : "");
        for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8}) {
          FwdSpec spec;
          spec.map = fmt;
          spec.num_ranks = path.grouped ? 4 : 0;
          FwdOut any;
          BwdOut any_bwd, any_saved_bwd;
          {
            AnyPathKernels scope;
            any = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
            ASSERT_EQ(any.rc, bitepSuccess) << any.error;
            EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), std::min(want_kernel, 0)) << what;
            any_bwd = run_backward(bitepBackendCuda, cfg, T, gp, any.map, fmt, {}, logits, false);
            ASSERT_EQ(any_bwd.rc, bitepSuccess) << any_bwd.error;
            any_saved_bwd = run_backward(bitepBackendCuda, cfg, T, gp, any.map, fmt, any.saved, {}, false);
            ASSERT_EQ(any_saved_bwd.rc, bitepSuccess) << any_saved_bwd.error;
          }
          const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
          ASSERT_EQ(got.rc, bitepSuccess) << got.error;
          EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), want_kernel) << what << ": the kernel chosen";
          // The spec kernels' instance for k = 8 must be the one checked here (the runs write probs and saved).
          EXPECT_EQ(bitep::kernels::last_router_forward_topk(), want_topk_instance(want_kernel, E, k, dt))
              << what << ": the instance for k = 8";
          EXPECT_TRUE(got.guards) << what << ": forward wrote past a buffer";
          if (want_kernel == 4) {
            // DeepSeek-V3's kernel loads the bias by 16-byte loads: a bias 4 bytes off takes the sigmoid's
            // general kernel (3), and both give the any-path kernel's bits (checked below for `got`).
            FwdSpec mis = spec;
            mis.bias_offset = 4;
            const FwdOut got3 = run_forward(bitepBackendCuda, cfg, T, logits, bias, mis);
            ASSERT_EQ(got3.rc, bitepSuccess) << got3.error;
            EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), 3) << what << ": misaligned bias";
            EXPECT_TRUE(got3.guards) << what << ": misaligned bias: forward wrote past a buffer";
            expect_same_outputs(got3, any, what + ": misaligned bias");
          }
          EXPECT_TRUE(same_bits(got.map, any.map)) << what << ": routing map";
          EXPECT_TRUE(same_bits(got.indices, any.indices)) << what << ": topk_indices";
          EXPECT_TRUE(same_bits(got.rank_mask, any.rank_mask)) << what << ": rank_mask";
          EXPECT_TRUE(same_bits(got.rank_counts, any.rank_counts)) << what << ": rank_counts";
          if (holders) {
            int64_t differing = 0;
            EXPECT_EQ(0, weights_outside(got.weights, any.weights, k, &differing)) << what << ": topk_weights";
            EXPECT_EQ(0, weights_outside(got.probs, any.probs, k, &differing)) << what << ": probs";
            const int64_t probs_differing = differing;
            EXPECT_EQ(0, weights_outside(got.saved, any.saved, k, &differing)) << what << ": saved";
            if (fmt == bitepMapBitmapU8 && E == 256)
              std::cout << "[ info ] " << what << ": " << probs_differing << " probs and " << differing
                        << " saved values differ from the any-path kernel's in their last bits\n";
          } else {
            EXPECT_TRUE(same_bits(got.weights, any.weights)) << what << ": topk_weights";
            EXPECT_TRUE(same_bits(got.probs, any.probs)) << what << ": probs";
            EXPECT_TRUE(same_bits(got.saved, any.saved)) << what << ": saved";
          }
          const BwdOut bwd = run_backward(bitepBackendCuda, cfg, T, gp, got.map, fmt, {}, logits, false);
          ASSERT_EQ(bwd.rc, bitepSuccess) << bwd.error;
          const int want_bwd = path.fn == bitepScoreSoftmax && path.pre == 0 && E > 256 ? 1 : 0;  // the routed kernel
          EXPECT_EQ(bitep::kernels::last_router_backward_kernel(), want_bwd) << what << ": the backward kernel";
          EXPECT_TRUE(bwd.guards) << what << ": backward wrote past grad_logits";
          EXPECT_TRUE(same_bits(bwd.grad, any_bwd.grad)) << what << ": grad_logits (recompute)";
          // The saved tensor's backward (the post-top-k softmax's has a kernel of its own) from the same inputs.
          const BwdOut saved_bwd = run_backward(bitepBackendCuda, cfg, T, gp, any.map, fmt, any.saved, {}, false);
          ASSERT_EQ(saved_bwd.rc, bitepSuccess) << saved_bwd.error;
          EXPECT_TRUE(saved_bwd.guards) << what << ": backward wrote past grad_logits";
          EXPECT_TRUE(same_bits(saved_bwd.grad, any_saved_bwd.grad)) << what << ": grad_logits (saved)";
        }
      }
}

// The post-top-k softmax's gradient is 0 at every expert a token did not route to, and its backward reads only the
// routed octets or experts (kernels/router_backward.cu: kSparse; kernels/router_backward_routed.cu): NaN in grad_probs,
// the saved tensor and the logits at every unrouted expert leaves grad_logits as it is, bit for bit, in both modes and
// map formats. E = 64: 8 lanes a token; 100: a partial last octet; 256: one octet a lane; 512: two (the saved mode
// kSparse, the recompute the routed kernel); 2048: eight (the routed kernel). T = 333: a last partial tile.
TEST(RouterGpu, BackwardIgnoresUnroutedInputs) {
  REQUIRE_GPU();
  const int64_t T = 333;
  for (int E : {64, 100, 256, 512, 2048})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const int k = E == 2048 ? 32 : 8;
      const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, 0, dt);
      const auto logits = make_logits(T, E, dt, 91 + E);
      FwdOut fwd, fwdb;
      ASSERT_NO_FATAL_FAILURE(forward_both_maps(cfg, T, logits, &fwd, &fwdb));
      std::vector<float> gp(static_cast<size_t>(T) * E);
      for (size_t i = 0; i < gp.size(); ++i) gp[i] = gauss(0x7a7a, i);
      // The same inputs with NaN at every unrouted expert (fwd.map is the bytemap).
      std::vector<float> gp_nan = gp, saved_nan = fwd.saved;
      std::vector<uint8_t> logits_nan = logits;
      const size_t es = dsize(dt);
      int64_t unrouted = 0;
      for (size_t i = 0; i < gp.size(); ++i) {
        if (fwd.map[i] != 0) continue;
        ++unrouted;
        gp_nan[i] = saved_nan[i] = std::numeric_limits<float>::quiet_NaN();
        if (dt == bitepFloat32) {
          const uint32_t nan = 0x7fc00000u;
          std::memcpy(logits_nan.data() + i * es, &nan, es);
        } else {
          const uint16_t nan = 0x7fc0u;
          std::memcpy(logits_nan.data() + i * es, &nan, es);
        }
      }
      ASSERT_EQ(unrouted, T * (E - k)) << "E=" << E;
      for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8})
        for (bool recompute : {false, true}) {
          const std::vector<uint8_t>& map = fmt == bitepMapBytemap ? fwd.map : fwdb.map;
          const std::string what = "E=" + std::to_string(E) + " " + dt_name(dt) +
                                   (recompute ? " recompute" : " saved") +
                                   (fmt == bitepMapBitmapU8 ? " bitmap" : " bytemap");
          const BwdOut clean =
              run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, recompute ? std::vector<float>{} : fwd.saved,
                           recompute ? logits : std::vector<uint8_t>{}, false);
          ASSERT_EQ(clean.rc, bitepSuccess) << clean.error;
          const BwdOut nan =
              run_backward(bitepBackendCuda, cfg, T, gp_nan, map, fmt, recompute ? std::vector<float>{} : saved_nan,
                           recompute ? logits_nan : std::vector<uint8_t>{}, false);
          ASSERT_EQ(nan.rc, bitepSuccess) << nan.error;
          EXPECT_TRUE(nan.guards) << what << ": backward wrote past grad_logits";
          EXPECT_TRUE(same_bits(nan.grad, clean.grad)) << what;
          int64_t nonzero_unrouted = 0;
          for (size_t i = 0; i < clean.grad.size(); ++i)
            if (fwd.map[i] == 0 && clean.grad[i] != 0.0f) ++nonzero_unrouted;
          EXPECT_EQ(0, nonzero_unrouted) << what << ": a gradient at an unrouted expert";
        }
    }
}

// The post-top-k softmax's backward kernels on maps not from a forward, 0 to E routed experts a token. Above 512
// experts, and above 256 for the recompute, router_backward_routed (kernels/router_backward_routed.cu) gathers a
// token's routed experts, one a lane, where every token of a warp's tile has at most 32, and takes a tile with more an
// octet at a time; below, the bucket kernel reads the routed octets alone. Tokens 0-110 within the lanes (every tile
// gathered), 111-221 every third past them (tiles of both kinds), 222-332 any count; token 5 routes every expert, 6
// every element of lane 0, 7 lane 0's first octet (one owner with 8 routed elements); bytemap bytes of any nonzero
// value. In both modes and map formats: the kernel expected ran, with the any-path kernel's bits and 0 at every
// unrouted expert; the recompute within tolerance of the host's.
TEST(RouterGpu, BackwardAnyRoutedCount) {
  REQUIRE_GPU();
  const int64_t T = 333;
  for (int E : {64, 100, 130, 256, 512, 1000, 2048})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const int octets = (E + 7) / 8, lanes = octets <= 8 ? 8 : (octets <= 16 ? 16 : 32);
      const bitepRouterConfig_t cfg = make_config(E, 8, bitepScoreSoftmax, 0, dt);
      const auto logits = make_logits(T, E, dt, 17 + E);
      std::vector<uint8_t> bytemap(static_cast<size_t>(T) * E, 0);
      std::vector<float> gp(bytemap.size()), saved(bytemap.size());
      for (size_t i = 0; i < gp.size(); ++i) {
        gp[i] = gauss(0x3b3b, i);
        saved[i] = static_cast<float>(mix(0x5a5a0000ull + i) >> 40) * 0x1p-24f;  // [0, 1)
      }
      int64_t past_lanes = 0;
      std::vector<int> perm(E);
      for (int64_t t = 0; t < T; ++t) {
        uint8_t* row = &bytemap[t * E];
        const uint64_t h = mix((static_cast<uint64_t>(0x7c7c + E) << 32) + static_cast<uint64_t>(t));
        auto route = [&](int e) { row[e] = static_cast<uint8_t>(1 + (e * 37 + t) % 255); };
        if (t == 5) {
          for (int e = 0; e < E; ++e) route(e);
        } else if (t == 6 || t == 7) {
          for (int e = 0; e < E; ++e)
            if ((e / 8) % lanes == 0 && (t == 6 || e < 8)) route(e);
        } else {
          int K = 0;
          if (t < 111)
            K = static_cast<int>(h % (lanes + 1));
          else if (t < 222)
            K = t % 3 == 0 ? lanes + 1 + static_cast<int>(h % (E - lanes)) : static_cast<int>(h % (lanes + 1));
          else
            K = static_cast<int>(h % (E + 1));
          for (int e = 0; e < E; ++e) perm[e] = e;
          for (int j = 0; j < K; ++j) {  // the first K of a seeded shuffle
            const int r = j + static_cast<int>(mix(h + static_cast<uint64_t>(j)) % static_cast<uint64_t>(E - j));
            std::swap(perm[j], perm[r]);
            route(perm[j]);
          }
        }
        int K = 0;
        for (int e = 0; e < E; ++e) K += row[e] != 0;
        past_lanes += K > lanes;
      }
      ASSERT_GT(past_lanes, 20) << "E=" << E << ": too few tokens past the lanes";
      const auto bitmap = bitep::ref::pack_bitmap(bytemap.data(), T, E);
      std::vector<uint8_t> routed01(bytemap.size());
      for (size_t i = 0; i < bytemap.size(); ++i) routed01[i] = bytemap[i] != 0;
      bitepRouterConfig_t wide = cfg;
      wide.topk = E;  // the sums' width: up to E routed experts
      const double gt = grad_tol(dt, width_factor(wide, false));
      const std::vector<double> M =
          grad_scale(cfg, T, bitep::ref::to_double(logits.data(), dt, T * E), routed01, gp, false);
      for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8})
        for (bool recompute : {false, true}) {
          const std::vector<uint8_t>& map = fmt == bitepMapBytemap ? bytemap : bitmap;
          const std::vector<float> sv = recompute ? std::vector<float>{} : saved;
          const std::vector<uint8_t> lg = recompute ? logits : std::vector<uint8_t>{};
          const std::string what = "E=" + std::to_string(E) + " " + dt_name(dt) +
                                   (recompute ? " recompute" : " saved") +
                                   (fmt == bitepMapBitmapU8 ? " bitmap" : " bytemap");
          const BwdOut got = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, sv, lg, false);
          ASSERT_EQ(got.rc, bitepSuccess) << got.error;
          const int want_kernel = E > 512 || (E > 256 && recompute) ? 1 : 0;
          EXPECT_EQ(bitep::kernels::last_router_backward_kernel(), want_kernel) << what << ": the kernel chosen";
          BwdOut any;
          {
            AnyPathKernels scope;
            any = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, sv, lg, false);
            ASSERT_EQ(any.rc, bitepSuccess) << any.error;
            EXPECT_EQ(bitep::kernels::last_router_backward_kernel(), 0) << what << ": the any-path kernel";
          }
          EXPECT_TRUE(got.guards) << what << ": backward wrote past grad_logits";
          EXPECT_EQ(count_bit_diffs(got.grad, any.grad), 0) << what << ": elements that differ from the any-path's";
          int64_t nonzero_unrouted = 0;
          for (size_t i = 0; i < got.grad.size(); ++i) nonzero_unrouted += !routed01[i] && got.grad[i] != 0.0f;
          EXPECT_EQ(nonzero_unrouted, 0) << what << ": gradients at unrouted experts";
          if (recompute) {
            const BwdOut host = run_backward(bitepBackendHost, cfg, T, gp, map, fmt, sv, lg, false);
            ASSERT_EQ(host.rc, bitepSuccess) << host.error;
            const auto err = grad_errors(host.grad, got.grad, M, T, E, 0.0);
            EXPECT_LE(*std::max_element(err.begin(), err.end()), gt) << what << ": against the host";
          }
        }
    }
}

// The post-top-k softmax's own kernel writes a warp's dense rows as unselected with stores that span its
// lanes' octets when every row of the warp is whole and probs and saved are 16-byte aligned, and a lane's
// own octet otherwise. probs or saved 4 bytes off (every row takes the per-lane stores), E = 200 (lanes past
// the last octet) and T = 333 (a last tile with tokens past T where a warp holds several): the same bits as
// the aligned run, and nothing written past either buffer.
TEST(RouterGpu, HolderOutputsMisaligned) {
  REQUIRE_GPU();
  const int64_t T = 333;
  for (int E : {64, 128, 200, 256, 512})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const bitepRouterConfig_t cfg = make_config(E, 8, bitepScoreSoftmax, 0, dt);
      const auto logits = make_logits(T, E, dt, 5 + E);
      FwdSpec aligned;
      aligned.map = bitepMapBitmapU8;
      const FwdOut want = run_forward(bitepBackendCuda, cfg, T, logits, {}, aligned);
      ASSERT_EQ(want.rc, bitepSuccess) << want.error;
      EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), 1) << "E=" << E << ": the post-top-k softmax kernel";
      EXPECT_TRUE(want.guards);
      for (int which = 1; which <= 3; ++which) {
        FwdSpec spec = aligned;
        spec.probs_offset = (which & 1) ? 4 : 0;
        spec.saved_offset = (which & 2) ? 4 : 0;
        const std::string what = "E=" + std::to_string(E) + " " + dt_name(dt) + " probs +" +
                                 std::to_string(spec.probs_offset) + " saved +" + std::to_string(spec.saved_offset);
        const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
        ASSERT_EQ(got.rc, bitepSuccess) << got.error;
        EXPECT_TRUE(got.guards) << what << ": wrote past a buffer";
        expect_same_outputs(got, want, what);
      }
    }
}

// Outputs are optional one by one; a forward with only the compact outputs gives the same experts.
TEST(RouterGpu, OptionalOutputs) {
  REQUIRE_GPU();
  const int64_t T = 1000;
  const int E = 256, k = 8;
  const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, 0, bitepBfloat16);
  const auto logits = make_logits(T, E, bitepBfloat16, 3);
  FwdSpec all;
  const FwdOut full = run_forward(bitepBackendCuda, cfg, T, logits, {}, all);
  ASSERT_EQ(full.rc, bitepSuccess) << full.error;
  EXPECT_EQ(bitep::kernels::last_router_forward_topk(), 0) << "with probs and saved: the runtime-k instance";
  FwdSpec compact;
  compact.probs = compact.saved = false;
  compact.map = bitepMapNone;
  const FwdOut c = run_forward(bitepBackendCuda, cfg, T, logits, {}, compact);
  ASSERT_EQ(c.rc, bitepSuccess) << c.error;
  EXPECT_EQ(bitep::kernels::last_router_forward_topk(), 8) << "compact outputs alone: the instance for k = 8";
  EXPECT_EQ(c.indices, full.indices);
  EXPECT_EQ(count_bit_diffs(c.weights, full.weights), 0);
  FwdSpec map_only;
  map_only.probs = map_only.saved = map_only.weights = map_only.indices = false;
  map_only.map = bitepMapBitmapU8;
  const FwdOut m = run_forward(bitepBackendCuda, cfg, T, logits, {}, map_only);
  ASSERT_EQ(m.rc, bitepSuccess) << m.error;
  EXPECT_EQ(m.map, bitep::ref::pack_bitmap(full.map.data(), T, E));
}

// The generic kernel holds a block's group scores in shared memory: one group past what fits is refused with
// bitepNotSupported naming config->num_groups, before anything is written (rank_counts keeps its poison, 0xff
// bytes); the most that fit routes as the host does.
TEST(RouterGpu, GroupsPastSharedMemory) {
  REQUIRE_GPU();
  int max_groups = 0;
  ASSERT_EQ(bitep::kernels::router_forward_max_groups(&max_groups), cudaSuccess);
  ASSERT_GT(max_groups, 1000);
  const int64_t T = 3;
  FwdSpec spec;
  spec.map = bitepMapBitmapU8;
  spec.num_ranks = 1;
  for (int groups : {max_groups + 1, max_groups}) {
    bitepRouterConfig_t cfg = make_config(groups, 2, bitepScoreSigmoid, 0, bitepFloat32);
    cfg.num_groups = groups;  // one expert a group
    cfg.group_topk = 2;
    const auto logits = make_logits(T, groups, bitepFloat32, 9);
    const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
    if (groups > max_groups) {
      EXPECT_EQ(got.rc, bitepNotSupported) << got.error;
      EXPECT_NE(got.error.find("config->num_groups"), std::string::npos) << got.error;
      EXPECT_EQ(got.rank_counts, std::vector<int32_t>(1, -1)) << "rank_counts written on a refused call";
    } else {
      ASSERT_EQ(got.rc, bitepSuccess) << got.error;
      const FwdOut want = run_forward(bitepBackendHost, cfg, T, logits, {}, spec);
      ASSERT_EQ(want.rc, bitepSuccess) << want.error;
      EXPECT_EQ(got.map, want.map);
      EXPECT_EQ(got.rank_counts, want.rank_counts);
    }
    EXPECT_TRUE(got.guards);
  }
}

// Aux loss: GPU vs host, forward and backward; the forward is bit-identical run to run.
TEST(RouterGpu, AuxLoss) {
  REQUIRE_GPU();
  struct A {
    int64_t T;
    int E, k;
  };
  for (const A c : {A{0, 8, 2}, A{1, 1, 1}, A{7, 3, 2}, A{4096, 130, 8}, A{65536, 64, 6}, A{1000, 2048, 32}})
    for (size_t offset : {size_t{0}, size_t{4}}) {
      SCOPED_TRACE("T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) + " offset=" + std::to_string(offset));
      const size_t TE = static_cast<size_t>(c.T) * c.E;
      std::vector<float> probs(TE);
      for (size_t i = 0; i < TE; ++i) probs[i] = std::fabs(gauss(11, i)) * 0.1f;
      std::vector<int32_t> tpe(c.E);
      for (int e = 0; e < c.E; ++e) tpe[e] = static_cast<int32_t>(mix(e) % 5000);
      bitepAuxLossArgs_t a = BITEP_AUX_LOSS_ARGS_INIT;
      a.num_tokens = c.T;
      a.num_experts = c.E;
      a.topk = c.k;
      a.total_num_tokens = c.T > 0 ? 3 * c.T : 1;
      a.coeff = 1e-2f;
      // host
      std::vector<float> hp = probs;
      float hloss = -1.0f, hgl = 0.75f;
      std::vector<float> hgrad(TE + 1, -1.0f);
      a.probs = hp.data(), a.tokens_per_expert = tpe.data(), a.loss = &hloss, a.grad_loss = &hgl;
      a.grad_probs = hgrad.data();
      ASSERT_EQ(bitepAuxLossForward(bitepBackendHost, &a, nullptr), bitepSuccess) << bitepGetLastError();
      ASSERT_EQ(bitepAuxLossBackward(bitepBackendHost, &a, nullptr), bitepSuccess) << bitepGetLastError();
      // device
      DevBuf dp(TE * 4, offset), dt(c.E * 4), dl(4), dg(4), dgrad(TE * 4, offset);
      if (TE) dp.upload(probs.data());
      dt.upload(tpe.data());
      dg.upload(&hgl);
      float loss[2];
      for (int run = 0; run < 2; ++run) {
        dl.poison();
        a.probs = c.T ? static_cast<const float*>(dp.ptr()) : nullptr;
        a.tokens_per_expert = static_cast<const int32_t*>(dt.ptr());
        a.loss = static_cast<float*>(dl.ptr());
        ASSERT_EQ(bitepAuxLossForward(bitepBackendCuda, &a, nullptr), bitepSuccess) << bitepGetLastError();
        CUDA_OK(cudaDeviceSynchronize());
        loss[run] = dl.download<float>()[0];
      }
      EXPECT_EQ(std::memcmp(&loss[0], &loss[1], 4), 0)
          << "aux loss not deterministic: " << loss[0] << " vs " << loss[1];
      EXPECT_NEAR(loss[0], hloss, 1e-6 * std::fabs(hloss) + 1e-30) << "aux loss vs host";
      if (c.T > 0) {
        dgrad.poison();
        a.grad_loss = static_cast<const float*>(dg.ptr());
        a.grad_probs = static_cast<float*>(dgrad.ptr());
        ASSERT_EQ(bitepAuxLossBackward(bitepBackendCuda, &a, nullptr), bitepSuccess) << bitepGetLastError();
        CUDA_OK(cudaDeviceSynchronize());
        const auto g = dgrad.download<float>();
        hgrad.resize(TE);
        EXPECT_EQ(count_bit_diffs(g, hgrad), 0) << "aux loss gradient differs from the host";
        EXPECT_TRUE(dgrad.guard_intact());
      }
    }
}

// One shape of LargeTokenCount64BitIndexing below.
void large_token_count_case(int E, int64_t T) {
  const int k = 8, tile = 256;
  size_t free_b = 0, total_b = 0;
  CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
  const size_t need = static_cast<size_t>(T) * E * 2 + static_cast<size_t>(T) * (E / 8 + 8 * k) + (size_t{1} << 30);
  if (free_b < need) GTEST_SKIP() << "needs " << (need >> 20) << " MiB of device memory, " << (free_b >> 20) << " free";
  // Post-top-k softmax selects on the logits themselves: no rounding, so no near-ties to excuse.
  const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, 0, bitepBfloat16);
  const auto tl = make_logits(tile, E, bitepBfloat16, 4242);
  FwdSpec s;
  s.probs = s.saved = false;
  s.map = bitepMapBitmapU8;
  const FwdOut want = run_forward(bitepBackendHost, cfg, tile, tl, {}, s);
  ASSERT_EQ(want.rc, bitepSuccess) << want.error;

  DevBuf lg(static_cast<size_t>(T) * E * 2), mp(static_cast<size_t>(T) * E / 8), ix(static_cast<size_t>(T) * k * 4),
      w(static_cast<size_t>(T) * k * 4);
  ASSERT_NE(lg.ptr(), nullptr);
  CUDA_OK(cudaMemcpy(lg.ptr(), tl.data(), tl.size(), cudaMemcpyHostToDevice));
  for (size_t done = tl.size(); done < lg.bytes;) {  // double the filled prefix each copy
    const size_t n = std::min(done, lg.bytes - done);
    CUDA_OK(cudaMemcpy(static_cast<char*>(lg.ptr()) + done, lg.ptr(), n, cudaMemcpyDeviceToDevice));
    done += n;
  }
  mp.poison(), ix.poison(), w.poison();
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.logits = lg.ptr();
  a.routing_map = mp.ptr();
  a.map_format = bitepMapBitmapU8;
  a.topk_indices = static_cast<int32_t*>(ix.ptr());
  a.topk_weights = static_cast<float*>(w.ptr());
  ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
  CUDA_OK(cudaDeviceSynchronize());
  for (int64_t first : {int64_t{0}, T - 2 * tile}) {
    std::vector<int32_t> got(2 * tile * k);
    std::vector<uint8_t> map(2 * tile * E / 8);
    CUDA_OK(
        cudaMemcpy(got.data(), static_cast<int32_t*>(ix.ptr()) + first * k, got.size() * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(
        cudaMemcpy(map.data(), static_cast<uint8_t*>(mp.ptr()) + first * E / 8, map.size(), cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < 2 * tile; ++i) {
      const int64_t r = (first + i) % tile;
      ASSERT_TRUE(std::equal(got.begin() + i * k, got.begin() + (i + 1) * k, want.indices.begin() + r * k))
          << "token " << first + i;
      ASSERT_TRUE(std::equal(map.begin() + i * E / 8, map.begin() + (i + 1) * E / 8, want.map.begin() + r * E / 8))
          << "bitmap row of token " << first + i;
    }
  }
  EXPECT_TRUE(mp.guard_intact() && ix.guard_intact() && w.guard_intact());
}

// 64-bit indexing: T * E > 2^31 (bf16 logits: 4.3 GB), at E = 2048 and at E = 256 (whose post-softmax
// kernels, with 32-bit offsets, stop at (T + 256) * E < 2^31: the any-path kernel takes over past it; just
// below, the 32-bit kernels' largest offsets). Rows repeat a 256-row tile, so the expected experts of any
// row are the host's for its tile row; the first and last rows are checked.
TEST(RouterGpu, LargeTokenCount64BitIndexing) {
  REQUIRE_GPU();
  struct Shape {
    int E;
    int64_t T;
  };
  for (const Shape sh :
       {Shape{2048, (int64_t{1} << 31) / 2048 + 300}, Shape{256, (int64_t{1} << 31) / 256 + 300},
        Shape{256, (int64_t{1} << 31) / 256 - 256 - 40}, Shape{2048, (int64_t{1} << 31) / 2048 - 256 - 40}}) {
    SCOPED_TRACE("E=" + std::to_string(sh.E) + " T=" + std::to_string(sh.T));
    large_token_count_case(sh.E, sh.T);
    if (HasFatalFailure()) return;
  }
}

}  // namespace
