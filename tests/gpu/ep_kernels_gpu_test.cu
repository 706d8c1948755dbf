// SPDX-License-Identifier: Apache-2.0
// The CUDA kernels of the EP primitives (kernels/ep.h) against the host reference (src/host/ep_host.cc)
// on random inputs over grids of T, W, L, k, H, dtype and routing / weight formats, valid and invalid
// rows included. Outputs are poisoned first on both sides and compared byte for byte in full (slots,
// counts, rows, maps, weights, sums); only the weight-gradient dot products use a tolerance (ep_params.h
// lets CUDA sum them in another fixed order). Every test skips, saying why, without a CUDA device.
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

constexpr int kMaxFailingCases = 3;

// Compute capability major of device 0 (the bulk copies run from 9 on).
int device_major() {
  int major = 0;
  ck(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "cudaDeviceGetAttribute");
  return major;
}

// Rows whose bulk-copy ring (kernels/bulk_rows.cuh: up to 4 rows in 48 KiB) is 48 KiB or just under it: four rows
// of 12272 or 12288 bytes, three of 16352 or 16384, two of 24528 or 24576. With the bulk kernels' 128 bytes of
// static shared memory (H200) each ring is past the 49024 bytes of dynamic shared memory a block gets without
// opting in.
struct RingLimitRows {
  int64_t H;
  DType dtype;
};
constexpr RingLimitRows kRingLimitRows[] = {{6136, DType::kBF16}, {6144, DType::kBF16}, {4088, DType::kF32},
                                            {4096, DType::kF32},  {8192, DType::kBF16}, {12264, DType::kBF16},
                                            {12288, DType::kBF16}};

// Host layout of a case (also the input of the later primitives).
struct Layout {
  std::vector<int32_t> counts, slot;
};
Layout host_layout(const Case& c, const Routing& r) {
  Layout out{poisoned<int32_t>(size_t(c.W) * (c.L + 1)), poisoned<int32_t>(size_t(c.T) * c.W)};
  K::LayoutParams p;
  p.num_tokens = c.T;
  p.num_experts = c.E();
  p.topk = c.k;
  p.num_ranks = c.W;
  p.routing = host_input(r, c.fmt, WeightFormat::kNone);
  p.counts = out.counts.data();
  p.token_slot = out.slot.data();
  host::ep_layout(p);
  if (c.T == 0) std::fill(out.counts.begin(), out.counts.end(), 0);  // the orchestration zeroes them
  return out;
}

// Every case of more than 256 tokens and at most K::kLayoutOneLaunchMaxExperts experts twice: in four launches and
// in one (LayoutParams::scratch, poisoned: the launch must need no contents there). Past 4096 experts the per-expert
// counts are global atomics.
TEST(EpKernelsGpu, LayoutMatchesHost) {
  REQUIRE_GPU();
  int failing = 0, fused = 0;
  std::vector<Case> cases = routing_grid({3000, 40000});
  uint64_t n = 0;
  for (RoutingFormat f : {RoutingFormat::kBitmap, RoutingFormat::kTopkIndices})
    for (int64_t T : {200, 3000})
      cases.push_back({T, 8, 600, 8, f, WeightFormat::kNone, 7, DType::kBF16, true, false, 60 + n++});
  for (const Case& c : cases) {
    const Routing r = make_routing(c.T, c.E(), c.k, c.seed, c.skewed, c.invalid);
    const DevRouting dr(r);
    // With the exchange's packed rows in every other case (one spare column, which must stay poisoned).
    const bool pack = c.seed % 2 == 0;
    const int row = c.L + 3 + c.W;
    std::vector<int32_t> counts = poisoned<int32_t>(size_t(c.W) * (c.L + 1)),
                         slot = poisoned<int32_t>(size_t(c.T) * c.W), packed = poisoned<int32_t>(size_t(c.W) * row);
    K::LayoutParams p;
    p.num_tokens = c.T;
    p.num_experts = c.E();
    p.topk = c.k;
    p.num_ranks = c.W;
    p.routing = host_input(r, c.fmt, WeightFormat::kNone);
    p.counts = counts.data();
    p.token_slot = slot.data();
    p.pack_out = pack ? packed.data() : nullptr;
    p.pack_row = row;
    p.pack_flags = 0x5a5a;
    host::ep_layout(p);
    Dev<int32_t> dcounts(counts.size()), dslot(slot.size()), dpacked(packed.size());
    p.routing = dev_input(dr, c.fmt, WeightFormat::kNone);
    p.counts = dcounts.get();
    p.token_slot = dslot.get();
    p.pack_out = pack ? dpacked.get() : nullptr;
    sync(K::launch_ep_layout(p, nullptr));
    bool ok = same(dcounts.host(), counts, "counts", c.str()) & same(dslot.host(), slot, "token_slot", c.str());
    if (pack) ok &= same(dpacked.host(), packed, "packed exchange rows", c.str());
    if (const int64_t scratch = K::layout_scratch_ints(c.T, c.E(), c.W); scratch > 0) {
      ++fused;
      Dev<int32_t> dscratch{static_cast<size_t>(scratch)}, dcounts1(counts.size()), dslot1(slot.size()),
          dpacked1(packed.size());
      p.counts = dcounts1.get();
      p.token_slot = dslot1.get();
      p.pack_out = pack ? dpacked1.get() : nullptr;
      p.scratch = dscratch.get();
      sync(K::launch_ep_layout(p, nullptr));
      const std::string one = c.str() + " one launch";
      ok &= same(dcounts1.host(), counts, "counts", one) & same(dslot1.host(), slot, "token_slot", one);
      if (pack) ok &= same(dpacked1.host(), packed, "packed exchange rows", one);
    }
    if (!ok && ++failing >= kMaxFailingCases) return;
  }
  EXPECT_GT(fused, 100);  // the one-launch pass ran on the grid's larger cases
}

// The permute of case c with `self` as this rank, over host x and slots; no buffers.
K::PermuteParams permute_params(const Case& c, int self, const std::vector<uint8_t>& x, const Layout& lay) {
  K::PermuteParams p;
  p.num_tokens = c.T;
  p.num_experts = c.E();
  p.topk = c.k;
  p.num_ranks = c.W;
  p.self_rank = self;
  p.hidden = c.H;
  p.dtype = c.dtype;
  p.x = x.data();
  p.token_slot = lay.slot.data();
  return p;
}

TEST(EpKernelsGpu, PermuteMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const Case& c : routing_grid({3000})) {
    const Routing r = make_routing(c.T, c.E(), c.k, c.seed, c.skewed, c.invalid);
    const DevRouting dr(r);
    const Layout lay = host_layout(c, r);
    const int W = c.W, L = c.L, MB = K::local_map_bytes(L), KL = K::max_row_experts(c.k, L);
    const int self = static_cast<int>(c.seed % W);
    // Send chunks in rank order with one spare row between them; the self chunk after 3 foreign rows.
    std::vector<int64_t> send_off(W, -1);
    int64_t S = 0;
    for (int q = 0; q < W; ++q)
      if (q != self) send_off[q] = S, S += lay.counts[size_t(q) * (L + 1)] + 1;
    const int64_t self_off = 3, R = self_off + lay.counts[size_t(self) * (L + 1)] + 2;
    std::mt19937_64 rng(c.seed);
    const std::vector<uint8_t> x = random_rows(c.T, c.H, c.dtype, rng);
    const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
    // Variant 0: maps and weights; variant 1 (combine backward): rows only, no routing read.
    for (int variant = 0; variant < 2; ++variant) {
      const bool meta = variant == 0;
      std::vector<uint8_t> sx = poisoned<uint8_t>(S * rb), rx = poisoned<uint8_t>(R * rb);
      std::vector<uint8_t> sm = poisoned<uint8_t>(S * MB), rm = poisoned<uint8_t>(R * MB);
      std::vector<float> sw = poisoned<float>(S * KL), rw = poisoned<float>(R * KL);
      // The own rows' tokens (variant 0), one spare entry past them.
      const int64_t own = lay.counts[size_t(self) * (L + 1)];
      std::vector<int32_t> st = poisoned<int32_t>(own + 1);
      K::PermuteParams p = permute_params(c, self, x, lay);
      p.routing = host_input(r, c.fmt, meta ? c.wf : WeightFormat::kNone);
      if (!meta) p.routing.map = nullptr;
      p.send_offsets = send_off.data();
      p.self_recv_offset = self_off;
      p.send_x = sx.data();
      p.recv_x = rx.data();
      p.send_map = meta ? sm.data() : nullptr;
      p.recv_map = meta ? rm.data() : nullptr;
      p.send_weights = sw.data();  // with kNone weights: must stay untouched
      p.recv_weights = rw.data();
      p.self_tokens = meta ? st.data() : nullptr;
      host::ep_permute(p);
      for (int64_t t = 0; t < c.T && meta; ++t) {
        const int32_t slot = lay.slot[size_t(t) * W + self];
        if (slot >= 0) ASSERT_EQ(st[slot], t) << c.str();
      }
      Dev<int32_t> dst(poisoned<int32_t>(st.size()));
      Dev<uint8_t> dx(x), dsx(sx.size()), drx(rx.size()), dsm(sm.size()), drm(rm.size());
      Dev<float> dsw(sw.size()), drw(rw.size());
      Dev<int32_t> dslot(lay.slot);
      Dev<int64_t> doff(send_off);
      p.routing = dev_input(dr, c.fmt, meta ? c.wf : WeightFormat::kNone);
      if (!meta) p.routing.map = nullptr;
      p.x = dx.get();
      p.token_slot = dslot.get();
      p.send_offsets = doff.get();
      p.send_x = dsx.get();
      p.recv_x = drx.get();
      p.send_map = meta ? dsm.get() : nullptr;
      p.recv_map = meta ? drm.get() : nullptr;
      p.send_weights = dsw.get();
      p.recv_weights = drw.get();
      p.self_tokens = meta ? dst.get() : nullptr;
      sync(K::launch_ep_permute(p, nullptr));
      const std::string where = c.str() + (meta ? "" : " rows-only");
      if (meta && !same(dst.host(), st, "self_tokens", where) && ++failing >= kMaxFailingCases) return;
      bool ok = same(dsx.host(), sx, "send_x", where) & same(drx.host(), rx, "recv_x", where);
      ok = ok & same(dsm.host(), sm, "send_map", where) & same(drm.host(), rm, "recv_map", where);
      ok = ok & same(dsw.host(), sw, "send_weights", where) & same(drw.host(), rw, "recv_weights", where);
      if (!ok && ++failing >= kMaxFailingCases) return;
    }
  }
}

// The permute into per-rank destinations (the peers' windows; here the send buffers' chunks, addressed one
// by one): rows and meta together, the meta alone (row copies skipped for the peers, the self chunk whole),
// the rows alone (no self chunk, no meta). Each against the host and against the plain permute's send
// buffers: what lands in the destinations is exactly the plain permute's chunks; the rest stays poisoned.
TEST(EpKernelsGpu, PermutePeerDestMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const Case& c : routing_grid({3000})) {
    if (c.W < 2) continue;
    const Routing r = make_routing(c.T, c.E(), c.k, c.seed, c.skewed, c.invalid);
    const DevRouting dr(r);
    const Layout lay = host_layout(c, r);
    const int W = c.W, L = c.L, MB = K::local_map_bytes(L), KL = K::max_row_experts(c.k, L);
    const int self = static_cast<int>((c.seed + 1) % W);
    std::vector<int64_t> send_off(W, -1);
    int64_t S = 0;
    for (int q = 0; q < W; ++q)
      if (q != self) send_off[q] = S, S += lay.counts[size_t(q) * (L + 1)] + 1;
    const int64_t self_off = 2, R = self_off + lay.counts[size_t(self) * (L + 1)] + 1;
    std::mt19937_64 rng(c.seed ^ 0x5eed);
    const std::vector<uint8_t> x = random_rows(c.T, c.H, c.dtype, rng);
    const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
    const bool weights = c.wf != WeightFormat::kNone;
    // The plain permute (host) is the reference for every chunk.
    std::vector<uint8_t> ref_sx = poisoned<uint8_t>(S * rb), ref_rx = poisoned<uint8_t>(R * rb);
    std::vector<uint8_t> ref_sm = poisoned<uint8_t>(S * MB), ref_rm = poisoned<uint8_t>(R * MB);
    std::vector<float> ref_sw = poisoned<float>(S * KL), ref_rw = poisoned<float>(R * KL);
    K::PermuteParams p = permute_params(c, self, x, lay);
    p.routing = host_input(r, c.fmt, c.wf);
    p.send_offsets = send_off.data();
    p.self_recv_offset = self_off;
    p.send_x = ref_sx.data(), p.recv_x = ref_rx.data();
    p.send_map = ref_sm.data(), p.recv_map = ref_rm.data();
    p.send_weights = ref_sw.data(), p.recv_weights = ref_rw.data();
    host::ep_permute(p);
    const std::vector<uint8_t> pois_sx = poisoned<uint8_t>(S * rb), pois_rx = poisoned<uint8_t>(R * rb);
    const std::vector<uint8_t> pois_sm = poisoned<uint8_t>(S * MB), pois_rm = poisoned<uint8_t>(R * MB);
    const std::vector<float> pois_sw = poisoned<float>(S * KL), pois_rw = poisoned<float>(R * KL);
    // Variant 0: all; 1: maps and weights to the peers, the self chunk whole; 2: the peers' rows alone; 3: the
    // rows alone, the own ones too, by bulk copies where the shape allows, with the own rows' expert copies; 4: the
    // rows alone into the send buffers (no peer_dest) with arrival flags, as the copy engine's rows pass makes them.
    for (int variant = 0; variant < 5; ++variant) {
      const bool rows = variant != 1, meta = variant < 2, own = variant != 2, own_meta = variant < 2;
      const bool send_buffers = variant == 4;
      std::vector<uint8_t> sx = pois_sx, rx = pois_rx, sm = pois_sm, rm = pois_rm;
      std::vector<float> sw = pois_sw, rw = pois_rw;
      auto table = [&](uint8_t* bx, uint8_t* bm, float* bw) {
        std::vector<void*> d(3 * size_t(W), nullptr);
        for (int q = 0; q < W; ++q) {
          if (q == self) continue;
          d[q] = rows ? bx + send_off[q] * rb : nullptr;
          d[W + q] = meta ? bm + send_off[q] * MB : nullptr;
          d[2 * W + q] = meta && weights ? static_cast<void*>(bw + send_off[q] * KL) : nullptr;
        }
        return d;
      };
      K::PermuteParams q = p;
      q.send_offsets = nullptr;
      q.send_x = nullptr, q.send_map = nullptr, q.send_weights = nullptr;
      q.recv_x = own ? rx.data() : nullptr;
      q.recv_map = own_meta ? rm.data() : nullptr;
      q.recv_weights = own_meta ? rw.data() : nullptr;
      if (!meta) q.routing.weight_format = WeightFormat::kNone;
      const std::vector<void*> host_dest = table(sx.data(), sm.data(), sw.data());
      q.peer_dest = host_dest.data();
      if (send_buffers) {
        q.peer_dest = nullptr;
        q.send_x = sx.data();
        q.send_offsets = send_off.data();
      }
      host::ep_permute(q);
      Dev<uint8_t> dx(x), dsx(pois_sx), drx(pois_rx), dsm(pois_sm), drm(pois_rm);
      Dev<float> dsw(pois_sw), drw(pois_rw);
      Dev<int32_t> dslot(lay.slot);
      const std::vector<void*> dev_dest_host = table(dsx.get(), dsm.get(), dsw.get());
      Dev<void*> ddest(dev_dest_host);
      q.routing = dev_input(dr, c.fmt, meta ? c.wf : WeightFormat::kNone);
      q.x = dx.get();
      q.token_slot = dslot.get();
      q.recv_x = own ? drx.get() : nullptr;
      q.recv_map = own_meta ? drm.get() : nullptr;
      q.recv_weights = own_meta ? drw.get() : nullptr;
      q.peer_dest = ddest.get();
      Dev<int64_t> dsend_off(send_off);
      if (send_buffers) {
        q.peer_dest = nullptr;
        q.send_x = dsx.get();
        q.send_offsets = dsend_off.get();
      }
      // Variant 3's own expert copies: a random position (or none) for each of an own row's KL entries, the
      // expected expert_x from the host's token of each own slot.
      const int64_t n_self = lay.counts[size_t(self) * (L + 1)], NX = n_self * KL + 3;
      std::vector<int32_t> self_pos(size_t(n_self) * KL, -1);
      std::vector<uint8_t> want_ex = poisoned<uint8_t>(NX * rb);
      bool bulk = false;
      if (variant == 3) {
        q.bulk = true;
        ASSERT_EQ(K::permute_takes_bulk(q, &bulk), cudaSuccess);
        int major = 0;
        ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
        if (major >= 9 && rb % 16 == 0 && rb <= 24 * 1024 && c.T > 0) EXPECT_TRUE(bulk) << c.str();
        std::vector<int32_t> order(NX);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), std::mt19937_64(c.seed + 7));
        for (size_t e = 0; e < self_pos.size(); ++e)
          if (e % 5 != 3) self_pos[e] = order[e];
        for (int64_t t = 0; t < c.T; ++t) {
          const int slot = lay.slot[size_t(t) * W + self];
          for (int j = 0; slot >= 0 && j < KL; ++j)
            if (self_pos[size_t(slot) * KL + j] >= 0)
              std::memcpy(want_ex.data() + self_pos[size_t(slot) * KL + j] * rb, x.data() + t * rb, rb);
        }
      }
      Dev<int32_t> dself_pos(self_pos);
      Dev<uint8_t> dex(NX * rb);
      if (bulk) {
        q.self_expert_rows = dself_pos.get();
        q.expert_x = dex.get();
      }
      // The rows alone also raise arrival flags (the window's rows pass): chunks of 1-7 rows per peer.
      const bool arrival = variant >= 2;
      const int64_t chunk_rows = 1 + static_cast<int64_t>(c.seed % 7);
      std::vector<int64_t> send_n(W, 0);
      int64_t most = 1;
      for (int p2 = 0; p2 < W; ++p2) {
        send_n[p2] = lay.counts[size_t(p2) * (L + 1)];
        if (p2 != self) most = std::max(most, send_n[p2]);
      }
      const int C = static_cast<int>((most + chunk_rows - 1) / chunk_rows);
      const uint64_t epoch = c.seed;
      Dev<int32_t> dcount(std::vector<int32_t>(size_t(W) * C, 0));
      Dev<uint64_t> dflag(std::vector<uint64_t>(size_t(W) * C, 0));
      std::vector<uint64_t*> fptr(W, nullptr);
      for (int p2 = 0; p2 < W; ++p2)
        if (p2 != self) fptr[p2] = dflag.get() + size_t(p2) * C;
      Dev<uint64_t*> dfptr(fptr);
      Dev<int64_t> dsendn(send_n);
      if (arrival) {
        q.chunk_count = dcount.get();
        q.chunk_flag = dfptr.get();
        q.send_counts = dsendn.get();
        q.chunk_rows = chunk_rows;
        q.max_chunks = C;
        q.chunk_epoch = epoch;
      }
      sync(K::launch_ep_permute(q, nullptr));
      const std::string where = c.str() + " variant " + std::to_string(variant);
      if (arrival) {
        // Every chunk of every peer counted whole and flagged with the epoch; nothing past the peer's rows
        // and nothing for the own rank.
        std::vector<int32_t> want_count(size_t(W) * C, 0);
        std::vector<uint64_t> want_flag(size_t(W) * C, 0);
        for (int p2 = 0; p2 < W; ++p2)
          for (int64_t j = 0; p2 != self && j * chunk_rows < send_n[p2]; ++j) {
            want_count[size_t(p2) * C + j] = static_cast<int32_t>(std::min(chunk_rows, send_n[p2] - j * chunk_rows));
            want_flag[size_t(p2) * C + j] = epoch;
          }
        const std::string wc = where + " chunk_rows " + std::to_string(chunk_rows);
        if (!(same(dcount.host(), want_count, "chunk counts", wc) & same(dflag.host(), want_flag, "chunk flags", wc)) &&
            ++failing >= kMaxFailingCases)
          return;
      }
      // Device == host, byte for byte.
      bool ok = same(dsx.host(), sx, "dest x", where) & same(drx.host(), rx, "recv_x", where);
      ok = ok & same(dsm.host(), sm, "dest map", where) & same(drm.host(), rm, "recv_map", where);
      ok = ok & same(dsw.host(), sw, "dest weights", where) & same(drw.host(), rw, "recv_weights", where);
      // Host == the plain permute where written, poison where not.
      ok = ok & same(sx, rows ? ref_sx : pois_sx, "dest x vs send_x", where);
      ok = ok & same(rx, own ? ref_rx : pois_rx, "recv_x vs plain", where);
      ok = ok & same(sm, meta ? ref_sm : pois_sm, "dest map vs send_map", where);
      ok = ok & same(rm, own_meta ? ref_rm : pois_rm, "recv_map vs plain", where);
      ok = ok & same(sw, meta && weights ? ref_sw : pois_sw, "dest weights vs send_weights", where);
      ok = ok & same(rw, own_meta && weights ? ref_rw : pois_rw, "recv_weights vs plain", where);
      if (bulk) ok = ok & same(dex.host(), want_ex, "own expert rows (bulk)", where);
      if (!ok && ++failing >= kMaxFailingCases) return;
    }
  }
}

// Regression: the bulk permute sized its ring as up to 4 rows in 48 KiB of dynamic shared memory and launched
// without opting in, so rows of kRingLimitRows failed with cudaErrorInvalidValue (on sm_90 every default
// dispatch with H = 8192 bf16). Rows alone at W = 2 into the send buffer and the own chunk of recv_x, with the own
// rows' expert copies, against the host byte for byte; on sm_90 they must take the bulk copies.
TEST(EpKernelsGpu, PermuteBulkRowsAtSharedMemoryLimit) {
  REQUIRE_GPU();
  const bool sm90 = device_major() >= 9;
  uint64_t seed = 6100;
  for (const RingLimitRows& rr : kRingLimitRows)
    for (int64_t T : {4, 16})
      for (int L : {1, 2}) {
        const Case c{
            T,     2,     L,     std::min(2, 2 * L), RoutingFormat::kBitmap, WeightFormat::kNone, rr.H, rr.dtype,
            false, false, seed++};
        const Routing r = make_routing(c.T, c.E(), c.k, c.seed, false, false);
        const Layout lay = host_layout(c, r);
        const int W = c.W, KL = K::max_row_experts(c.k, L), self = 0;
        const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
        // The peer's chunk and one spare row in the send buffer; the own chunk after one row of recv_x, one
        // spare row past it.
        const std::vector<int64_t> send_off = {-1, 0};
        const int64_t S = lay.counts[size_t(1) * (L + 1)] + 1;
        const int64_t self_off = 1, n_self = lay.counts[0], R = self_off + n_self + 1;
        std::mt19937_64 rng(c.seed);
        const std::vector<uint8_t> x = random_rows(c.T, c.H, c.dtype, rng);
        std::vector<uint8_t> sx = poisoned<uint8_t>(S * rb), rx = poisoned<uint8_t>(R * rb);
        K::PermuteParams p = permute_params(c, self, x, lay);
        p.routing = host_input(r, c.fmt, WeightFormat::kNone);
        p.routing.map = nullptr;  // rows alone: no routing read
        p.send_offsets = send_off.data();
        p.self_recv_offset = self_off;
        p.send_x = sx.data();
        p.recv_x = rx.data();
        host::ep_permute(p);
        // The own rows' expert copies: a shuffled position (or none) per entry, one spare row.
        const int64_t NX = n_self * KL + 1;
        std::vector<int32_t> self_pos(size_t(n_self) * KL, -1), order(NX);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), std::mt19937_64(c.seed + 1));
        for (size_t e = 0; e < self_pos.size(); ++e)
          if (e % 3 != 2) self_pos[e] = order[e];
        std::vector<uint8_t> want_ex = poisoned<uint8_t>(NX * rb);
        for (int64_t t = 0; t < c.T; ++t) {
          const int slot = lay.slot[size_t(t) * W + self];
          for (int j = 0; slot >= 0 && j < KL; ++j)
            if (self_pos[size_t(slot) * KL + j] >= 0)
              std::memcpy(want_ex.data() + self_pos[size_t(slot) * KL + j] * rb, x.data() + t * rb, rb);
        }
        Dev<uint8_t> dx(x), dsx(sx.size()), drx(rx.size()), dex(NX * rb);
        Dev<int32_t> dslot(lay.slot), dpos(self_pos);
        Dev<int64_t> doff(send_off);
        p.x = dx.get();
        p.token_slot = dslot.get();
        p.send_offsets = doff.get();
        p.send_x = dsx.get();
        p.recv_x = drx.get();
        p.bulk = true;
        bool bulk = false;
        ASSERT_EQ(cudaSuccess, K::permute_takes_bulk(p, &bulk)) << c.str();
        if (sm90) ASSERT_TRUE(bulk) << c.str();
        if (bulk) {
          p.self_expert_rows = dpos.get();
          p.expert_x = dex.get();
        }
        sync(K::launch_ep_permute(p, nullptr));
        EXPECT_TRUE(same(dsx.host(), sx, "send_x", c.str()));
        EXPECT_TRUE(same(drx.host(), rx, "recv_x", c.str()));
        if (bulk) EXPECT_TRUE(same(dex.host(), want_ex, "own expert rows (bulk)", c.str()));
        if (HasFailure()) return;
      }
}

// The count exchange's send rows: the layout's counts per peer, then the whole send-count vector.
TEST(EpKernelsGpu, PackCountsMatchesHost) {
  REQUIRE_GPU();
  for (int W : {1, 2, 3, 8, 33}) {
    for (int L : {1, 7, 32}) {
      const int row = L + 2 + W + (W % 3);  // wider rows than needed stay untouched past the vector
      std::vector<int32_t> counts(size_t(W) * (L + 1));
      for (size_t i = 0; i < counts.size(); ++i) counts[i] = static_cast<int32_t>(i * 7919 % 1000);
      std::vector<int32_t> out = poisoned<int32_t>(size_t(W) * row);
      K::PackCountsParams p;
      p.counts = counts.data();
      p.num_ranks = W;
      p.local_experts = L;
      p.out = out.data();
      p.row = row;
      p.flags = 0x1234 + W * 64 + L;
      host::ep_pack_counts(p);
      for (int q = 0; q < W; ++q) {
        for (int c = 0; c <= L; ++c) ASSERT_EQ(out[size_t(q) * row + c], counts[size_t(q) * (L + 1) + c]);
        ASSERT_EQ(out[size_t(q) * row + L + 1], p.flags) << "the flags column";
        for (int r = 0; r < W; ++r) ASSERT_EQ(out[size_t(q) * row + L + 2 + r], counts[size_t(r) * (L + 1)]);
        for (int c = L + 2 + W; c < row; ++c)
          ASSERT_EQ(out[size_t(q) * row + c], poisoned<int32_t>(1)[0]) << "past the send-count vector";
      }
      Dev<int32_t> dc(counts), dout(poisoned<int32_t>(size_t(W) * row));
      p.counts = dc.get();
      p.out = dout.get();
      sync(K::launch_ep_pack_counts(p, nullptr));
      EXPECT_TRUE(same(dout.host(), out, "packed counts", "W " + std::to_string(W) + " L " + std::to_string(L)));
    }
  }
}

// ---- expert-major, reduce ----------------------------------------------------------------------------

struct RecvCase {
  int64_t R;
  int L, KL, align;
  int64_t H;
  DType dtype;
  int mode;  // 0: positions only, 1: copy, 2: weighted copy
  bool over_bits, short_counts;
  uint64_t seed;
  std::string str() const {
    std::ostringstream os;
    os << "R=" << R << " L=" << L << " KL=" << KL << " align=" << align << " H=" << H << " dtype=" << int(dtype)
       << " mode=" << mode << (over_bits ? " over-KL-bits" : "") << (short_counts ? " short-counts" : "");
    return os.str();
  }
};

std::vector<RecvCase> recv_grid() {
  std::vector<RecvCase> cases;
  uint64_t n = 0;
  for (int64_t R : {0, 1, 7, 1000, 3000, 40000})
    for (int L : {1, 3, 8, 9, 64, 256})
      for (int k : {1, 2, 8, 1 << 20}) {
        const int KL = std::min(k, L);
        if (k != (1 << 20) && k > L) continue;
        if (R >= 3000 && n % 2) {
          ++n;
          continue;
        }
        cases.push_back({R, L, KL,
                         n % 3 == 0   ? 1
                         : n % 3 == 1 ? 8
                                      : 128,
                         int64_t(n % 4 == 0   ? 1
                                 : n % 4 == 1 ? 7
                                              : 64),
                         DType(n % 3), int(n % 3), n % 5 == 2, n % 11 == 4, 500 + n});
        ++n;
      }
  for (DType d : {DType::kBF16, DType::kF32, DType::kF16})
    for (int mode : {1, 2}) cases.push_back({2000, 32, 8, 16, 7168, d, mode, false, false, 900 + n++});
  // The positions' one-block kernels (K::kScanSingleRows = 256 rows): the shared-memory one at its row limit, the
  // scan where the maps do not fit in shared memory (L = 2048: 82 KB at R = 256), and the scan for rows too few
  // for two segments (R = 400); the segmented kernels from one row past the limit. Rows over KL bits, short counts.
  for (bool odd : {false, true}) {
    cases.push_back({256, 64, 8, 16, 64, DType::kBF16, 1, odd, odd, 950 + n++});
    cases.push_back({256, 2048, 8, 8, 64, DType::kBF16, 2, odd, !odd, 950 + n++});
    cases.push_back({400, 512, 8, 8, 64, DType::kBF16, 0, !odd, odd, 950 + n++});
    cases.push_back({513, 64, 8, 16, 64, DType::kBF16, 1, odd, !odd, 950 + n++});
  }
  // Experts taken in chunks by the positions' kernels: 1500 local experts are 3 chunks of the segmented kernel
  // (512) and 12 of the one-block one (128); KL = 8 and KL = 40 (rows of up to 40 experts spread over the chunks).
  for (bool odd : {false, true}) {
    cases.push_back({6000, 1500, odd ? 40 : 8, 8, 64, DType::kBF16, odd ? 2 : 0, odd, !odd, 970 + n++});
    cases.push_back({250, 1500, odd ? 8 : 40, 8, 64, DType::kBF16, odd ? 0 : 1, !odd, odd, 970 + n++});
  }
  return cases;
}

struct RecvInput {
  std::vector<uint8_t> map;              // [R, MB]
  std::vector<int32_t> counts, offsets;  // [L], [L + 1]
  std::vector<uint8_t> x;                // [R, H]
  std::vector<float> weights;            // [R, KL]
  int64_t N;
};

RecvInput make_recv(const RecvCase& c) {
  std::mt19937_64 rng(c.seed);
  const int MB = K::local_map_bytes(c.L);
  RecvInput in;
  in.map.assign(c.R * MB, 0);
  in.counts.assign(c.L, 0);
  std::vector<int> perm(c.L);
  for (int64_t i = 0; i < c.R; ++i) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    int bits = 1 + static_cast<int>(rng() % c.KL);
    if (i % 13 == 5) bits = 0;                                      // a row using no expert
    if (c.over_bits && i % 4 == 1) bits = std::min(c.L, c.KL + 2);  // more than KL bits: only the first KL count
    std::vector<int> used(perm.begin(), perm.begin() + bits);
    std::sort(used.begin(), used.end());
    for (int j = 0; j < bits; ++j) {
      in.map[i * MB + used[j] / 8] |= static_cast<uint8_t>(1u << (used[j] % 8));
      if (j < c.KL) ++in.counts[used[j]];
    }
  }
  if (c.short_counts)
    for (int l = 0; l < c.L; l += 2) in.counts[l] = std::max(0, in.counts[l] - 1 - l % 3);
  in.offsets.assign(c.L + 1, 0);
  for (int l = 0; l < c.L; ++l) in.offsets[l + 1] = in.offsets[l] + (in.counts[l] + c.align - 1) / c.align * c.align;
  in.N = in.offsets[c.L];
  in.x = random_rows(c.R, c.H, c.dtype, rng);
  std::uniform_real_distribution<float> w(-1.0f, 1.0f);
  in.weights.resize(c.R * c.KL);
  for (float& v : in.weights) v = w(rng);
  return in;
}

// The host's parameters of case c: its maps, offsets and counts, positions into rows ([R, KL]), and by mode its
// rows into ex (mode 1 and 2) with the weights (mode 2).
K::ExpertMajorParams expert_params(const RecvCase& c, const RecvInput& in, int32_t* rows, uint8_t* ex) {
  K::ExpertMajorParams p;
  p.num_recv_rows = c.R;
  p.num_local_experts = c.L;
  p.max_row_experts = c.KL;
  p.hidden = c.H;
  p.dtype = c.dtype;
  p.recv_map = in.map.data();
  p.expert_offsets = in.offsets.data();
  p.expert_counts = in.counts.data();
  p.recv_expert_rows = rows;
  p.recv_x = c.mode ? in.x.data() : nullptr;
  p.expert_x = c.mode ? ex : nullptr;
  p.num_expert_rows = in.N;
  p.recv_weights = c.mode == 2 ? in.weights.data() : nullptr;
  return p;
}

// A receive input's device copies (map, offsets, counts, received rows, weights), the positions' output (`rows`
// ints, poisoned) and the expert-source scratch; point() moves expert_params' host pointers to them (recv_x and
// recv_weights where the params have them; expert_x stays the caller's).
struct DevRecv {
  Dev<uint8_t> map, x;
  Dev<int32_t> offsets, counts, rows;
  Dev<float> weights;
  Dev<int64_t> src;
  DevRecv(const RecvInput& in, size_t num_rows)
      : map(in.map),
        x(in.x),
        offsets(in.offsets),
        counts(in.counts),
        rows(num_rows),
        weights(in.weights),
        src(static_cast<size_t>(in.N)) {}
  void point(K::ExpertMajorParams* p) const {
    p->expert_src = src.get();
    p->recv_map = map.get();
    p->expert_offsets = offsets.get();
    p->expert_counts = counts.get();
    p->recv_expert_rows = rows.get();
    if (p->recv_x != nullptr) p->recv_x = x.get();
    if (p->recv_weights != nullptr) p->recv_weights = weights.get();
  }
};

// Two senders' rows [from[s], from[s] + count[s]) in chunks of chunk_rows, chunk-major (every sender's chunk j
// before any sender's chunk j + 1), as the window's dispatch orders them (src/ep/arrival.h): the pieces' seq
// [P + 1], row_start [P] and flag [P] (sender s's chunk j has flag s * C + j), and table(), their concatenation
// as ExpertMajorParams::arrival_pieces takes it.
struct TwoSenderPieces {
  std::vector<int64_t> seq{0}, start, flag;
  TwoSenderPieces(const int64_t (&from)[2], const int64_t (&count)[2], int64_t chunk_rows, int C) {
    for (int j = 0; j < C; ++j)
      for (int sd = 0; sd < 2; ++sd)
        if (count[sd] > j * chunk_rows) {
          seq.push_back(seq.back() + std::min(chunk_rows, count[sd] - j * chunk_rows));
          start.push_back(from[sd] + j * chunk_rows);
          flag.push_back(sd * C + j);
        }
  }
  std::vector<int64_t> table() const {
    std::vector<int64_t> t = seq;
    t.insert(t.end(), start.begin(), start.end());
    t.insert(t.end(), flag.begin(), flag.end());
    return t;
  }
};

TEST(EpKernelsGpu, ExpertMajorMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const RecvCase& c : recv_grid()) {
    const RecvInput in = make_recv(c);
    const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
    std::vector<int32_t> rows = poisoned<int32_t>(c.R * c.KL);
    std::vector<uint8_t> ex = poisoned<uint8_t>((in.N + 1) * rb);  // one spare row: nothing may land there
    K::ExpertMajorParams p = expert_params(c, in, rows.data(), ex.data());
    // The pad rows known to the caller (the dispatch knows them), or not.
    if (c.seed % 3 == 0) p.num_pad_rows = in.N - std::accumulate(in.counts.begin(), in.counts.end(), int64_t{0});
    host::ep_expert_major(p);
    const DevRecv d(in, rows.size());
    Dev<uint8_t> dex(ex.size());
    d.point(&p);
    p.expert_x = c.mode ? dex.get() : nullptr;
    sync(K::launch_ep_expert_major(p, nullptr));
    bool ok = same(d.rows.host(), rows, "recv_expert_rows", c.str()) & same(dex.host(), ex, "expert_x", c.str());
    // Several segments: the positions again in one launch, with its scratch (poisoned).
    if (const int64_t scratch = K::expert_scratch_ints(c.R, c.L); scratch > 0) {
      Dev<int32_t> dscratch(scratch), drows1(rows.size());
      K::ExpertMajorParams f = p;
      f.scratch = dscratch.get();
      f.recv_expert_rows = drows1.get();
      f.recv_x = nullptr;
      f.expert_x = nullptr;
      sync(K::launch_ep_expert_major(f, nullptr));
      ok &= same(drows1.host(), rows, "recv_expert_rows", c.str() + " (positions in one launch)");
    }
    if (c.mode != 0) {
      // As the split dispatch calls it: positions, the copies of rows [R/3, 2R/3) and the pad rows on a
      // small grid; then, from the same positions and source table, the copies of the other rows.
      Dev<uint8_t> dex2(ex.size());
      Dev<int32_t> drows2(rows.size());
      Dev<int64_t> dsrc2(in.N);
      K::ExpertMajorParams q = p;
      q.recv_expert_rows = drows2.get();
      q.expert_x = dex2.get();
      q.expert_src = dsrc2.get();
      q.copy_begin = c.R / 3;
      q.copy_end = 2 * c.R / 3;
      q.blocks_per_sm = 2;
      // Some cases copy the range from another array through an index (the dispatch's own rows read x).
      const int64_t nb = q.copy_end - q.copy_begin;
      const bool by_index = c.seed % 4 == 1 && nb > 0;
      std::vector<int32_t> perm(by_index ? nb : 0);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), std::mt19937_64(c.seed));
      std::vector<uint8_t> x2(perm.size() * rb);
      for (int64_t i = 0; i < static_cast<int64_t>(perm.size()); ++i)
        std::memcpy(x2.data() + perm[i] * rb, in.x.data() + (q.copy_begin + i) * rb, rb);
      Dev<uint8_t> dx2(x2);
      Dev<int32_t> dperm(perm);
      if (by_index) {
        q.recv_x = dx2.get();
        q.src_index = dperm.get();
      }
      bool first_bulk = false, second_bulk = false;
      ASSERT_EQ(K::expert_major_takes_bulk(q, &first_bulk), cudaSuccess);
      // Unweighted rows of 16-byte multiples up to 24 KiB go by bulk copies on sm_90 and later (R > 0: x given).
      int major = 0;
      ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
      if (major >= 9 && c.mode == 1 && c.R > 0 && rb % 16 == 0 && rb <= 24 * 1024) EXPECT_TRUE(first_bulk) << c.str();
      sync(K::launch_ep_expert_major(q, nullptr));
      q.recv_x = p.recv_x;
      q.src_index = nullptr;
      q.positions_given = q.copy_outside = true;
      q.zero_pads = false;
      q.blocks_per_sm = 0;
      if (c.seed % 2) q.bulk = false;  // the others by the gather: it needs the table the bulk copies left unfilled
      ASSERT_EQ(K::expert_major_takes_bulk(q, &second_bulk), cudaSuccess);
      q.src_given = second_bulk || !first_bulk;  // as the dispatch decides it
      // The bulk copies of the others as the window's dispatch makes them: the rows outside the range are two
      // senders' ([0, R / 3) and [2R / 3, R)), taken in chunks of 1-5 rows, chunk-major; each piece waits for its
      // arrival flag, and every row is also stored into recv_copy. Every flag is raised but one in some cases:
      // its rows wait out a 2 ms timeout, raise the timeout word and are copied as they are (here: complete).
      const bool arrival = second_bulk && c.R > 0;
      const int64_t chunk_rows = 1 + static_cast<int64_t>(c.seed % 5);
      const int64_t from[2] = {0, 2 * c.R / 3}, count[2] = {c.R / 3, c.R - 2 * c.R / 3};
      const int C = static_cast<int>(std::max(count[0], count[1]) / chunk_rows + 1);
      const TwoSenderPieces pc(from, count, chunk_rows, C);
      const std::vector<int64_t> pieces = pc.table();
      const uint64_t epoch = 3 + c.seed;
      std::vector<uint64_t> flags(size_t(2) * C, epoch);
      const bool missing = arrival && c.seed % 4 == 2 && count[1] > 0;
      if (missing) flags[size_t(C) + (count[1] - 1) / chunk_rows] = epoch - 1;
      Dev<uint64_t> dflags(flags);
      Dev<int64_t> dpieces(pieces);
      Dev<int> dtimed(std::vector<int>(1, 0));
      Dev<uint8_t> drecv(c.R * rb);
      if (arrival) {
        q.arrival_flags = dflags.get();
        q.arrival_pieces = dpieces.get();
        q.num_pieces = static_cast<int>(pc.start.size());
        q.arrival_epoch = epoch;
        q.timeout_ns = 2000000;
        q.timed_out = dtimed.get();
        q.recv_copy = drecv.get();
      }
      sync(K::launch_ep_expert_major(q, nullptr));
      ok &= same(drows2.host(), rows, "recv_expert_rows (split)", c.str()) &
            same(dex2.host(), ex, "expert_x (split)", c.str());
      if (arrival) {
        std::vector<uint8_t> want = poisoned<uint8_t>(c.R * rb);
        for (int64_t i = 0; i < c.R; ++i)
          if (i < q.copy_begin || i >= q.copy_end) std::memcpy(want.data() + i * rb, in.x.data() + i * rb, rb);
        ok &= same(drecv.host(), want, "recv_copy (arrival)", c.str());
        ok &= same(dtimed.host(), std::vector<int>(1, missing ? 1 : 0), "timeout word (arrival)", c.str());
      }
    }
    if (!ok && ++failing >= kMaxFailingCases) return;
  }
}

// Stands in for the rows pass into the send buffers: piece by piece, its rows copied from x, then its local
// flag raised (fenced, as the permute's arrival counting does), a pause between pieces so that the copy engine
// really waits.
__global__ void produce_pieces(const uint8_t* x,
                               uint8_t* send,
                               const int64_t* seq,
                               const int64_t* start,
                               const int64_t* flag,
                               int pieces,
                               uint64_t rb,
                               uint64_t* local,
                               uint64_t epoch) {
  for (int i = 0; i < pieces; ++i) {
    const uint64_t off = start[i] * rb, bytes = (seq[i + 1] - seq[i]) * rb;
    for (uint64_t b = threadIdx.x; b < bytes; b += blockDim.x) send[off + b] = x[off + b];
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      __nanosleep(2000);
      *reinterpret_cast<volatile uint64_t*>(local + flag[i]) = epoch;
    }
    __syncthreads();
  }
}

// The window's rows pass by the copy engine (BITEP_WINDOW_ROWS=ce): the others' bulk expert copies are launched
// first and wait on their arrival flags; a producer fills a send buffer piece by piece and raises a local flag per
// piece; on a third stream launch_ce_chunks waits for each local flag (cuStreamWaitValue32), copies the piece into
// the "window" and raises its arrival flag (cuStreamWriteValue32). Every expert row, pad and recv_copy row lands
// as the host's, and no wait times out. On one GPU the window is local memory; over NVLink the same calls target a
// peer's window.
TEST(EpKernelsGpu, CopyEngineChunksFeedArrivalWaits) {
  REQUIRE_GPU();
  if (!K::ce_chunks_available()) GTEST_SKIP() << "the driver has no stream memory operations (cuStreamWriteValue32)";
  int major = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  if (major < 9) GTEST_SKIP() << "the arrival waits go with the bulk copies: sm_90 and later";
  ASSERT_EQ(K::load_ep_kernels(), cudaSuccess);  // what group creation does: the kernels others wait on, loaded
  cudaStream_t copies = nullptr, engine = nullptr, producer = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&copies, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&engine, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking), cudaSuccess);
  // Loaded before any copies wait: with lazy module loading (CUDA's default) a kernel's first launch loads its
  // module, which waits for the device's running work, here the copies waiting on it (seen: a 10 s stall).
  produce_pieces<<<1, 32>>>(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0, nullptr, 0);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  int ran = 0;
  for (const RecvCase& c : recv_grid()) {
    const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
    if (c.mode != 1 || c.R < 2 || c.R > 3000 || rb % 16 != 0 || rb > 24 * 1024) continue;
    const RecvInput in = make_recv(c);
    std::vector<int32_t> rows = poisoned<int32_t>(c.R * c.KL);
    std::vector<uint8_t> ex = poisoned<uint8_t>((in.N + 1) * rb);
    K::ExpertMajorParams p = expert_params(c, in, rows.data(), ex.data());  // mode 1: rows copied, no weights
    host::ep_expert_major(p);
    Dev<uint8_t> dmap(in.map), dx(in.x), dsend(c.R * rb), dwin(c.R * rb), dex(ex.size()), drecv(c.R * rb);
    Dev<int32_t> doff(in.offsets), dcnt(in.counts), drows(rows.size());
    Dev<int64_t> dsrc(in.N);
    K::ExpertMajorParams q = p;
    q.recv_map = dmap.get();
    q.expert_offsets = doff.get();
    q.expert_counts = dcnt.get();
    q.recv_expert_rows = drows.get();
    q.expert_src = dsrc.get();
    q.recv_x = nullptr;  // the positions first
    q.expert_x = nullptr;
    sync(K::launch_ep_expert_major(q, nullptr));
    // Two senders' rows, [0, R / 2) and [R / 2, R), in chunks of 1-9 rows, chunk-major, as the dispatch cuts them.
    const int64_t chunk_rows = 1 + static_cast<int64_t>(c.seed % 9);
    const int64_t from[2] = {0, c.R / 2}, count[2] = {c.R / 2, c.R - c.R / 2};
    const int C = static_cast<int>((std::max(count[0], count[1]) + chunk_rows - 1) / chunk_rows);
    const TwoSenderPieces pc(from, count, chunk_rows, C);
    const std::vector<int64_t> pieces = pc.table();
    const std::vector<int64_t>&seq = pc.seq, &start = pc.start, &flag = pc.flag;
    const uint32_t epoch = 5 + static_cast<uint32_t>(c.seed % 1000);
    Dev<uint64_t> dflags(std::vector<uint64_t>(size_t(2) * C, epoch - 1));  // last call's: not landed
    Dev<int64_t> dpieces(pieces), dseq(seq), dstart(start), dflag_index(flag);
    Dev<uint64_t> dlocal(std::vector<uint64_t>(size_t(2) * C, 0));
    Dev<int> dtimed(std::vector<int>(1, 0));
    q.recv_x = dwin.get();  // the window: poisoned until the copy engine fills it
    q.expert_x = dex.get();
    q.positions_given = true;
    q.copy_begin = q.copy_end = 0;
    q.copy_outside = true;  // every row
    q.arrival_flags = dflags.get();
    q.arrival_pieces = dpieces.get();
    q.num_pieces = static_cast<int>(start.size());
    q.arrival_epoch = epoch;
    q.timeout_ns = 10ull * 1000 * 1000 * 1000;  // a lost flag fails the check below, not the wait
    q.timed_out = dtimed.get();
    q.recv_copy = drecv.get();
    q.blocks_per_sm = 2;  // room for the producer beside the waiting copies, as the dispatch leaves the rows pass
    bool bulk = false;
    ASSERT_EQ(K::expert_major_takes_bulk(q, &bulk), cudaSuccess);
    ASSERT_TRUE(bulk) << c.str();
    ASSERT_EQ(K::launch_ep_expert_major(q, copies), cudaSuccess) << c.str();
    // The producer is queued before the copy engine's waits, as the dispatch queues the rows pass first.
    produce_pieces<<<1, 256, 0, producer>>>(dx.get(), dsend.get(), dseq.get(), dstart.get(), dflag_index.get(),
                                            static_cast<int>(start.size()), rb, dlocal.get(), epoch);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    std::vector<K::CeChunk> chunks;
    for (size_t i = 0; i < start.size(); ++i) {
      K::CeChunk k;
      k.dst = dwin.get() + start[i] * rb;
      k.src = dsend.get() + start[i] * rb;
      k.bytes = static_cast<uint64_t>(seq[i + 1] - seq[i]) * rb;
      k.flag = dflags.get() + flag[i];
      k.wait = dlocal.get() + flag[i];
      chunks.push_back(k);
    }
    ASSERT_EQ(K::launch_ce_chunks(chunks.data(), static_cast<int>(chunks.size()), epoch, engine), cudaSuccess);
    std::vector<uint64_t> raised(size_t(2) * C, epoch - 1);  // a sender's chunks past its rows stay low
    for (int64_t f : flag) raised[f] = epoch;
    ASSERT_EQ(cudaStreamSynchronize(producer), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(engine), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(copies), cudaSuccess);
    bool ok = same(drows.host(), rows, "recv_expert_rows", c.str()) & same(dex.host(), ex, "expert_x", c.str()) &
              same(drecv.host(), in.x, "recv_copy", c.str()) &
              same(dtimed.host(), std::vector<int>(1, 0), "timeout word", c.str()) &
              same(dflags.host(), raised, "arrival flags", c.str());
    if (!ok) break;
    ++ran;
  }
  cudaStreamDestroy(copies);
  cudaStreamDestroy(engine);
  cudaStreamDestroy(producer);
  EXPECT_GT(ran, 3) << "too few cases took the bulk copies";
}

// Regression: the bulk expert copies sized their ring as up to 4 rows in 48 KiB of dynamic shared memory and
// launched without opting in, so rows of kRingLimitRows failed with cudaErrorInvalidValue. Positions and copies
// of R = 4 and 16 rows over L = 1 and 2 experts against the host byte for byte (expert_x with its pad rows and a
// spare row); on sm_90 they must take the bulk copies.
TEST(EpKernelsGpu, ExpertMajorBulkRowsAtSharedMemoryLimit) {
  REQUIRE_GPU();
  const bool sm90 = device_major() >= 9;
  uint64_t seed = 6200;
  for (const RingLimitRows& rr : kRingLimitRows)
    for (int64_t R : {4, 16})
      for (int L : {1, 2}) {
        const RecvCase c{R, L, L, 8, rr.H, rr.dtype, 1, false, false, seed++};
        const RecvInput in = make_recv(c);
        const size_t rb = size_t(c.H) * elem_bytes(c.dtype);
        std::vector<int32_t> rows = poisoned<int32_t>(c.R * c.KL);
        std::vector<uint8_t> ex = poisoned<uint8_t>((in.N + 1) * rb);
        K::ExpertMajorParams p = expert_params(c, in, rows.data(), ex.data());
        host::ep_expert_major(p);
        const DevRecv d(in, rows.size());
        Dev<uint8_t> dex(ex.size());
        d.point(&p);
        p.expert_x = dex.get();
        bool bulk = false;
        ASSERT_EQ(cudaSuccess, K::expert_major_takes_bulk(p, &bulk)) << c.str();
        if (sm90) ASSERT_TRUE(bulk) << c.str();
        sync(K::launch_ep_expert_major(p, nullptr));
        EXPECT_TRUE(same(d.rows.host(), rows, "recv_expert_rows", c.str()));
        EXPECT_TRUE(same(dex.host(), ex, "expert_x", c.str()));
        if (HasFailure()) return;
      }
}

// Regression: the positions' segment kernel takes 4 L + 36 KiB of dynamic shared memory and was opted in only
// past 48 KiB, but its static shared memory leaves less than 48 KiB without opting in (49024 bytes on an H200):
// from L = 3041 to 3072 the one-launch positions (with scratch) failed with cudaErrorInvalidValue. R = 4096,
// KL = 8 at L = 3041 and 3072, in one launch and in three, against the host's positions.
TEST(EpKernelsGpu, ExpertPositionsAtSharedMemoryLimit) {
  REQUIRE_GPU();
  uint64_t seed = 6300;
  for (int L : {3041, 3072}) {
    const RecvCase c{4096, L, 8, 8, 1, DType::kBF16, 0, false, false, seed++};  // positions only
    const RecvInput in = make_recv(c);
    std::vector<int32_t> rows = poisoned<int32_t>(c.R * c.KL);
    K::ExpertMajorParams p = expert_params(c, in, rows.data(), nullptr);
    host::ep_expert_major(p);
    const int64_t scratch = K::expert_scratch_ints(c.R, c.L);
    ASSERT_GT(scratch, 0) << c.str();  // the one-launch path
    Dev<uint8_t> dmap(in.map);
    Dev<int32_t> doff(in.offsets), dcnt(in.counts), dscratch(scratch);
    p.recv_map = dmap.get();
    p.expert_offsets = doff.get();
    p.expert_counts = dcnt.get();
    for (bool one_launch : {true, false}) {
      Dev<int32_t> drows(rows.size());
      K::ExpertMajorParams q = p;
      q.recv_expert_rows = drows.get();
      q.scratch = one_launch ? dscratch.get() : nullptr;
      sync(K::launch_ep_expert_major(q, nullptr));
      EXPECT_TRUE(same(drows.host(), rows, "recv_expert_rows", c.str() + (one_launch ? " one launch" : " three")));
    }
  }
}

// Regression: the bulk expert copies also store each row to recv_copy (the window's dispatch passes the caller's
// recv_x, which the API requires aligned to the dtype only), but whether they ran was decided from recv_x and
// expert_x: a recv_copy 8 bytes off 16-byte alignment took them, and their bulk stores need 16 bytes. Now such
// a call does not take them (expert_major_takes_bulk), and with recv_copy it is refused before anything runs
// (recv_copy is the bulk copies'); the way the dispatch then goes (expert rows by the copies, the rows copied
// into recv_copy apart) gives the host's bytes. A 16-byte aligned recv_copy still takes the bulk copies.
TEST(EpKernelsGpu, ExpertMajorMisalignedRecvCopy) {
  REQUIRE_GPU();
  const bool sm90 = device_major() >= 9;
  const RecvCase c{200, 8, 4, 8, 64, DType::kBF16, 1, false, false, 6400};  // rows of 128 bytes
  const RecvInput in = make_recv(c);
  const size_t rb = size_t(c.H) * elem_bytes(c.dtype), copy_bytes = c.R * rb;
  std::vector<int32_t> rows = poisoned<int32_t>(c.R * c.KL);
  std::vector<uint8_t> ex = poisoned<uint8_t>((in.N + 1) * rb), copy = poisoned<uint8_t>(copy_bytes);
  K::ExpertMajorParams p = expert_params(c, in, rows.data(), ex.data());
  p.recv_copy = copy.data();
  host::ep_expert_major(p);
  ASSERT_TRUE(same(copy, in.x, "host recv_copy", c.str()));
  // recv_copy's buffer: 8 bytes of poison, the rows, 8 bytes of poison.
  std::vector<uint8_t> want_off = poisoned<uint8_t>(copy_bytes + 16);
  std::memcpy(want_off.data() + 8, in.x.data(), copy_bytes);
  const DevRecv d(in, rows.size());
  d.point(&p);
  // The positions first, then the copies from them (as the window's dispatch calls it).
  K::ExpertMajorParams q = p;
  q.recv_x = nullptr;
  q.expert_x = nullptr;
  q.recv_copy = nullptr;
  sync(K::launch_ep_expert_major(q, nullptr));
  ASSERT_TRUE(same(d.rows.host(), rows, "recv_expert_rows", c.str()));
  q = p;
  q.positions_given = true;
  // 8 bytes off: not the bulk copies, and refused with recv_copy; nothing written.
  {
    Dev<uint8_t> dex(ex.size()), dcopy(copy_bytes + 16);
    q.expert_x = dex.get();
    q.recv_copy = dcopy.get() + 8;
    bool bulk = true;
    ASSERT_EQ(cudaSuccess, K::expert_major_takes_bulk(q, &bulk));
    ASSERT_FALSE(bulk) << c.str() << ": recv_copy 8 bytes off 16-byte alignment";
    EXPECT_EQ(cudaErrorInvalidValue, K::launch_ep_expert_major(q, nullptr));
    ASSERT_EQ(cudaSuccess, cudaDeviceSynchronize());
    EXPECT_TRUE(same(dex.host(), poisoned<uint8_t>(ex.size()), "expert_x (refused)", c.str()));
    EXPECT_TRUE(same(dcopy.host(), poisoned<uint8_t>(copy_bytes + 16), "recv_copy (refused)", c.str()));
    // The dispatch without the bulk copies' recv_copy: the expert rows by the copies, the rows by the batched copy.
    q.recv_copy = nullptr;
    sync(K::launch_ep_expert_major(q, nullptr));
    K::CopyBatchParams cb;
    ASSERT_TRUE(cb.add(dcopy.get() + 8, d.x.get(), static_cast<int64_t>(copy_bytes)));
    sync(K::launch_ep_copy_batch(cb, nullptr));
    EXPECT_TRUE(same(dex.host(), ex, "expert_x", c.str() + " recv_copy 8 bytes off"));
    EXPECT_TRUE(same(dcopy.host(), want_off, "recv_copy", c.str() + " 8 bytes off"));
  }
  // 16-byte aligned: the bulk copies on sm_90, expert_x and recv_copy as the host's.
  {
    Dev<uint8_t> dex(ex.size()), dcopy(copy_bytes);
    q.expert_x = dex.get();
    q.recv_copy = dcopy.get();
    bool bulk = false;
    ASSERT_EQ(cudaSuccess, K::expert_major_takes_bulk(q, &bulk));
    if (sm90) ASSERT_TRUE(bulk) << c.str();
    if (bulk) {
      sync(K::launch_ep_expert_major(q, nullptr));
      EXPECT_TRUE(same(dex.host(), ex, "expert_x", c.str() + " recv_copy aligned"));
      EXPECT_TRUE(same(dcopy.host(), copy, "recv_copy", c.str() + " aligned"));
    }
  }
}

TEST(EpKernelsGpu, ReduceMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const RecvCase& c : recv_grid()) {
    if (c.R > 3000) continue;
    const RecvInput in = make_recv(c);
    // recv_expert_rows from the host expert-major (positions only).
    std::vector<int32_t> rows(c.R * c.KL);
    K::ExpertMajorParams e;
    e.num_recv_rows = c.R;
    e.num_local_experts = c.L;
    e.max_row_experts = c.KL;
    e.recv_map = in.map.data();
    e.expert_offsets = in.offsets.data();
    e.expert_counts = in.counts.data();
    e.recv_expert_rows = rows.data();
    host::ep_expert_major(e);
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

// ---- the low-latency dispatch, W ranks on one device -----------------------------------------------

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

// cudaErrorInvalidValue, never a launch.
TEST(EpKernelsGpu, ZeroRowsAndBadShapes) {
  REQUIRE_GPU();
  K::LayoutParams lp;
  lp.num_experts = 8;
  lp.topk = 2;
  lp.num_ranks = 2;
  EXPECT_EQ(cudaSuccess, K::launch_ep_layout(lp, nullptr));  // T = 0, null pointers
  lp.num_ranks = 3;                                          // 8 % 3 != 0
  lp.num_tokens = 4;
  EXPECT_EQ(cudaErrorInvalidValue, K::launch_ep_layout(lp, nullptr));
  K::PermuteParams pp;
  pp.num_experts = 8;
  pp.topk = 2;
  pp.num_ranks = 2;
  EXPECT_EQ(cudaSuccess, K::launch_ep_permute(pp, nullptr));
  K::ExpertMajorParams ep;
  ep.num_local_experts = 4;
  ep.max_row_experts = 2;
  EXPECT_EQ(cudaSuccess, K::launch_ep_expert_major(ep, nullptr));
  K::ReduceParams rp;
  rp.max_row_experts = 2;
  EXPECT_EQ(cudaSuccess, K::launch_ep_reduce(rp, nullptr));
  K::FinalSumParams fp;
  fp.num_ranks = 2;
  EXPECT_EQ(cudaSuccess, K::launch_ep_final_sum(fp, nullptr));
  K::WeightGradParams wp;
  wp.num_experts = 8;
  wp.topk = 2;
  wp.num_ranks = 2;
  EXPECT_EQ(cudaSuccess, K::launch_ep_weight_grad(wp, nullptr));
  EXPECT_EQ(cudaSuccess, K::launch_ep_copy_batch(K::CopyBatchParams(), nullptr));  // no pieces
  EXPECT_EQ(cudaSuccess, cudaDeviceSynchronize());
}

}  // namespace
