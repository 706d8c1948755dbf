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

// One shape of LargeTokenCount64BitIndexing below.

}  // namespace
