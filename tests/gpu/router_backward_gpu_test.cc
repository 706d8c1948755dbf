// SPDX-License-Identifier: Apache-2.0
// The CUDA router backward kernels (kernels/router_backward*.cu) and the aux loss (router_aux_loss.cu) against the host
// reference backend, through the public C API. Tolerances and helpers: router_gpu_test.h. Every test SKIPs with the
// reason when no CUDA device is visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "bitep/bitep.h"
#include "kernels/router.h"
#include "tests/gpu/router_gpu_test.h"
#include "tests/reference/inputs.h"
#include "tests/reference/router_reference.h"

namespace {

using namespace router_gpu_test;

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

// The post-top-k softmax's gradient is 0 at every expert a token did not route to, and its backward reads only the
// routed octets or experts (kernels/router_backward_bucket.cuh: kSparse; kernels/router_backward_routed.cu): NaN in
// grad_probs, the saved tensor and the logits at every unrouted expert leaves grad_logits as it is, bit for bit, in
// both modes and map formats. E = 64: 8 lanes a token; 100: a partial last octet; 256: one octet a lane; 512: two (the
// saved mode kSparse, the recompute the routed kernel); 2048: eight (the routed kernel). T = 333: a last partial tile.
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
          EXPECT_EQ(0, count_unrouted_nonzero(fwd.map, clean.grad)) << what << ": a gradient at an unrouted expert";
        }
    }
}

// The post-top-k softmax recompute at one octet a lane (E 33-256) takes bf16 logits' exps unshifted where a token's
// sum lands in [2^-64, 2^64], and the routed maximum's pass for the tokens of a warp that fall outside
// (kernels/router_backward_bucket.cuh). Consecutive tokens' logits take offsets of 0 and +-30 (inside: sums of e^36
// and e^-24, the unshifted exps' error the largest it gets), +-60 and +-200 (outside), or are stretched 40x (routed
// values ~100 apart, sums past 2^64), and every other +30 token has grad_probs of ~1e25 (its D past FLT_MAX
// unshifted), so E = 64's four tokens a warp and E = 100's two mix both kinds; both dtypes (fp32 always shifts).
// E = 300, 512 and 1000 take the same tokens through the routed kernel (kernels/router_backward_routed.cu, always
// shifted). Against the host and the any-path kernel within the gradient tolerance, finite, 0 at every unrouted
// expert, nothing written past grad_logits.
TEST(RouterGpu, BackwardRecomputeLogitRanges) {
  REQUIRE_GPU();
  const int64_t T = 333;
  const float offsets[] = {0.0f, 30.0f, -30.0f, 60.0f, -60.0f, 200.0f, -200.0f, 0.0f};
  for (int E : {64, 100, 130, 256, 300, 512, 1000})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const bitepRouterConfig_t cfg = make_config(E, 8, bitepScoreSoftmax, 0, dt);
      std::vector<float> x = decode(make_logits(T, E, dt, 404 + E), dt);
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) {
          float& v = x[t * E + e];
          v = t % 8 == 7 ? v * 40.0f : v + offsets[t % 8];
        }
      const std::vector<uint8_t> logits = encode(x, dt);
      FwdOut fwd, fwdb;
      ASSERT_NO_FATAL_FAILURE(forward_both_maps(cfg, T, logits, &fwd, &fwdb));
      std::vector<float> gp(static_cast<size_t>(T) * E);
      for (size_t i = 0; i < gp.size(); ++i)  // every other +30 token: D past FLT_MAX unshifted (e^36 x 1e25 x 8)
        gp[i] = gauss(0x6e6e, i) * (static_cast<int64_t>(i) / E % 16 == 9 ? 1e25f : 1.0f);
      const double gt = grad_tol(dt, width_factor(cfg, false));
      const std::vector<double> M =
          grad_scale(cfg, T, bitep::ref::to_double(logits.data(), dt, T * E), fwd.map, gp, false);
      for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8}) {
        const std::string what =
            "E=" + std::to_string(E) + " " + dt_name(dt) + (fmt == bitepMapBitmapU8 ? " bitmap" : " bytemap");
        const std::vector<uint8_t>& map = fmt == bitepMapBytemap ? fwd.map : fwdb.map;
        const BwdOut got = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, {}, logits, false);
        ASSERT_EQ(got.rc, bitepSuccess) << got.error;
        EXPECT_EQ(bitep::kernels::last_router_backward_kernel(), E > 256 ? 1 : 0) << what << ": the kernel chosen";
        EXPECT_TRUE(got.guards) << what << ": backward wrote past grad_logits";
        BwdOut any;
        {
          AnyPathKernels scope;
          any = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt, {}, logits, false);
          ASSERT_EQ(any.rc, bitepSuccess) << any.error;
        }
        const BwdOut host = run_backward(bitepBackendHost, cfg, T, gp, map, fmt, {}, logits, false);
        ASSERT_EQ(host.rc, bitepSuccess) << host.error;
        const BwdOut* wants[] = {&host, &any};
        for (const BwdOut* want : wants) {
          const auto err = grad_errors(want->grad, got.grad, M, T, E, 0.0);
          const auto worst = std::max_element(err.begin(), err.end());
          EXPECT_LE(*worst, gt) << what << (want == &host ? ": against the host" : ": against the any-path kernel")
                                << ", worst token " << (worst - err.begin());
        }
        int64_t nonfinite = 0;
        for (float v : got.grad) nonfinite += !std::isfinite(v);
        EXPECT_EQ(count_unrouted_nonzero(fwd.map, got.grad), 0) << what << ": gradients at unrouted experts";
        EXPECT_EQ(nonfinite, 0) << what << ": gradients not finite";
      }
    }
}

// sqrtsoftplus'(x) = sigmoid(x) / (2 sqrt(softplus(x))) was 0 / 0 once e^x underflows (x < -104, and x = -inf, a masked
// expert): NaN gradients, routed or not (0 * NaN), on the host and the GPU alike, which the host comparisons excuse
// (equal NaNs match). Tokens with such logits routed and unrouted, through each backward kernel (E = 12 .. 1000 the
// bucket kernel, staged from E = 257; 2100 the generic one), from the saved tensor and the logits, both map formats:
// every gradient finite, 0 at the unrouted experts, each element within the tolerance of its own scale M of the fp64
// definition (less what fp32 cannot hold, 2^-126), nothing written past grad_logits.
TEST(RouterGpu, BackwardSqrtSoftplusFarBelowZero) {
  REQUIRE_GPU();
  const int64_t T = 64;
  const float inf = std::numeric_limits<float>::infinity();
  const float tail[] = {-inf, -1e4f, -200.0f, -104.5f, -100.0f, -90.0f, -30.0f, -20.5f};
  for (int E : {12, 64, 256, 300, 1000, 2100})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      bitepRouterConfig_t cfg = make_config(E, std::min(8, E), bitepScoreSqrtSoftplus, 0, dt);
      cfg.scaling_factor = 1.5f;
      std::vector<float> x = decode(make_logits(T, E, dt, 707 + E), dt);
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) {
          float& v = x[t * E + e];
          if (t % 4 == 0 && e % 5 == 0) v = -inf;                       // masked experts among ordinary ones
          if (t % 4 == 1 && e % 3 == 0) v = tail[(t / 4 + e / 3) % 8];  // the tail unrouted, mostly
          // The tail routed, beside one ordinary expert: the normalisation's sum stays a normal number (a sum of
          // the tail's scores alone is a few subnormal bits, the forward's own precision there).
          if (t % 4 == 2) v = e == 1 ? 0.5f : e % 7 == 0 ? tail[(t / 4 + e / 7) % 8] : -inf;
        }
      const std::vector<uint8_t> logits = encode(x, dt);
      const std::vector<double> x64 = bitep::ref::to_double(logits.data(), dt, T * E);
      FwdOut fwd, fwdb;
      ASSERT_NO_FATAL_FAILURE(forward_both_maps(cfg, T, logits, &fwd, &fwdb));
      std::vector<float> gp(static_cast<size_t>(T) * E);
      for (size_t i = 0; i < gp.size(); ++i) gp[i] = gauss(0x5b5b, i);
      const std::vector<double> want =
          bitep::ref::router_backward(cfg, T, x64, fwd.map, std::vector<double>(gp.begin(), gp.end()), false);
      const std::vector<double> M = grad_scale(cfg, T, x64, fwd.map, gp, false);
      const double gt = grad_tol(dt, width_factor(cfg, false));
      for (int recompute = 0; recompute < 2; ++recompute)
        for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8}) {
          const std::string what = describe(cfg, T) + (recompute ? " recompute" : " saved") +
                                   (fmt == bitepMapBitmapU8 ? " bitmap" : " bytemap");
          const std::vector<uint8_t>& map = fmt == bitepMapBytemap ? fwd.map : fwdb.map;
          const BwdOut got = run_backward(bitepBackendCuda, cfg, T, gp, map, fmt,
                                          recompute ? std::vector<float>{} : fwd.saved, logits, false);
          ASSERT_EQ(got.rc, bitepSuccess) << what << ": " << got.error;
          EXPECT_EQ(bitep::kernels::last_router_backward_kernel(), E > 2048 ? -1 : 0) << what << ": the kernel chosen";
          EXPECT_TRUE(got.guards) << what << ": backward wrote past grad_logits";
          EXPECT_EQ(count_unrouted_nonzero(fwd.map, got.grad), 0) << what << ": gradients at unrouted experts";
          int64_t nonfinite = 0, off = 0;
          for (int64_t i = 0; i < T * E; ++i) {
            ASSERT_TRUE(std::isfinite(want[i]) && std::isfinite(M[i])) << what << ": the fp64 definition at " << i;
            nonfinite += !std::isfinite(got.grad[i]);
            const bool bad = !(std::fabs(got.grad[i] - want[i]) <= gt * M[i] + 0x1p-126);
            if (bad && off++ < 3)
              ADD_FAILURE() << what << ": token " << i / E << " expert " << i % E << " logit " << x64[i] << ": got "
                            << got.grad[i] << ", fp64 " << want[i] << " (scale " << M[i] << ")";
          }
          EXPECT_EQ(nonfinite, 0) << what << ": gradients not finite";
          EXPECT_EQ(off, 0) << what << ": gradients off the fp64 definition";
        }
    }
}

// The post-top-k softmax's backward kernels on maps not from a forward, 0 to E routed experts a token. Above 512
// experts, and above 256 for the recompute, router_backward_routed (kernels/router_backward_routed.cu) gathers a
// token's routed experts, one a lane, where every token of a warp's tile has at most 32, and takes a tile with more an
// octet at a time; below, the bucket kernel reads the routed octets alone. Tokens 0-110 within the lanes (every tile
// gathered), 111-221 every third past them (tiles of both kinds), 222-332 any count; token 5 routes every expert, 6
// every element of lane 0, 7 lane 0's first octet (one owner with 8 routed elements); bytemap bytes of any nonzero
// value. In both modes and map formats: the kernel expected ran, with the any-path kernel's bits (the recompute at E
// 33-256: within tolerance of them) and 0 at every unrouted expert; the recompute within tolerance of the host's.
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
          if (recompute && E > 32 && E <= 256) {
            // The recompute's own kernel there (one butterfly, __expf, bf16 unshifted where it can): within tolerance.
            const auto err = grad_errors(any.grad, got.grad, M, T, E, 0.0);
            EXPECT_LE(*std::max_element(err.begin(), err.end()), gt) << what << ": against the any-path kernel";
          } else {
            EXPECT_EQ(count_bit_diffs(got.grad, any.grad), 0) << what << ": elements that differ from the any-path's";
          }
          EXPECT_EQ(count_unrouted_nonzero(routed01, got.grad), 0) << what << ": gradients at unrouted experts";
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

// 64-bit indexing past the forward (LargeTokenCount64BitIndexing has the forward's kernels): T * E > 2^31 at E = 256,
// bf16 logits, post-top-k softmax, k = 8, through the backward from saved and recomputed, the aux scores and their
// backward, and the aux loss forward and backward. The inputs repeat a tile of 512 rows but for their last 512 rows,
// another tile, so the last window of rows straddles element 2^31 and a read that wrapped, or stopped, at 2^31 would
// get the first tile's inputs. Each window's outputs are checked against the host backend run on the window alone
// (the backward's from the GPU's own map and saved rows), the aux loss's against a sum over the last window alone.
TEST(RouterGpu, LargeTokenCountBackwardAndAux) {
  REQUIRE_GPU();
  const int E = 256, k = 8, R = 512;
  const int64_t T = (int64_t{1} << 31) / E + 300;
  const size_t TE = static_cast<size_t>(T) * E, MB = E / 8;
  size_t free_b = 0, total_b = 0;
  CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
  const size_t need = TE * 12 + static_cast<size_t>(T) * MB + (size_t{1} << 30);
  if (free_b < need) GTEST_SKIP() << "needs " << (need >> 20) << " MiB of device memory, " << (free_b >> 20) << " free";
  const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, 0, bitepBfloat16);
  // The windows: rows [0, R) and [T - R, T), their inputs.
  const int64_t first[2] = {0, T - R};
  std::vector<uint8_t> wl[2];
  std::vector<float> wg[2];
  std::vector<double> wx[2];  // the logits in fp64, for the gradients' scale
  for (int w = 0; w < 2; ++w) {
    wl[w] = make_logits(R, E, bitepBfloat16, 901 + w);
    wx[w] = bitep::ref::to_double(wl[w].data(), bitepBfloat16, static_cast<size_t>(R) * E);
    wg[w].resize(static_cast<size_t>(R) * E);
    for (size_t i = 0; i < wg[w].size(); ++i) wg[w][i] = gauss(0x7e57 + w, i);
  }
  DevBuf lg(TE * 2), mp(static_cast<size_t>(T) * MB), sv(TE * 4), gp(TE * 4), gl(TE * 2);
  ASSERT_TRUE(lg.ptr() && mp.ptr() && sv.ptr() && gp.ptr() && gl.ptr());
  CUDA_OK(fill_repeating(lg.ptr(), lg.bytes, wl[0].data(), wl[0].size()));
  CUDA_OK(fill_repeating(gp.ptr(), gp.bytes, wg[0].data(), wg[0].size() * 4));
  CUDA_OK(
      cudaMemcpy(static_cast<char*>(lg.ptr()) + first[1] * E * 2, wl[1].data(), wl[1].size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(static_cast<char*>(gp.ptr()) + first[1] * E * 4, wg[1].data(), wg[1].size() * 4,
                     cudaMemcpyHostToDevice));
  for (const DevBuf* b : {&mp, &sv, &gl}) b->poison();
  // Window w's R rows of a device array of row_bytes a row, downloaded as elements of zero's type.
  auto window = [&](const DevBuf& b, int w, size_t row_bytes, auto zero) {
    std::vector<decltype(zero)> out(R * row_bytes / sizeof(zero));
    EXPECT_EQ(cudaMemcpy(out.data(), static_cast<const char*>(b.ptr()) + first[w] * row_bytes, R * row_bytes,
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
    return out;
  };
  auto bytemap_of = [&](const std::vector<uint8_t>& bitmap) {
    std::vector<uint8_t> out(static_cast<size_t>(R) * E);
    for (size_t i = 0; i < out.size(); ++i) out[i] = (bitmap[i / E * MB + i % E / 8] >> (i % 8)) & 1;
    return out;
  };
  const double vtol = 1e-6, atol = 1e-6 * width_factor(cfg, true), gt = grad_tol(bitepBfloat16, 1.0);
  auto worst = [](const std::vector<double>& e) { return e.empty() ? 0.0 : *std::max_element(e.begin(), e.end()); };
  // Window w's grad_logits (gl) against want, over the scale M of the window's inputs and bitmap.
  auto grad_window_error = [&](int w, const std::vector<float>& want, const std::vector<uint8_t>& bitmap, bool aux) {
    const std::vector<float> got = decode(window(gl, w, size_t{E} * 2, uint8_t{}), bitepBfloat16);
    return worst(grad_errors(want, got, grad_scale(cfg, R, wx[w], bytemap_of(bitmap), wg[w], aux), R, E, 0.0));
  };

  // Forward: the map and saved of every window, the host's.
  bitepRouterForwardArgs_t fa = BITEP_ROUTER_FWD_ARGS_INIT;
  fa.num_tokens = T;
  fa.logits = lg.ptr();
  fa.saved = static_cast<float*>(sv.ptr());
  fa.routing_map = mp.ptr();
  fa.map_format = bitepMapBitmapU8;
  ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &fa, nullptr), bitepSuccess) << bitepGetLastError();
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> map[2];
  std::vector<float> saved[2];
  for (int w = 0; w < 2; ++w) {
    SCOPED_TRACE("forward, rows from " + std::to_string(first[w]));
    FwdSpec s;
    s.probs = s.weights = s.indices = false;
    s.map = bitepMapBitmapU8;
    const FwdOut want = run_forward(bitepBackendHost, cfg, R, wl[w], {}, s);
    ASSERT_EQ(want.rc, bitepSuccess) << want.error;
    map[w] = window(mp, w, MB, uint8_t{});
    saved[w] = window(sv, w, size_t{E} * 4, 0.0f);
    ASSERT_EQ(map[w], want.map) << "bitmap rows";
    EXPECT_LE(worst(row_errors(want.saved, saved[w], R, E)), vtol) << "saved rows";
  }

  // Backward from saved, then recomputed: each window against the host's backward of the window's rows.
  for (bool recompute : {false, true}) {
    bitepRouterBackwardArgs_t ba = BITEP_ROUTER_BWD_ARGS_INIT;
    ba.num_tokens = T;
    ba.grad_probs = static_cast<const float*>(gp.ptr());
    ba.routing_map = mp.ptr();
    ba.map_format = bitepMapBitmapU8;
    ba.saved = recompute ? nullptr : static_cast<const float*>(sv.ptr());
    ba.logits = lg.ptr();
    ba.grad_logits = gl.ptr();
    gl.poison();
    ASSERT_EQ(bitepRouterBackward(bitepBackendCuda, &cfg, &ba, nullptr), bitepSuccess) << bitepGetLastError();
    CUDA_OK(cudaDeviceSynchronize());
    for (int w = 0; w < 2; ++w) {
      SCOPED_TRACE(std::string(recompute ? "recompute" : "saved") + " backward, rows from " + std::to_string(first[w]));
      const BwdOut want =
          run_backward(bitepBackendHost, cfg, R, wg[w], map[w], bitepMapBitmapU8,
                       recompute ? std::vector<float>{} : saved[w], recompute ? wl[w] : std::vector<uint8_t>{}, false);
      ASSERT_EQ(want.rc, bitepSuccess) << want.error;
      EXPECT_LE(grad_window_error(w, want.grad, map[w], false), gt) << "grad_logits rows";
    }
  }

  // Aux scores (probs into sv, the map into mp) and their backward recomputed from the logits (into gl).
  fa = BITEP_ROUTER_FWD_ARGS_INIT;
  fa.num_tokens = T;
  fa.logits = lg.ptr();
  fa.probs = static_cast<float*>(sv.ptr());
  fa.routing_map = mp.ptr();
  fa.map_format = bitepMapBitmapU8;
  sv.poison(), mp.poison();
  ASSERT_EQ(bitepAuxScoresForward(bitepBackendCuda, &cfg, &fa, nullptr), bitepSuccess) << bitepGetLastError();
  bitepRouterBackwardArgs_t ab = BITEP_ROUTER_BWD_ARGS_INIT;
  ab.num_tokens = T;
  ab.grad_probs = static_cast<const float*>(gp.ptr());
  ab.logits = lg.ptr();
  ab.grad_logits = gl.ptr();
  gl.poison();
  ASSERT_EQ(bitepAuxScoresBackward(bitepBackendCuda, &cfg, &ab, nullptr), bitepSuccess) << bitepGetLastError();
  CUDA_OK(cudaDeviceSynchronize());
  for (int w = 0; w < 2; ++w) {
    SCOPED_TRACE("aux scores, rows from " + std::to_string(first[w]));
    FwdSpec s;
    s.aux = true;
    s.saved = s.weights = s.indices = false;
    s.map = bitepMapBitmapU8;
    const FwdOut want = run_forward(bitepBackendHost, cfg, R, wl[w], {}, s);
    ASSERT_EQ(want.rc, bitepSuccess) << want.error;
    ASSERT_EQ(window(mp, w, MB, uint8_t{}), want.map) << "aux map rows";
    EXPECT_LE(worst(row_errors(want.probs, window(sv, w, size_t{E} * 4, 0.0f), R, E)), atol) << "aux score rows";
    const BwdOut gwant = run_backward(bitepBackendHost, cfg, R, wg[w], {}, bitepMapNone, {}, wl[w], true);
    ASSERT_EQ(gwant.rc, bitepSuccess) << gwant.error;
    EXPECT_LE(grad_window_error(w, gwant.grad, want.map, true), gt) << "aux grad_logits rows";
  }

  // Aux loss over probs that are 0 but in the last window (sv): its sum is that window's alone, so rows skipped, or
  // read from below element 2^31, change it. Then its backward (into gp), every row C n_e grad_loss: the host's bits.
  CUDA_OK(cudaMemset(sv.ptr(), 0, sv.bytes));
  std::vector<float> lp(static_cast<size_t>(R) * E);
  for (size_t i = 0; i < lp.size(); ++i) lp[i] = static_cast<float>(mix(i) % 64) / 64.0f;
  CUDA_OK(
      cudaMemcpy(static_cast<char*>(sv.ptr()) + first[1] * E * 4, lp.data(), lp.size() * 4, cudaMemcpyHostToDevice));
  std::vector<int32_t> tpe(E);
  for (int e = 0; e < E; ++e) tpe[e] = 1 + e % 7;
  DevBuf dt(E * 4), dl(4), dg(4);
  dt.upload(tpe.data());
  const float grad_loss = 0.5f;
  dg.upload(&grad_loss);
  dl.poison();
  bitepAuxLossArgs_t la = BITEP_AUX_LOSS_ARGS_INIT;
  la.num_tokens = T;
  la.num_experts = E;
  la.topk = k;
  la.total_num_tokens = T;
  la.coeff = 1e-2f;
  la.probs = static_cast<const float*>(sv.ptr());
  la.tokens_per_expert = static_cast<const int32_t*>(dt.ptr());
  la.loss = static_cast<float*>(dl.ptr());
  la.grad_loss = static_cast<const float*>(dg.ptr());
  la.grad_probs = static_cast<float*>(gp.ptr());
  ASSERT_EQ(bitepAuxLossForward(bitepBackendCuda, &la, nullptr), bitepSuccess) << bitepGetLastError();
  gp.poison();
  ASSERT_EQ(bitepAuxLossBackward(bitepBackendCuda, &la, nullptr), bitepSuccess) << bitepGetLastError();
  CUDA_OK(cudaDeviceSynchronize());
  double sum = 0.0;  // sum_e n_e sum_t p[t, e] over the last window: exact in fp64
  for (size_t i = 0; i < lp.size(); ++i) sum += static_cast<double>(tpe[i % E]) * lp[i];
  const double want_loss = static_cast<double>(E) * la.coeff / (static_cast<double>(k) * T * T) * sum;
  EXPECT_NEAR(dl.download<float>()[0], want_loss, 1e-6 * want_loss) << "aux loss";
  bitepAuxLossArgs_t hl = la;  // one row on the host, the same N: every GPU row must have its bits
  std::vector<float> hgrad(E, -1.0f);
  hl.num_tokens = 1;
  hl.probs = nullptr, hl.loss = nullptr;
  hl.tokens_per_expert = tpe.data(), hl.grad_loss = &grad_loss, hl.grad_probs = hgrad.data();
  ASSERT_EQ(bitepAuxLossBackward(bitepBackendHost, &hl, nullptr), bitepSuccess) << bitepGetLastError();
  for (int w = 0; w < 2; ++w) {
    const std::vector<float> got = window(gp, w, size_t{E} * 4, 0.0f);
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) bad += std::memcmp(&got[i], &hgrad[i % E], 4) != 0;
    EXPECT_EQ(bad, 0) << "aux loss gradient rows from " << first[w] << " differ from the host's";
  }
  // The outputs' guards (each poisoned before its first write): nothing written past T rows.
  EXPECT_TRUE(mp.guard_intact()) << "past routing_map";
  EXPECT_TRUE(sv.guard_intact()) << "past saved / the aux scores";
  EXPECT_TRUE(gl.guard_intact()) << "past grad_logits";
  EXPECT_TRUE(gp.guard_intact()) << "past the aux loss's grad_probs";
}

}  // namespace
