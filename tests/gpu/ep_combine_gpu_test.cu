// SPDX-License-Identifier: Apache-2.0
// The EP combine's kernels (kernels/ep.h): the weighted reduce of the expert rows, the final sum of the ranks'
// partials, the weight gradient (its dot products within a tolerance: ep_params.h lets CUDA sum them in another fixed
// order), and the batched copies.
// Against the host reference (src/host/ep_host.cc) on random inputs, outputs poisoned first on both sides and
// compared byte for byte in full; helpers and grids: ep_kernels_gpu_test.h. Every test skips, saying why, without
// a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/ep.h"
#include "src/host/dtype_host.h"
#include "src/host/ep_host.h"
#include "tests/gpu/ep_kernels_gpu_test.h"

namespace {

using namespace ep_test;

TEST(EpKernelsGpu, ReduceMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const RecvCase& c : recv_grid()) {
    if (c.R > 3000) continue;
    const RecvInput in = make_recv(c);
    const std::vector<int32_t> rows = host_positions(c, in);
    std::mt19937_64 rng(c.seed + 1);
    const std::vector<uint8_t> y = random_rows(in.N, c.H, c.dtype, rng), g = random_rows(c.R, c.H, c.dtype, rng);
    const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
    const bool weighted = c.mode != 1, grads = c.mode != 0, out_too = c.seed % 4 != 3;
    std::vector<uint8_t> out = poisoned<uint8_t>(c.R * rb);
    std::vector<float> gw = poisoned<float>(c.R * c.KL);
    K::ReduceParams p;
    p.num_recv_rows = c.R;
    p.max_row_experts = c.KL;
    p.hidden = c.H;
    p.dtype = c.dtype;
    p.y = y.data();
    p.recv_expert_rows = rows.data();
    p.recv_weights = weighted ? in.weights.data() : nullptr;
    p.out = out_too ? out.data() : nullptr;
    p.grad_rows = grads ? g.data() : nullptr;
    p.grad_weights = grads ? gw.data() : nullptr;
    host::ep_reduce(p);
    Dev<uint8_t> dy(y), dg(g), dout(out.size());
    Dev<int32_t> drows(rows);
    Dev<float> dw(in.weights), dgw(gw.size());
    p.y = dy.get();
    p.recv_expert_rows = drows.get();
    p.recv_weights = weighted ? dw.get() : nullptr;
    p.out = out_too ? dout.get() : nullptr;
    p.grad_rows = grads ? dg.get() : nullptr;
    p.grad_weights = grads ? dgw.get() : nullptr;
    sync(K::launch_ep_reduce(p, nullptr));
    bool ok = same(dout.host(), out, "out", c.str());
    if (out_too && c.R > 0) {
      // Per source destinations, as the window's combine calls it: W sources (one without rows, one not
      // written), each source's rows from row 0 of its own buffer, the own source's rows interleaved.
      const int W = 2 + static_cast<int>(c.seed % 4), self = static_cast<int>(c.seed % W);
      std::vector<int64_t> off(W + 1, 0);
      for (int s = 1; s < W; ++s) off[s] = s == 1 ? off[0] : std::min<int64_t>(c.R, off[s - 1] + c.R / (W - 1) + 1);
      off[W] = c.R;
      const int skipped = W >= 3 ? (self + 1) % W : -1;  // a source whose rows are not written (null)
      Dev<uint8_t> dsrc_out(c.R * rb + 16 * W);
      std::vector<void*> outs(W, nullptr);
      for (int s = 0; s < W; ++s)
        if (s != skipped) outs[s] = dsrc_out.get() + off[s] * rb + 16 * s;       // each source's region apart
      const std::vector<uint8_t> poison = poisoned<uint8_t>(c.R * rb + 16 * W);  // as Dev starts
      Dev<void*> douts(outs);
      Dev<int64_t> doff(off);
      K::ReduceParams q = p;
      q.out = nullptr;
      q.grad_rows = nullptr;
      q.grad_weights = nullptr;
      q.num_sources = W;
      q.outs = douts.get();
      q.row_offsets = doff.get();
      q.self_source = self;
      q.outs_align = 16;
      for (int s = 0; s < W; ++s)
        while (outs[s] != nullptr && reinterpret_cast<uintptr_t>(outs[s]) % q.outs_align != 0) q.outs_align /= 2;
      sync(K::launch_ep_reduce(q, nullptr));
      const std::vector<uint8_t> got = dsrc_out.host();
      std::vector<uint8_t> want = poison;
      for (int s = 0; s < W; ++s)
        if (s != skipped && off[s + 1] > off[s])
          std::copy(out.begin() + off[s] * rb, out.begin() + off[s + 1] * rb, want.begin() + off[s] * rb + 16 * s);
      ok &= same(got, want, "out (per source)", c.str() + " W=" + std::to_string(W) + " self=" + std::to_string(self));
    }
    if (grads) {  // dot products: fp64 reference, tolerance from the sum of |terms|
      const std::vector<float> got = dgw.host();
      for (int64_t i = 0; i < c.R && ok; ++i)
        for (int j = 0; j < c.KL && ok; ++j) {
          const int32_t pos = rows[i * c.KL + j];
          double ref = 0, mag = 0;
          for (int64_t h = 0; pos >= 0 && h < c.H; ++h) {
            const double t = double(host::load_as_float(y.data(), c.dtype, pos * c.H + h)) *
                             host::load_as_float(g.data(), c.dtype, i * c.H + h);
            ref += t;
            mag += std::fabs(t);
          }
          const double tol = 1e-6 * double(c.H + 32) * mag + 1e-30;
          if (!(std::fabs(got[i * c.KL + j] - ref) <= tol) || (pos < 0 && got[i * c.KL + j] != 0.0f)) {
            ADD_FAILURE() << c.str() << ": grad_weights[" << i << "][" << j << "] = " << got[i * c.KL + j] << ", fp64 "
                          << ref << " (tolerance " << tol << ")";
            ok = false;
          }
        }
    }
    if (!ok && ++failing >= kMaxFailingCases) return;
  }
}

// The low-latency calls' slot parity (kernels::SlotParity), read by the kernels from device memory: the reduce's two
// destination tables and the final sum's moved regions, for counts 6 and 7 and both adds, against the host with the
// same parity (a kernel taking the wrong table leaves poison where the host wrote).
TEST(EpKernelsGpu, SlotParityMatchesHost) {
  REQUIRE_GPU();
  const int64_t R = 37, H = 72, W = 3;
  const int KL = 2;
  const DType dt = DType::kBF16;
  const size_t rb = size_t(H) * 2;
  std::mt19937_64 rng(99);
  const std::vector<uint8_t> y = random_rows(R * KL, H, dt, rng);
  std::vector<int32_t> rows(R * KL);
  for (int64_t i = 0; i < R * KL; ++i) rows[i] = i % 5 == 3 ? -1 : static_cast<int32_t>(i);
  const std::vector<int64_t> off = {0, 12, 20, R};
  for (const uint64_t count : {uint64_t{6}, uint64_t{7}})
    for (const uint32_t add : {0u, 1u}) {
      const std::string what = "count " + std::to_string(count) + " add " + std::to_string(add);
      // Reduce: outs [2][W] over one buffer, table t's source s at (t * W + s) * R rows.
      const size_t buf = size_t(2 * W) * R * rb;
      std::vector<uint8_t> host_buf = poisoned<uint8_t>(buf);
      std::vector<void*> host_outs(2 * W);
      for (int t = 0; t < 2 * W; ++t) host_outs[t] = host_buf.data() + size_t(t) * R * rb;
      K::ReduceParams p;
      p.num_recv_rows = R;
      p.max_row_experts = KL;
      p.hidden = H;
      p.dtype = dt;
      p.y = y.data();
      p.recv_expert_rows = rows.data();
      p.num_sources = W;
      p.outs = host_outs.data();
      p.row_offsets = off.data();
      p.self_source = 1;
      p.outs_align = 16;
      p.outs_parity.count = &count;
      p.outs_parity.add = add;
      host::ep_reduce(p);
      Dev<uint8_t> dy(y), dbuf(buf);
      Dev<int32_t> drows(rows);
      Dev<int64_t> doff(off);
      std::vector<void*> dev_outs(2 * W);
      for (int t = 0; t < 2 * W; ++t) dev_outs[t] = dbuf.get() + size_t(t) * R * rb;
      Dev<void*> douts(dev_outs);
      Dev<uint64_t> dcount(std::vector<uint64_t>{count});
      p.y = dy.get();
      p.recv_expert_rows = drows.get();
      p.outs = douts.get();
      p.row_offsets = doff.get();
      p.outs_parity.count = dcount.get();
      sync(K::launch_ep_reduce(p, nullptr));
      EXPECT_TRUE(same(dbuf.host(), host_buf, "reduce outs", what));
      // Final sum: T tokens over W ranks, ret and self_ret each two regions ret_parity_bytes apart.
      const int64_t T = 20, S = 2 * T;
      std::vector<int32_t> slot(T * W);
      for (int64_t t = 0; t < T; ++t)
        for (int r = 0; r < W; ++r) slot[t * W + r] = (t + r) % 4 == 0 ? -1 : static_cast<int32_t>(t);
      const std::vector<int64_t> send_off = {0, 0, T};
      const std::vector<uint8_t> ret = random_rows(2 * S, H, dt, rng), self_ret = random_rows(2 * S, H, dt, rng);
      std::vector<uint8_t> out = poisoned<uint8_t>(size_t(T) * rb);
      K::FinalSumParams f;
      f.num_tokens = T;
      f.num_ranks = W;
      f.self_rank = 1;
      f.hidden = H;
      f.dtype = dt;
      f.token_slot = slot.data();
      f.send_offsets = send_off.data();
      f.ret = ret.data();
      f.self_ret = self_ret.data();
      f.self_ret_offset = 3;
      f.out = out.data();
      f.ret_parity.count = &count;
      f.ret_parity.add = add;
      f.ret_parity_bytes = static_cast<int64_t>(S * rb);
      host::ep_final_sum(f);
      Dev<int32_t> dslot(slot);
      Dev<int64_t> dsend(send_off);
      Dev<uint8_t> dret(ret), dself(self_ret), dout(out.size());
      f.token_slot = dslot.get();
      f.send_offsets = dsend.get();
      f.ret = dret.get();
      f.self_ret = dself.get();
      f.out = dout.get();
      f.ret_parity.count = dcount.get();
      sync(K::launch_ep_final_sum(f, nullptr));
      EXPECT_TRUE(same(dout.host(), out, "final sum out", what));
    }
}

// Few rows of many vectors: the reduce and the final sum split each row among several warps (pieces of kWarp * kUnroll
// vectors; ReduceParams::max_row_pieces caps them, 0 fills the device, 1 is one warp a row). Rows whose vectors are
// not a whole number of pieces (the last piece short), vectors of 16, 8, 4 and 2 bytes, empty rows skipped and zeroed,
// weights and none, the backward's dot products beside the pieces (once a row), each cap against the host.
TEST(EpKernelsGpu, ReduceAndFinalSumInPieces) {
  REQUIRE_GPU();
  struct Shape {
    int64_t R, H;
    DType dt;
    int KL;
  };
  // H = 7168 bf16: 896 16-byte vectors, 7 passes of 128; 4100 bf16: 8-byte vectors (8200-byte rows), 1025 of them;
  // 5000 f32: 1250 16-byte vectors; 4099 f16: 2-byte vectors (an odd row).
  const Shape shapes[] = {{1, 7168, DType::kBF16, 8},
                          {3, 4100, DType::kBF16, 4},
                          {37, 5000, DType::kF32, 3},
                          {200, 7168, DType::kBF16, 8},
                          {5, 4099, DType::kF16, 2}};
  int failing = 0;
  for (const Shape& sh : shapes)
    for (const int cap : {0, 1, 2, 3, 1024})
      for (const bool skip_empty : {false, true}) {
        const std::string what = "R=" + std::to_string(sh.R) + " H=" + std::to_string(sh.H) +
                                 " KL=" + std::to_string(sh.KL) + " max_row_pieces=" + std::to_string(cap) +
                                 (skip_empty ? " skip_empty" : "");
        std::mt19937_64 rng(sh.R * 131 + sh.H + cap);
        const int64_t N = sh.R * sh.KL + 3;
        const size_t rb = size_t(sh.H) * elem_bytes(sh.dt);
        const std::vector<uint8_t> y = random_rows(N, sh.H, sh.dt, rng), g = random_rows(sh.R, sh.H, sh.dt, rng);
        std::vector<int32_t> rows(sh.R * sh.KL, -1);
        std::vector<float> w(sh.R * sh.KL);
        for (int64_t i = 0; i < sh.R; ++i) {
          const int used = i % 7 == 2 ? 0 : 1 + static_cast<int>(rng() % sh.KL);  // some rows route nowhere here
          for (int j = 0; j < used; ++j) rows[i * sh.KL + j] = static_cast<int32_t>(rng() % N);
          for (int j = 0; j < sh.KL; ++j) w[i * sh.KL + j] = static_cast<float>(rng() % 1000) / 997.0f - 0.3f;
        }
        const bool weighted = cap != 2, grads = cap == 3;
        std::vector<uint8_t> out = poisoned<uint8_t>(sh.R * rb);
        std::vector<float> gw = poisoned<float>(sh.R * sh.KL);
        K::ReduceParams p;
        p.num_recv_rows = sh.R;
        p.max_row_experts = sh.KL;
        p.hidden = sh.H;
        p.dtype = sh.dt;
        p.y = y.data();
        p.recv_expert_rows = rows.data();
        p.recv_weights = weighted ? w.data() : nullptr;
        p.out = out.data();
        p.grad_rows = grads ? g.data() : nullptr;
        p.grad_weights = grads ? gw.data() : nullptr;
        p.skip_empty_rows = skip_empty;
        p.max_row_pieces = cap;
        host::ep_reduce(p);
        Dev<uint8_t> dy(y), dg(g), dout(out.size());
        Dev<int32_t> drows(rows);
        Dev<float> dw(w), dgw(gw.size());
        p.y = dy.get();
        p.recv_expert_rows = drows.get();
        p.recv_weights = weighted ? dw.get() : nullptr;
        p.out = dout.get();
        p.grad_rows = grads ? dg.get() : nullptr;
        p.grad_weights = grads ? dgw.get() : nullptr;
        sync(K::launch_ep_reduce(p, nullptr));
        bool ok = same(dout.host(), out, "reduce out", what);
        if (grads) {
          // One dot a (row, expert), written once: the device sums in its own fixed order, so against the host's
          // within the rounding of H fp32 terms (as WeightGradMatchesHost's bound).
          const std::vector<float> got = dgw.host();
          for (int64_t q = 0; q < sh.R * sh.KL && ok; ++q) {
            const int32_t pos = rows[q];
            double mag = 0;
            for (int64_t h = 0; pos >= 0 && h < sh.H; ++h)
              mag += std::fabs(double(host::load_as_float(y.data(), sh.dt, pos * sh.H + h)) *
                               host::load_as_float(g.data(), sh.dt, (q / sh.KL) * sh.H + h));
            const double tol = 1e-6 * double(sh.H + 32) * mag + 1e-30;
            if (!(std::fabs(double(got[q]) - gw[q]) <= tol)) {
              ADD_FAILURE() << what << ": grad_weights[" << q << "] = " << got[q] << ", host " << gw[q]
                            << " (tolerance " << tol << ")";
              ok = false;
            }
          }
        }
        // Final sum of the same many-vector rows: W = 3 ranks, the self rank's rows from self_ret.
        const int W = 3, self = 1;
        const int64_t T = sh.R, S = 2 * T + 1;
        std::vector<int32_t> slot(T * W);
        for (int64_t t = 0; t < T; ++t)
          for (int r = 0; r < W; ++r) slot[t * W + r] = (t + r) % 4 == 0 ? -1 : static_cast<int32_t>((t * 7 + r) % T);
        const std::vector<int64_t> send_off = {0, -1, T + 1};
        const std::vector<uint8_t> ret = random_rows(S, sh.H, sh.dt, rng),
                                   self_ret = random_rows(T + 2, sh.H, sh.dt, rng);
        std::vector<uint8_t> fout = poisoned<uint8_t>(size_t(T) * rb);
        K::FinalSumParams f;
        f.num_tokens = T;
        f.num_ranks = W;
        f.self_rank = self;
        f.hidden = sh.H;
        f.dtype = sh.dt;
        f.token_slot = slot.data();
        f.send_offsets = send_off.data();
        f.ret = ret.data();
        f.self_ret = self_ret.data();
        f.self_ret_offset = 2;
        f.out = fout.data();
        f.max_row_pieces = cap;
        host::ep_final_sum(f);
        Dev<int32_t> dslot(slot);
        Dev<int64_t> dsend(send_off);
        Dev<uint8_t> dret(ret), dself(self_ret), dfout(fout.size());
        f.token_slot = dslot.get();
        f.send_offsets = dsend.get();
        f.ret = dret.get();
        f.self_ret = dself.get();
        f.out = dfout.get();
        sync(K::launch_ep_final_sum(f, nullptr));
        ok &= same(dfout.host(), fout, "final sum out", what);
        if (!ok && ++failing >= kMaxFailingCases) return;
      }
}

// ---- final sum, weight gradients ---------------------------------------------------------------------

TEST(EpKernelsGpu, FinalSumMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const Case& c : routing_grid({3000})) {
    if (c.fmt != RoutingFormat::kBitmap && !c.invalid) continue;  // the slots are what matters
    const Routing r = make_routing(c.T, c.E(), c.k, c.seed, c.skewed, c.invalid);
    const Layout lay = host_layout(c, r);
    const int W = c.W, self = static_cast<int>((c.seed / 3) % W);
    std::vector<int64_t> send_off(W, -1);
    int64_t S = 0;
    for (int q = 0; q < W; ++q)
      if (q != self) send_off[q] = S, S += lay.counts[size_t(q) * (c.L + 1)] + 1;
    const int64_t self_off = 2, SR = self_off + lay.counts[size_t(self) * (c.L + 1)];
    std::mt19937_64 rng(c.seed + 7);
    const std::vector<uint8_t> ret = random_rows(S, c.H, c.dtype, rng), self_ret = random_rows(SR, c.H, c.dtype, rng);
    std::vector<uint8_t> out = poisoned<uint8_t>(size_t(c.T) * c.H * elem_bytes(c.dtype));
    K::FinalSumParams p;
    p.num_tokens = c.T;
    p.num_ranks = W;
    p.self_rank = self;
    p.hidden = c.H;
    p.dtype = c.dtype;
    p.token_slot = lay.slot.data();
    p.send_offsets = send_off.data();
    p.ret = ret.data();
    p.self_ret = self_ret.data();
    p.self_ret_offset = self_off;
    p.out = out.data();
    host::ep_final_sum(p);
    Dev<int32_t> dslot(lay.slot);
    Dev<int64_t> doff(send_off);
    Dev<uint8_t> dret(ret), dself(self_ret), dout(out.size());
    p.token_slot = dslot.get();
    p.send_offsets = doff.get();
    p.ret = dret.get();
    p.self_ret = dself.get();
    p.out = dout.get();
    sync(K::launch_ep_final_sum(p, nullptr));
    if (!same(dout.host(), out, "out", c.str()) && ++failing >= kMaxFailingCases) return;
  }
}

TEST(EpKernelsGpu, WeightGradMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const Case& c0 : routing_grid({3000})) {
    if (c0.H > 64) continue;
    for (WeightFormat wf : {WeightFormat::kDense, WeightFormat::kCompact}) {
      Case c = c0;
      c.wf = wf;
      const Routing r = make_routing(c.T, c.E(), c.k, c.seed, c.skewed, c.invalid);
      const DevRouting dr(r);
      const Layout lay = host_layout(c, r);
      const int W = c.W, KL = K::max_row_experts(c.k, c.L), self = static_cast<int>(c.seed % W);
      std::vector<int64_t> send_off(W, -1);
      int64_t S = 0;
      for (int q = 0; q < W; ++q)
        if (q != self) send_off[q] = S, S += lay.counts[size_t(q) * (c.L + 1)];
      const int64_t self_off = 1, SR = self_off + lay.counts[size_t(self) * (c.L + 1)];
      std::mt19937_64 rng(c.seed + 3);
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      std::vector<float> ret(S * KL), self_g(SR * KL);
      for (float& v : ret) v = u(rng);
      for (float& v : self_g) v = u(rng);
      std::vector<float> dense = poisoned<float>(size_t(c.T) * c.E()), compact = poisoned<float>(size_t(c.T) * c.k);
      K::WeightGradParams p;
      p.num_tokens = c.T;
      p.num_experts = c.E();
      p.topk = c.k;
      p.num_ranks = W;
      p.self_rank = self;
      p.routing = host_input(r, c.fmt, wf);
      p.routing.weights = nullptr;  // not read
      p.token_slot = lay.slot.data();
      p.send_offsets = send_off.data();
      p.ret_grad_w = ret.data();
      p.self_grad_w = self_g.data();
      p.self_offset = self_off;
      p.grad_dense = wf == WeightFormat::kDense ? dense.data() : nullptr;
      p.grad_compact = wf == WeightFormat::kCompact ? compact.data() : nullptr;
      host::ep_weight_grad(p);
      Dev<int32_t> dslot(lay.slot);
      Dev<int64_t> doff(send_off);
      Dev<float> dret(ret), dself(self_g), ddense(dense.size()), dcompact(compact.size());
      p.routing = dev_input(dr, c.fmt, wf);
      p.routing.weights = nullptr;
      p.token_slot = dslot.get();
      p.send_offsets = doff.get();
      p.ret_grad_w = dret.get();
      p.self_grad_w = dself.get();
      p.grad_dense = wf == WeightFormat::kDense ? ddense.get() : nullptr;
      p.grad_compact = wf == WeightFormat::kCompact ? dcompact.get() : nullptr;
      sync(K::launch_ep_weight_grad(p, nullptr));
      const bool ok =
          same(ddense.host(), dense, "grad_dense", c.str()) & same(dcompact.host(), compact, "grad_compact", c.str());
      if (!ok && ++failing >= kMaxFailingCases) return;
    }
  }
}

// Launch hygiene: zero rows return cudaSuccess at once and touch nothing; bad shapes are
// The batched copy against the host's: pieces of every alignment (16, 4, 1 byte), one of several chunks, an
// empty one, into one poisoned buffer whose gaps must stay poisoned; a full batch and too many pieces.
TEST(EpKernelsGpu, CopyBatchMatchesHost) {
  REQUIRE_GPU();
  std::mt19937_64 rng(41);
  std::vector<uint8_t> src(200000);
  for (uint8_t& b : src) b = static_cast<uint8_t>(rng());
  // {dst offset, src offset, bytes}
  const std::vector<std::array<int64_t, 3>> pieces = {
      {0, 0, 16 * 1024 * 5 + 48},  // 16-byte aligned, six chunks
      {90016, 100000, 4096},       // 16-byte aligned, one chunk
      {95001, 7, 1000},            // bytes
      {97004, 12, 4 * 333},        // 4-byte
      {99000, 5, 0},               // empty
      {99100, 150001, 40001},      // bytes, three chunks
  };
  for (int count : {1, 3, 6}) {
    std::vector<uint8_t> ref = poisoned<uint8_t>(140000);
    Dev<uint8_t> dsrc(src), ddst(ref);
    K::CopyBatchParams host, dev;
    for (int q = 0; q < count; ++q) {
      const auto& pc = pieces[q];
      ASSERT_TRUE(host.add(ref.data() + pc[0], src.data() + pc[1], pc[2]));
      ASSERT_TRUE(dev.add(ddst.get() + pc[0], dsrc.get() + pc[1], pc[2]));
    }
    host::ep_copy_batch(host);
    sync(K::launch_ep_copy_batch(dev, nullptr));
    EXPECT_TRUE(same(ddst.host(), ref, "copy batch", std::to_string(count) + " pieces"));
  }
  K::CopyBatchParams full;
  for (int q = 0; q < K::CopyBatchParams::kMaxPieces; ++q) ASSERT_TRUE(full.add(&full, &full, 1));
  EXPECT_FALSE(full.add(&full, &full, 1));
  EXPECT_TRUE(full.add(&full, &full, 0));  // nothing to add
  EXPECT_EQ(full.count, K::CopyBatchParams::kMaxPieces);
  K::CopyBatchParams bad;
  bad.count = 1;
  bad.bytes[0] = 16;  // null pointers
  EXPECT_EQ(cudaErrorInvalidValue, K::launch_ep_copy_batch(bad, nullptr));
}

}  // namespace
