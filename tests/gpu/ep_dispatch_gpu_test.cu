// SPDX-License-Identifier: Apache-2.0
// The EP dispatch's first kernels (kernels/ep.h): the layout (slots and counts), the permute (rows, map slices and
// weights into send, receive or peer buffers, by warps or bulk copies) and the packed counts, over grids of T, W, L, k,
// H, dtype and routing / weight formats, invalid rows included; and every launcher's zero-row and bad-shape cases.
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

// Every case of more than 256 tokens and at most K::kLayoutOneLaunchMaxExperts experts twice: in four launches and
// in one (LayoutParams::scratch, poisoned: the launch must need no contents there). Past 4096 experts the per-expert
// counts are global atomics. The one block (T <= 256) beyond routing_grid: a lane walking 2 words of a row (E = 2048),
// 35 rank groups (W = 1100), and past its shared memory limit the thread-a-token form (W = 2048).
TEST(EpKernelsGpu, LayoutMatchesHost) {
  REQUIRE_GPU();
  int failing = 0, fused = 0;
  std::vector<Case> cases = routing_grid({3000, 40000});
  uint64_t n = 0;
  for (RoutingFormat f : {RoutingFormat::kBitmap, RoutingFormat::kTopkIndices})
    for (int64_t T : {200, 3000})
      cases.push_back({T, 8, 600, 8, f, WeightFormat::kNone, 7, DType::kBF16, true, false, 60 + n++});
  for (RoutingFormat f : {RoutingFormat::kBitmap, RoutingFormat::kBytemap, RoutingFormat::kTopkIndices}) {
    cases.push_back({256, 2, 1024, 8, f, WeightFormat::kNone, 7, DType::kBF16, n % 2 == 0, true, 60 + n++});
    cases.push_back({200, 1100, 1, 8, f, WeightFormat::kNone, 7, DType::kBF16, false, true, 60 + n++});
    cases.push_back({256, 2048, 1, 8, f, WeightFormat::kNone, 7, DType::kBF16, false, true, 60 + n++});
  }
  for (const Case& c : cases) {
    const Routing r = make_routing(c.T, c.E(), c.k, c.seed, c.skewed, c.invalid);
    const DevRouting dr(r);
    // With the exchange's packed rows in every other case (one spare column, which must stay poisoned).
    const bool pack = c.seed % 2 == 0;
    const int row = c.L + 3 + c.W;
    std::vector<int32_t> counts = poisoned<int32_t>(size_t(c.W) * (c.L + 1)),
                         slot = poisoned<int32_t>(size_t(c.T) * c.W), packed = poisoned<int32_t>(size_t(c.W) * row);
    K::LayoutParams p = layout_params(c, host_input(r, c.fmt, WeightFormat::kNone), counts.data(), slot.data());
    p.pack_out = pack ? packed.data() : nullptr;
    p.pack_row = row;
    p.pack_flags = 0x5a5a;
    // The map's copy (the dispatch's handle keeps one), 1 byte off 16-byte alignment in every other case, between
    // poisoned guards.
    const size_t map_bytes = K::routing_map_bytes(c.fmt, c.T, c.E(), c.k), off = c.seed % 4 < 2 ? 0 : 1;
    std::vector<uint8_t> want_copy = poisoned<uint8_t>(map_bytes + 32), host_copy = want_copy;
    std::memcpy(want_copy.data() + 16 + off, p.routing.map, map_bytes);
    p.map_copy = host_copy.data() + 16 + off;
    host::ep_layout(p);
    Dev<int32_t> dcounts(counts.size()), dslot(slot.size()), dpacked(packed.size());
    Dev<uint8_t> dcopy(want_copy.size());
    p.routing = dev_input(dr, c.fmt, WeightFormat::kNone);
    p.counts = dcounts.get();
    p.token_slot = dslot.get();
    p.pack_out = pack ? dpacked.get() : nullptr;
    p.map_copy = dcopy.get() + 16 + off;
    sync(K::launch_ep_layout(p, nullptr));
    p.map_copy = nullptr;
    bool ok = same(dcounts.host(), counts, "counts", c.str()) & same(dslot.host(), slot, "token_slot", c.str()) &
              same(host_copy, want_copy, "map copy (host)", c.str()) &
              same(dcopy.host(), want_copy, "map copy", c.str());
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

// Case c through the permute (PermuteParams::max_row_pieces = max_row_pieces) against the host: maps and weights
// with the rows, then the rows alone (the combine backward's use), into send buffers and the self chunk. Returns
// whether both matched (the differences printed).
bool permute_matches_host(const Case& c, int max_row_pieces) {
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
  bool all = true;
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
    p.max_row_pieces = max_row_pieces;
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
      if (slot >= 0 && st[slot] != t) {
        ADD_FAILURE() << c.str() << ": the host's self_tokens[" << slot << "] is " << st[slot] << ", not " << t;
        return false;
      }
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
    const std::string where =
        c.str() + (meta ? "" : " rows-only") + " max_row_pieces=" + std::to_string(max_row_pieces);
    bool ok = !meta || same(dst.host(), st, "self_tokens", where);
    ok = ok & same(dsx.host(), sx, "send_x", where) & same(drx.host(), rx, "recv_x", where);
    ok = ok & same(dsm.host(), sm, "send_map", where) & same(drm.host(), rm, "recv_map", where);
    ok = ok & same(dsw.host(), sw, "send_weights", where) & same(drw.host(), rw, "recv_weights", where);
    all = all && ok;
  }
  return all;
}

TEST(EpKernelsGpu, PermuteMatchesHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const Case& c : routing_grid({3000}))
    if (!permute_matches_host(c, 0) && ++failing >= kMaxFailingCases) return;
}

// Few tokens with long rows: each row split among warps in pieces of whole passes (row_pieces), at every cap of
// PermuteParams::max_row_pieces (1: a warp a token). 16-byte vectors (H = 7168 bf16: 7 passes; 5000 f32), 8-byte
// (4100 bf16) and 2-byte (4099 f16: an odd row), a short last piece; ranks 1-3, so rows go to the self chunk and to
// one or two peers' send chunks, with their maps and weights from the first piece.
TEST(EpKernelsGpu, PermuteInPieces) {
  REQUIRE_GPU();
  struct Shape {
    int64_t T;
    int W;
    int64_t H;
    DType dt;
    RoutingFormat fmt;
  };
  const Shape shapes[] = {{1, 2, 7168, DType::kBF16, RoutingFormat::kBitmap},
                          {3, 3, 4100, DType::kBF16, RoutingFormat::kBytemap},
                          {37, 2, 5000, DType::kF32, RoutingFormat::kTopkIndices},
                          {200, 1, 7168, DType::kBF16, RoutingFormat::kBitmap},
                          {5, 2, 4099, DType::kF16, RoutingFormat::kBitmap}};
  uint64_t seed = 8100;
  int failing = 0;
  for (const Shape& sh : shapes)
    for (const int cap : {0, 1, 2, 3, 1024}) {
      const Case c{sh.T, sh.W, 16, 4, sh.fmt, WeightFormat(seed % 3), sh.H, sh.dt, false, false, seed++};
      if (!permute_matches_host(c, cap) && ++failing >= kMaxFailingCases) return;
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
