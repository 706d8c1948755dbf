// SPDX-License-Identifier: Apache-2.0
// The EP low-latency dispatch's kernels (src/ep/low_latency.h), W ranks on one device: send and receive.
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
#include "src/ep/low_latency.h"
#include "src/host/dtype_host.h"
#include "src/host/ep_host.h"
#include "tests/gpu/ep_kernels_gpu_test.h"

namespace {

using namespace ep_test;

struct LowLatencyCase {
  int W, L, k, C;
  int64_t H;
  DType dtype;
  RoutingFormat fmt;
  WeightFormat wf;
  int align;
  bool skewed, invalid, weights_out;
  int max_pieces, copy_warps;
  uint64_t seed;
  int E() const { return W * L; }
  // Source s's T: full, empty, one token, and random in [0, C] in turn.
  int64_t T(int s) const {
    switch (s % 4) {
      case 0:
        return C;
      case 1:
        return W == 1 ? C - 1 : 0;
      case 2:
        return 1;
      default:
        return static_cast<int64_t>((seed * 2654435761u + s) % (C + 1));
    }
  }
  std::string str() const {
    static const char* fmts[] = {"bitmap", "bytemap", "indices"};
    static const char* wfs[] = {"none", "dense", "compact"};
    static const char* dts[] = {"f32", "bf16", "f16"};
    std::ostringstream os;
    os << "W=" << W << " L=" << L << " E=" << E() << " k=" << k << " C=" << C << " H=" << H << " " << dts[int(dtype)]
       << " " << fmts[int(fmt)] << " weights=" << wfs[int(wf)] << " align=" << align << (skewed ? " skewed" : "")
       << (invalid ? " invalid" : "") << (weights_out ? "" : " no-recv-weights") << " pieces<=" << max_pieces
       << " copy-warps=" << copy_warps << " T=[";
    for (int s = 0; s < W; ++s) os << (s ? "," : "") << T(s);
    os << "]";
    return os.str();
  }
};

std::vector<LowLatencyCase> low_latency_grid() {
  struct Shape {
    int W, L, k, C;
  };
  // Maps of L = 1 to 256 local experts (slices of 1 to 32 bytes, L % 8 != 0 among them), every rank count up
  // to 8 and 40 (more ranks than a warp's lanes), empty and full sources, and sources of more than one tile of
  // 256 tokens (the send's rank blocks split the tokens by tile).
  const Shape shapes[] = {{1, 256, 8, 130}, {1, 20, 3, 64}, {2, 128, 8, 130}, {2, 15, 4, 64},  {2, 1, 1, 33},
                          {3, 8, 6, 64},    {4, 15, 5, 96}, {4, 64, 8, 130},  {8, 32, 8, 130}, {8, 9, 8, 40},
                          {8, 3, 2, 17},    {40, 3, 8, 20}, {1, 64, 6, 777},  {2, 64, 8, 600}, {3, 9, 4, 530}};
  std::vector<LowLatencyCase> cases;
  uint64_t n = 0;
  for (const Shape& sh : shapes)
    for (int v = 0; v < 3; ++v, ++n)
      cases.push_back({sh.W, sh.L, std::min(sh.k, sh.W * sh.L), sh.C,
                       int64_t(v == 0   ? 8
                               : v == 1 ? 72
                                        : 13),
                       DType(n % 3), RoutingFormat(v), WeightFormat((n + 1) % 3),
                       n % 3 == 0   ? 1
                       : n % 3 == 1 ? 4
                                    : 16,
                       n % 4 == 2, n % 5 == 3, n % 6 != 5, n % 7 == 4 ? 1 : 32, n % 2 ? 32 : 4, 4200 + n});
  // The rows of ep_bench's shapes at one and two ranks.
  for (int W : {1, 2})
    cases.push_back({W, 256 / W, 8, 128, 7168, DType::kBF16, RoutingFormat::kBitmap, WeightFormat::kCompact, 16, true,
                     false, true, 32, 32, 4300 + n++});
  return cases;
}

// bitep's low-latency send and receive kernels for W ranks on one device: the W regions side by side in one
// allocation (each rank's window as the send kernel's `regions` see it), every source's send, then every
// owner's receive, in stream order (the barrier). Each owner's result against the host reference of the same
// semantics: slot (s, t) holds source s's token t (t < T_s), carrying the map slice, row and weights the
// permute gives that token for this owner (host::ep_permute, with host::ep_layout's slots), and the expert-major
// view of the W x C slots in slot order (host::ep_expert_major, counts and aligned offsets from those
// slices). Everything the kernels write is compared byte for byte, the poisoned rest of expert_x included.
void check_low_latency(const LowLatencyCase& c, bool* ok) {
  const int W = c.W, L = c.L, E = c.E(), C = c.C, MB = K::local_map_bytes(L), KL = K::max_row_experts(c.k, L);
  const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
  ASSERT_TRUE(K::low_latency_receive_fits(W, L, C)) << c.str();
  bool supported = false;
  ASSERT_EQ(cudaSuccess, K::low_latency_receive_supported(W, L, C, &supported)) << c.str();
  ASSERT_TRUE(supported) << c.str();
  const bitep::ep::LowLatencyLayout ll = bitep::ep::low_latency_layout(W, C, L, KL, rb);
  // Per source: its inputs, and per owner r its rows as the permute sends them (map slice, row, weights).
  struct Source {
    int64_t T;
    Routing r;
    std::vector<uint8_t> x;
    Layout lay;
    std::vector<int64_t> off;  // first row of owner q's chunk in the concatenated buffers
    std::vector<uint8_t> rows, map;
    std::vector<float> w;
  };
  std::vector<Source> src;
  for (int s = 0; s < W; ++s) {
    const int64_t T = c.T(s);
    Routing r = make_routing(T, E, c.k, c.seed * 31 + s, c.skewed, c.invalid);
    std::mt19937_64 rng(c.seed * 17 + s);
    std::vector<uint8_t> x = random_rows(T, c.H, c.dtype, rng);
    Case lc{T, W, L, c.k, c.fmt, c.wf, c.H, c.dtype, c.skewed, c.invalid, c.seed};
    Layout lay = host_layout(lc, r);
    std::vector<int64_t> off(W + 1, 0);
    for (int q = 0; q < W; ++q) off[q + 1] = off[q] + (T > 0 ? lay.counts[size_t(q) * (L + 1)] : 0);
    // One host permute with every chunk, the own one included, in the send buffers: the own chunk is
    // given its place through a second call's receive buffers, so the send buffers hold the others'.
    std::vector<uint8_t> rows(off[W] * rb, 0), map(off[W] * MB, 0);
    std::vector<float> w(off[W] * KL, 0.0f);
    if (T > 0) {
      K::PermuteParams p = permute_params(lc, s, x, lay);
      p.routing = host_input(r, c.fmt, c.wf);
      p.send_offsets = off.data();
      p.self_recv_offset = off[s];
      p.send_x = rows.data();
      p.send_map = map.data();
      p.send_weights = c.wf == WeightFormat::kNone ? nullptr : w.data();
      p.recv_x = rows.data();
      p.recv_map = map.data();
      p.recv_weights = c.wf == WeightFormat::kNone ? nullptr : w.data();
      host::ep_permute(p);
    }
    src.push_back(
        {T, std::move(r), std::move(x), std::move(lay), std::move(off), std::move(rows), std::move(map), std::move(w)});
  }
  // The device: W regions, every source's send.
  Dev<uint8_t> dregions(W * ll.dispatch_bytes);
  std::vector<char*> regions(W);
  for (int q = 0; q < W; ++q) regions[q] = reinterpret_cast<char*>(dregions.get()) + q * ll.dispatch_bytes;
  Dev<char*> dregion_table(regions);
  std::vector<std::unique_ptr<DevRouting>> drouting;
  std::vector<std::unique_ptr<Dev<uint8_t>>> dx;
  std::vector<std::unique_ptr<Dev<int32_t>>> dslots;
  for (int s = 0; s < W; ++s) {
    drouting.emplace_back(new DevRouting(src[s].r));
    dx.emplace_back(new Dev<uint8_t>(src[s].x));
    dslots.emplace_back(new Dev<int32_t>(src[s].T * W));
    K::LowLatencySendParams sp;
    sp.num_tokens = src[s].T;
    sp.num_experts = E;
    sp.topk = c.k;
    sp.num_ranks = W;
    sp.self_rank = s;
    sp.hidden = c.H;
    sp.dtype = c.dtype;
    sp.routing = dev_input(*drouting[s], c.fmt, c.wf);
    sp.x = dx[s]->get();
    sp.capacity = C;
    sp.regions = dregion_table.get();
    sp.block = ll.block;
    sp.token_slot = dslots[s]->get();
    sp.max_pieces = c.max_pieces;
    ASSERT_EQ(cudaSuccess, K::launch_ep_low_latency_send(sp, nullptr)) << c.str() << " source " << s;
  }
  ck(cudaDeviceSynchronize(), "the sends");
  *ok = true;
  for (int s = 0; s < W && *ok; ++s) {
    std::vector<int32_t> slot(src[s].T * W);
    for (int64_t t = 0; t < src[s].T; ++t)
      for (int q = 0; q < W; ++q) slot[t * W + q] = src[s].lay.slot[size_t(t) * W + q] >= 0 ? int32_t(t) : -1;
    *ok &= same(dslots[s]->host(), slot, "token_slot", c.str() + " source " + std::to_string(s));
  }
  // Every owner's receive, and its host reference.
  const int64_t R = int64_t(W) * C, N = R * KL + int64_t(L) * (c.align - 1);
  for (int o = 0; o < W && *ok; ++o) {
    const std::string where = c.str() + " owner " + std::to_string(o);
    std::vector<uint8_t> map(R * MB, 0), rows(R * rb, 0);
    std::vector<float> w(R * KL, 0.0f);
    for (int s = 0; s < W; ++s)
      for (int64_t t = 0; t < src[s].T; ++t) {
        const int32_t q = src[s].lay.slot[size_t(t) * W + o];
        if (q < 0) continue;
        const int64_t from = src[s].off[o] + q, i = int64_t(s) * C + t;
        std::memcpy(map.data() + i * MB, src[s].map.data() + from * MB, MB);
        std::memcpy(rows.data() + i * rb, src[s].rows.data() + from * rb, rb);
        std::memcpy(w.data() + i * KL, src[s].w.data() + from * KL, KL * sizeof(float));
      }
    std::vector<int32_t> counts(L, 0), offsets(L + 1, 0);
    for (int64_t i = 0; i < R; ++i)
      for (int l = 0, j = 0; l < L && j < KL; ++l)
        if (map[i * MB + l / 8] >> (l % 8) & 1) ++counts[l], ++j;
    for (int l = 0; l < L; ++l) offsets[l + 1] = offsets[l] + (counts[l] + c.align - 1) / c.align * c.align;
    std::vector<int32_t> erows = poisoned<int32_t>(R * KL);
    std::vector<uint8_t> ex = poisoned<uint8_t>((N + 1) * rb);  // one spare row: nothing may land there
    K::ExpertMajorParams hp;
    hp.num_recv_rows = R;
    hp.num_local_experts = L;
    hp.max_row_experts = KL;
    hp.hidden = c.H;
    hp.dtype = c.dtype;
    hp.recv_map = map.data();
    hp.expert_offsets = offsets.data();
    hp.expert_counts = counts.data();
    hp.recv_expert_rows = erows.data();
    hp.recv_x = rows.data();
    hp.expert_x = ex.data();
    hp.num_expert_rows = offsets[L];
    host::ep_expert_major(hp);
    std::vector<float> ew(R * KL, 0.0f);  // the slots' weights, 0 past each slot's experts
    for (int64_t i = 0; i < R; ++i)
      for (int j = 0; j < KL && erows[i * KL + j] >= 0; ++j) ew[i * KL + j] = w[i * KL + j];

    Dev<uint8_t> dex(ex.size());
    Dev<int32_t> dcounts(L), doffsets(L + 1), derows(R * KL);
    Dev<float> dw(R * KL);
    K::LowLatencyReceiveParams rp;
    rp.num_ranks = W;
    rp.num_local_experts = L;
    rp.max_row_experts = KL;
    rp.capacity = C;
    rp.hidden = c.H;
    rp.dtype = c.dtype;
    rp.alignment = c.align;
    rp.region = regions[o];
    rp.block = ll.block;
    rp.expert_x = dex.get();
    rp.expert_capacity = N;
    rp.expert_counts = dcounts.get();
    rp.expert_offsets = doffsets.get();
    rp.recv_expert_rows = derows.get();
    rp.recv_weights = c.weights_out ? dw.get() : nullptr;
    rp.copy_warps_per_sm = c.copy_warps;
    sync(K::launch_ep_low_latency_receive(rp, nullptr));
    *ok &= same(dcounts.host(), counts, "expert_counts", where);
    *ok &= same(doffsets.host(), offsets, "expert_offsets", where);
    *ok &= same(derows.host(), erows, "recv_expert_rows", where);
    if (c.weights_out) *ok &= same(dw.host(), ew, "recv_weights", where);
    *ok &= same(dex.host(), ex, "expert_x", where);
  }
}

TEST(EpKernelsGpu, LowLatencyManyRanksMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const LowLatencyCase& c : low_latency_grid()) {
    bool ok = true;
    check_low_latency(c, &ok);
    if (HasFatalFailure()) return;
    if (!ok && ++failing >= kMaxFailingCases) return;
  }
}

// Regression: low_latency_receive_fits allowed (W + 2) L + W + 2 int32 up to 48 KiB of dynamic shared memory, but
// the receive kernel's static shared memory (the block scan's, 1184 bytes on an H200) leaves 47968 bytes without
// opting in: W = 1, L = 4000 (48012 bytes), W = 2, L = 3000 (48016) and W = 8, L = 1216 (48680) passed the check,
// and the receive, launched after the send and the barrier, failed with cudaErrorInvalidValue. Each shape through
// the send and receive against the host, as LowLatencyManyRanksMatchesHost.
TEST(EpKernelsGpu, LowLatencyReceiveAtSharedMemoryLimit) {
  REQUIRE_GPU();
  struct Shape {
    int W, L, C;
    RoutingFormat fmt;
  };
  const Shape shapes[] = {{1, 4000, 16, RoutingFormat::kBitmap},
                          {2, 3000, 8, RoutingFormat::kTopkIndices},
                          {8, 1216, 4, RoutingFormat::kBytemap}};
  uint64_t n = 0;
  for (const Shape& sh : shapes) {
    const LowLatencyCase c{sh.W, sh.L,   8,     sh.C, 64, DType(n % 3), sh.fmt,  WeightFormat::kCompact,
                           4,    n == 1, false, true, 32, 32,           4500 + n};
    ++n;
    EXPECT_GT(K::low_latency_receive_smem(c.W, c.L), size_t(48 * 1024 - 1184)) << c.str();
    bool ok = true;
    check_low_latency(c, &ok);
    if (HasFatalFailure()) return;
    EXPECT_TRUE(ok) << c.str();
  }
}

}  // namespace
