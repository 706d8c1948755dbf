// SPDX-License-Identifier: Apache-2.0
// The EP dispatch's expert-major kernels (kernels/ep.h): the rows' expert positions, the copies into the expert-major
// view (by warps or bulk copies, at the shared-memory limit too), the copy-engine chunks and the arrival waits (into
// recv_copy alone too), the gather index.
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
        // Rank-major only (expert_x null): the same pieces into recv_copy alone, by the bulk copies, no expert row
        // written (the expert rows' buffer is not even given).
        Dev<uint8_t> drecv3(c.R * rb);
        Dev<int> dtimed3(std::vector<int>(1, 0));
        K::ExpertMajorParams r3 = q;
        r3.expert_x = nullptr;
        r3.expert_src = nullptr;
        r3.recv_copy = drecv3.get();
        r3.timed_out = dtimed3.get();
        bool rank_major_bulk = false;
        ASSERT_EQ(K::expert_major_takes_bulk(r3, &rank_major_bulk), cudaSuccess);
        EXPECT_TRUE(rank_major_bulk) << c.str() << ": recv_copy alone";
        sync(K::launch_ep_expert_major(r3, nullptr));
        ok &= same(drecv3.host(), want, "recv_copy alone (rank-major only)", c.str());
        ok &= same(dtimed3.host(), std::vector<int>(1, missing ? 1 : 0), "timeout word (rank-major only)", c.str());
      }
    }
    if (!ok && ++failing >= kMaxFailingCases) return;
  }
}

// The gather index (launch_ep_expert_sources) from the host's positions of every receive case: the host's
// ep_expert_sources bit for bit, and both against the definition (each entry's received row at its expert row, -1
// on the rows no entry names); one poisoned int past N stays poisoned.
TEST(EpKernelsGpu, ExpertSourcesMatchHost) {
  REQUIRE_GPU();
  int failing = 0;
  for (const RecvCase& c : recv_grid()) {
    const RecvInput in = make_recv(c);
    const std::vector<int32_t> rows = host_positions(c, in);
    std::vector<int32_t> want(in.N + 1, -1);
    std::memset(&want[in.N], kPoison, sizeof(int32_t));
    for (int64_t e = 0; e < c.R * c.KL; ++e)
      if (rows[e] >= 0 && rows[e] < in.N) want[rows[e]] = static_cast<int32_t>(e / c.KL);
    std::vector<int32_t> got_host = poisoned<int32_t>(in.N + 1);
    K::ExpertSourcesParams s;
    s.num_recv_rows = c.R;
    s.max_row_experts = c.KL;
    s.recv_expert_rows = rows.data();
    s.num_expert_rows = in.N;
    s.sources = got_host.data();
    host::ep_expert_sources(s);
    Dev<int32_t> drows(rows), dsrc(in.N + 1);
    s.recv_expert_rows = drows.get();
    s.sources = dsrc.get();
    sync(K::launch_ep_expert_sources(s, nullptr));
    const bool ok = same(got_host, want, "sources (host)", c.str()) & same(dsrc.host(), want, "sources", c.str());
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

}  // namespace
