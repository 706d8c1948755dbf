// SPDX-License-Identifier: Apache-2.0
// The router GPU tests' shared helpers (router_gpu_test.h, which documents each).
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "src/host/dtype_host.h"
#include "tests/gpu/router_gpu_test.h"
#include "tests/reference/router_reference.h"

namespace router_gpu_test {

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

int dsize(bitepDataType_t dt) { return dt == bitepFloat32 ? 4 : 2; }

int row_map_bytes(bitepMapFormat_t f, int E) { return f == bitepMapBytemap ? E : (E + 7) / 8; }

const char* fn_name(const bitepRouterConfig_t& c) {
  if (c.score_function == bitepScoreSigmoid) return "sigmoid";
  if (c.score_function == bitepScoreSqrtSoftplus) return "sqrtsoftplus";
  return c.use_pre_softmax ? "softmax-pre" : "softmax-post";
}

const char* dt_name(bitepDataType_t d) { return d == bitepFloat32 ? "fp32" : d == bitepBfloat16 ? "bf16" : "fp16"; }

cudaError_t fill_repeating(void* dst, size_t bytes, const void* tile, size_t tile_bytes) {
  char* d = static_cast<char*>(dst);
  cudaError_t e = cudaMemcpy(d, tile, std::min(bytes, tile_bytes), cudaMemcpyHostToDevice);
  for (size_t done = std::min(bytes, tile_bytes); e == cudaSuccess && done < bytes;) {
    const size_t n = std::min(done, bytes - done);
    e = cudaMemcpy(d + done, d, n, cudaMemcpyDeviceToDevice);
    done += n;
  }
  return e;
}

std::vector<uint8_t> make_logits(int64_t T, int E, bitepDataType_t dt, uint64_t seed, float spread) {
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

void forward_both_maps(
    const bitepRouterConfig_t& cfg, int64_t T, const std::vector<uint8_t>& logits, FwdOut* bytemap, FwdOut* bitmap) {
  FwdSpec spec;
  *bytemap = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
  ASSERT_EQ(bytemap->rc, bitepSuccess) << bytemap->error;
  spec.map = bitepMapBitmapU8;
  *bitmap = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
  ASSERT_EQ(bitmap->rc, bitepSuccess) << bitmap->error;
}

BwdOut run_backward(bitepBackend_t be,
                    const bitepRouterConfig_t& cfg,
                    int64_t T,
                    const std::vector<float>& grad_probs,
                    const std::vector<uint8_t>& map,
                    bitepMapFormat_t fmt,
                    const std::vector<float>& saved,
                    const std::vector<uint8_t>& logits,
                    bool aux,
                    const BwdOffsets& off) {
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

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

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

int64_t count_unrouted_nonzero(const std::vector<uint8_t>& bytemap, const std::vector<float>& grad) {
  if (bytemap.size() != grad.size()) return -1;  // never 0: the caller's expectation fails
  int64_t n = 0;
  for (size_t i = 0; i < grad.size(); ++i) n += bytemap[i] == 0 && grad[i] != 0.0f;
  return n;
}

double width_factor(const bitepRouterConfig_t& c, bool aux) {
  if (c.num_experts <= kIssueMaxExperts) return 1.0;
  const bool full = (c.score_function == bitepScoreSoftmax && (c.use_pre_softmax || aux)) ||
                    (aux && c.score_function != bitepScoreSoftmax && c.topk > 1);
  const int w = full ? c.num_experts : c.topk;
  return w > 32 ? std::sqrt(w / 32.0) : 1.0;
}

double grad_tol(bitepDataType_t dt, double f) {
  return dt == bitepFloat32 ? 1e-6 * f : dt == bitepBfloat16 ? 1e-2 : 2e-3;
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

int want_topk_instance(int kernel, int E, int k, bitepDataType_t dt) {
  if (kernel > 0 && k == 6 && E > 32 && E <= 64) return 6;  // 8 lanes a token: the instance for k = 6
  const bool compact_only = dt == bitepBfloat16 && kernel == 1 && E > 128 && E <= 256;
  return kernel > 0 && k == 8 && E > 64 && E <= 512 && !compact_only ? 8 : 0;
}

int bucket_lanes(int E) {
  int lanes = 1;
  while (lanes < 32 && lanes * 8 < E) lanes *= 2;
  return lanes;
}

int want_lanes(int kernel, int E, int k, bitepDataType_t dt, int64_t T, bool dense, bool dense_aligned) {
  if (kernel < 0) return 0;
  int64_t min_tokens = -1;
  if (const char* v = std::getenv("BITEP_ROUTER_TWO_OCTETS_MIN")) min_tokens = std::atoll(v);
  if (min_tokens < 0) {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return -1;  // no answer: the caller's expectation fails
    min_tokens = int64_t{64} * sms;
  }
  const bool bf16_rule = dt == bitepBfloat16 && (!dense || (E == 128 && dense_aligned));
  const bool f32_rule = dt == bitepFloat32 && !dense && E > 128;
  if (kernel == 1 && E > 64 && E <= 256 && k == 8 && T >= min_tokens && (bf16_rule || f32_rule))
    return bucket_lanes(E) / 2;
  return bucket_lanes(E);
}

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

void check_case(const bitepRouterConfig_t& cfg,
                int64_t T,
                const std::vector<uint8_t>& logits,
                const std::vector<float>& bias,
                bool aux,
                int num_ranks,
                CaseStats* stats,
                bool exact,
                size_t logits_offset) {
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
  const double probs_err = value_err(host.probs, ref.probs, gpu.probs, E);
  const double saved_err = value_err(host.saved, ref.saved, gpu.saved, E);
  EXPECT_LE(probs_err, tol) << "probs";
  EXPECT_LE(saved_err, tol) << "saved";
  const bool f32 = cfg.logits_dtype == bitepFloat32;
  if (f32) stats->values.add(std::max(probs_err, saved_err), tol, what);
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
    if (ok && f32) stats->values.add(std::max({e_probs, e_saved, e_w}), tol, what + " (a near-tie token)");
  }
  EXPECT_EQ(bad_rows, 0) << "rows where the GPU chose other experts than the host: " << first_bad;
  EXPECT_EQ(count_bit_diffs(gpu.probs, gpub.probs), 0) << "probs differ between the bytemap and bitmap runs";
  if (!aux) {
    const double weights_err = value_err(host.weights, ref.weights, gpu.weights, k);
    EXPECT_LE(weights_err, tol) << "topk_weights";
    if (f32) stats->values.add(weights_err, tol, what);
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
    const double e_saved_grad = grad_err(hs.grad, gs.grad), e_recompute_grad = grad_err(hr.grad, gr.grad);
    EXPECT_LE(e_saved_grad, gt) << "grad_logits from saved vs host (or the fp64 oracle)";
    EXPECT_LE(e_recompute_grad, gt) << "grad_logits recomputed vs host (or the fp64 oracle)";
    if (f32) stats->grads.add(std::max(e_saved_grad, e_recompute_grad), gt, what);
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
  if (s.values.bound > 0.0)
    std::cout << "[ fp32 error ] " << name << ": probs / saved / weights worst " << s.values.err << " (bound "
              << s.values.bound << ") at " << s.values.at << "\n";
  if (s.grads.bound > 0.0)
    std::cout << "[ fp32 error ] " << name << ": grad_logits worst " << s.grads.err << " of ||M|| (bound "
              << s.grads.bound << ") at " << s.grads.at << "\n";
}

}  // namespace router_gpu_test
