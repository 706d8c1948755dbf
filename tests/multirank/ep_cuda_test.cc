// SPDX-License-Identifier: Apache-2.0
// The cuda backend against the host backend on the same inputs, one GPU per rank: maps, counts, rows and
// the expert-major layout bit for bit; combine and its backward within a stated tolerance of the host.
// Skipped, with the reason, where there is no CUDA build or not one GPU per rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "tests/multirank/ep_checks.h"

#ifdef BITEP_MULTIRANK_CUDA
#include <cuda_runtime.h>
#endif

namespace ept {
namespace {

#ifdef BITEP_MULTIRANK_CUDA
struct Dev {
  void* p = nullptr;
  explicit Dev(size_t bytes) { cudaMalloc(&p, bytes ? bytes : 1); }
  Dev(const void* host, size_t bytes) : Dev(bytes) {
    if (bytes) cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
  }
  ~Dev() { cudaFree(p); }
  template <typename T>
  std::vector<T> get(size_t n) const {
    std::vector<T> v(n);
    if (n) cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
};

template <typename T>
std::vector<T> download(const void* p, size_t n) {
  std::vector<T> v(n);
  if (n) EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

void run_against_host(const Spec& s) {
  int device = 0;
  std::string why;
  if (!gpu_per_rank(&device, &why)) GTEST_SKIP() << why;
  ASSERT_EQ(cudaSetDevice(device), cudaSuccess);
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  const Input& in = world[rank];
  const size_t row = s.H * dsize(s.dtype);
  // Host backend: the reference layout and outputs.
  GroupGuard hg;
  ASSERT_EQ(make_group(s, &hg), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t ha = dispatch_args(s, in);
  HandleGuard hh;
  ASSERT_EQ(bitepDispatch(hg.g, &ha, nullptr, &hh.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t hl;
  ASSERT_EQ(bitepHandleGetLayout(hh.h, &hl), bitepSuccess);
  // Cuda backend on the same inputs.
  bitepGroupConfig_t c = group_config(s, W);
  c.backend = bitepBackendCuda;
  c.device = device;
  GroupGuard cg;
  ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &cg.g), bitepSuccess) << bitepGetLastError();
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const bitepStream_t bs = reinterpret_cast<bitepStream_t>(stream);
  Dev x(in.x.data(), in.x.size()), map(in.map.data(), in.map.size());
  Dev probs(in.probs.data(), 4 * in.probs.size()), topk(in.topk.data(), 4 * in.topk.size());
  bitepDispatchArgs_t ca = ha;
  ca.x = in.T ? x.p : nullptr;
  ca.routing_map = in.T ? map.p : nullptr;
  ca.probs = ha.probs ? static_cast<const float*>(probs.p) : nullptr;
  ca.topk_weights = ha.topk_weights ? static_cast<const float*>(topk.p) : nullptr;
  HandleGuard ch;
  ASSERT_EQ(bitepDispatch(cg.g, &ca, bs, &ch.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t cl;
  ASSERT_EQ(bitepHandleGetLayout(ch.h, &cl), bitepSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const int64_t R = hl.num_recv_rows, N = hl.num_expert_rows;
  const int L = hl.num_local_experts, KL = hl.max_row_experts, MB = (L + 7) / 8;
  ASSERT_EQ(cl.num_recv_rows, R);
  ASSERT_EQ(cl.num_expert_rows, N);
  for (int r = 0; r < W; ++r) {
    EXPECT_EQ(cl.recv_counts_host[r], hl.recv_counts_host[r]);
    EXPECT_EQ(cl.send_counts_host[r], hl.send_counts_host[r]);
  }
  for (int l = 0; l < L; ++l) EXPECT_EQ(cl.expert_counts_host[l], hl.expert_counts_host[l]);
  EXPECT_EQ(download<int32_t>(cl.expert_offsets, L + 1),
            std::vector<int32_t>(hl.expert_offsets, hl.expert_offsets + L + 1));
  EXPECT_EQ(
      download<uint8_t>(cl.recv_x, R * row),
      std::vector<uint8_t>(static_cast<const uint8_t*>(hl.recv_x), static_cast<const uint8_t*>(hl.recv_x) + R * row));
  EXPECT_EQ(download<uint8_t>(cl.recv_map, R * MB), std::vector<uint8_t>(hl.recv_map, hl.recv_map + R * MB));
  EXPECT_EQ(download<int32_t>(cl.recv_expert_rows, R * KL),
            std::vector<int32_t>(hl.recv_expert_rows, hl.recv_expert_rows + R * KL));
  if (hl.recv_weights != nullptr)
    EXPECT_EQ(download<float>(cl.recv_weights, R * KL), std::vector<float>(hl.recv_weights, hl.recv_weights + R * KL));
  const std::vector<uint8_t> cex = download<uint8_t>(cl.expert_x, N * row);
  EXPECT_EQ(cex, std::vector<uint8_t>(static_cast<const uint8_t*>(hl.expert_x),
                                      static_cast<const uint8_t*>(hl.expert_x) + N * row));
  // Combine through the toy experts: the cuda result within one rounding of the host's.
  const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, hl);
  bitepResult_t res;
  const int weighted = s.weights != Weights::kNone;
  const std::vector<uint8_t> host_out = combine(hg.g, hh.h, y.data(), bitepLayoutExpertMajor, weighted, in.T, s, &res);
  ASSERT_EQ(res, bitepSuccess) << bitepGetLastError();
  Dev dy(y.data(), y.size()), dout(in.T * row);
  bitepCombineArgs_t cc = BITEP_COMBINE_ARGS_INIT;
  cc.y = dy.p;
  cc.weighted = weighted;
  cc.out = dout.p;
  ASSERT_EQ(bitepCombine(cg.g, ch.h, &cc, bs), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const std::vector<uint8_t> cuda_out = dout.get<uint8_t>(in.T * row);
  Mismatches m;
  for (int64_t i = 0; i < in.T * s.H; ++i) {
    const float a = load(s.dtype, host_out.data(), i), b = load(s.dtype, cuda_out.data(), i);
    MISMATCH(m, std::fabs(a - b) <= std::ldexp(std::fabs(a), s.dtype == bitepFloat32 ? -20 : -7),
             "out[" << i << "]: cuda " << b << ", host " << a);
  }
  EXPECT_EQ(m.n, 0) << "on rank " << rank << ":" << m.first;

  // Dispatch backward (the unweighted combine) of the same expert-major rows: within one rounding.
  const std::vector<uint8_t> host_gx = combine(hg.g, hh.h, y.data(), bitepLayoutExpertMajor, 0, in.T, s, &res);
  ASSERT_EQ(res, bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepDispatchBackward(cg.g, ch.h, dy.p, bitepLayoutExpertMajor, dout.p, bs), bitepSuccess)
      << bitepGetLastError();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const std::vector<uint8_t> cuda_gx = dout.get<uint8_t>(in.T * row);
  Mismatches mb;
  for (int64_t i = 0; i < in.T * s.H; ++i) {
    const float a = load(s.dtype, host_gx.data(), i), b = load(s.dtype, cuda_gx.data(), i);
    MISMATCH(mb, std::fabs(a - b) <= std::ldexp(std::fabs(a), s.dtype == bitepFloat32 ? -20 : -7),
             "grad_x[" << i << "]: cuda " << b << ", host " << a);
  }
  EXPECT_EQ(mb.n, 0) << "dispatch backward on rank " << rank << ":" << mb.first;

  // Combine backward: grad_y bit for bit with the host's (a copy, or one product with the weight), the
  // weight gradients against the analytic fp64 dot products (as the host grid checks them).
  const int E = s.E(W), k = config_topk(s, W);
  std::vector<uint8_t> grad_out(in.T * row);
  for (int64_t t = 0; t < in.T; ++t)
    for (int hh = 0; hh < s.H; ++hh) store(s.dtype, grad_out.data(), t * s.H + hh, grad_value(s, rank, t, hh));
  Dev dgo(grad_out.data(), grad_out.size()), dgy(N * row), dgc(sizeof(float) * in.T * k), dgd(sizeof(float) * in.T * E);
  for (int w = 0; w <= weighted; ++w) {
    SCOPED_TRACE(w ? "weighted combine backward" : "unweighted combine backward");
    std::vector<uint8_t> host_gy(N * row, 0xcd);
    std::vector<float> hgc(in.T * k, -5.0f), hgd(in.T * E, -5.0f);
    bitepCombineBackwardArgs_t b = BITEP_COMBINE_BWD_ARGS_INIT;
    b.grad_out = grad_out.data();
    b.weighted = w;
    b.y = y.data();
    b.grad_y = host_gy.data();
    b.grad_topk_weights = hgc.data();
    b.grad_probs = hgd.data();
    ASSERT_EQ(bitepCombineBackward(hg.g, hh.h, &b, nullptr), bitepSuccess) << bitepGetLastError();
    b.grad_out = dgo.p;
    b.y = dy.p;
    b.grad_y = dgy.p;
    b.grad_topk_weights = static_cast<float*>(dgc.p);
    b.grad_probs = static_cast<float*>(dgd.p);
    ASSERT_EQ(bitepCombineBackward(cg.g, ch.h, &b, bs), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(dgy.get<uint8_t>(N * row), host_gy) << "grad_y, rank " << rank;
    const std::vector<float> cgc = dgc.get<float>(in.T * k), cgd = dgd.get<float>(in.T * E);
    Mismatches mw;
    check_weight_grads(s, W, rank, in, grad_out, w, cgc.data(), cgd.data(), &mw);
    EXPECT_EQ(mw.n, 0) << "weight gradients on rank " << rank << ":" << mw.first;
  }

  // bitepGroupTrimMemory on the cuda group: the handle's blocks, back in the pool once it is destroyed, are
  // freed (cudaFree), the bytes it reports are what bitepGroupMemoryBytes loses, and the same dispatch
  // after it gives the same expert-major rows.
  ASSERT_EQ(bitepHandleDestroy(ch.h), bitepSuccess);
  ch.h = nullptr;
  size_t before = 0, freed = 0, after = 0;
  ASSERT_EQ(bitepGroupMemoryBytes(cg.g, &before), bitepSuccess);
  ASSERT_EQ(bitepGroupTrimMemory(cg.g, &freed), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepGroupMemoryBytes(cg.g, &after), bitepSuccess);
  EXPECT_GT(freed, 0u);
  EXPECT_EQ(after, before - freed);
  HandleGuard ch2;
  ASSERT_EQ(bitepDispatch(cg.g, &ca, bs, &ch2.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t cl2;
  ASSERT_EQ(bitepHandleGetLayout(ch2.h, &cl2), bitepSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cl2.num_expert_rows, N);
  EXPECT_EQ(download<uint8_t>(cl2.expert_x, N * row), cex) << "the dispatch after a trim, rank " << rank;

  // A one-view dispatch's numbering against the host's, bit for bit: row counts, maps, positions, weights, offsets,
  // counts.
  auto expect_host_numbering = [&](const bitepDispatchLayout_t& l, const char* what) {
    ASSERT_EQ(l.num_recv_rows, R) << what;
    ASSERT_EQ(l.num_expert_rows, N) << what;
    EXPECT_EQ(download<uint8_t>(l.recv_map, R * MB), std::vector<uint8_t>(hl.recv_map, hl.recv_map + R * MB)) << what;
    EXPECT_EQ(download<int32_t>(l.recv_expert_rows, R * KL),
              std::vector<int32_t>(hl.recv_expert_rows, hl.recv_expert_rows + R * KL))
        << what;
    if (hl.recv_weights != nullptr)
      EXPECT_EQ(download<float>(l.recv_weights, R * KL), std::vector<float>(hl.recv_weights, hl.recv_weights + R * KL))
          << what;
    EXPECT_EQ(download<int32_t>(l.expert_offsets, L + 1),
              std::vector<int32_t>(hl.expert_offsets, hl.expert_offsets + L + 1))
        << what;
    EXPECT_EQ(download<int32_t>(l.expert_counts, L), std::vector<int32_t>(hl.expert_counts, hl.expert_counts + L))
        << what;
  };

  // Expert-major only: no rank-major rows, the host's positions, maps and expert-major rows bit for bit, and the
  // same combine as with both views, bit for bit.
  bitepDispatchArgs_t co = ca;
  co.expert_major_only = 1;
  HandleGuard ch3;
  ASSERT_EQ(bitepDispatch(cg.g, &co, bs, &ch3.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t cl3;
  ASSERT_EQ(bitepHandleGetLayout(ch3.h, &cl3), bitepSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(cl3.recv_x, nullptr);
  expect_host_numbering(cl3, "expert-major only");
  EXPECT_EQ(download<uint8_t>(cl3.expert_x, N * row), cex) << "expert-major only, rank " << rank;
  cc.out = dout.p;
  ASSERT_EQ(bitepCombine(cg.g, ch3.h, &cc, bs), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(dout.get<uint8_t>(in.T * row), cuda_out) << "combine after an expert-major-only dispatch, rank " << rank;

  // Rank-major only (the even ranks; the odd ones keep both views): no expert-major rows, the host's rows, maps,
  // weights, positions and offsets bit for bit, and the same combines as with both views, bit for bit: of the
  // expert-major y, and of a rank-major y (the received rows, unweighted) against the both-views handle ch2's.
  bitepDispatchArgs_t crm = ca;
  crm.rank_major_only = rank % 2 == 0 || W == 1;
  {
    HandleGuard ch7;
    ASSERT_EQ(bitepDispatch(cg.g, &crm, bs, &ch7.h), bitepSuccess) << bitepGetLastError();
    bitepDispatchLayout_t cl7;
    ASSERT_EQ(bitepHandleGetLayout(ch7.h, &cl7), bitepSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    expect_host_numbering(cl7, "rank-major only");
    if (crm.rank_major_only) {
      EXPECT_EQ(cl7.expert_x, nullptr);
    } else {
      EXPECT_EQ(download<uint8_t>(cl7.expert_x, N * row), cex) << "both views beside rank-major-only ranks";
    }
    EXPECT_EQ(
        download<uint8_t>(cl7.recv_x, R * row),
        std::vector<uint8_t>(static_cast<const uint8_t*>(hl.recv_x), static_cast<const uint8_t*>(hl.recv_x) + R * row))
        << "rank-major only, rank " << rank;
    // The gather index, the cuda handle's against the host handle's, bit for bit.
    const int32_t *csrc = nullptr, *hsrc = nullptr;
    ASSERT_EQ(bitepHandleGetExpertSources(cg.g, ch7.h, bs, &csrc), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(bitepHandleGetExpertSources(hg.g, hh.h, nullptr, &hsrc), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(download<int32_t>(csrc, N), std::vector<int32_t>(hsrc, hsrc + N)) << "expert sources, rank " << rank;
    ASSERT_EQ(bitepCombine(cg.g, ch7.h, &cc, bs), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(dout.get<uint8_t>(in.T * row), cuda_out) << "combine after a rank-major-only dispatch, rank " << rank;
    bitepCombineArgs_t rc = BITEP_COMBINE_ARGS_INIT;
    rc.layout = bitepLayoutRankMajor;
    rc.weighted = 0;
    rc.y = cl2.recv_x;
    rc.out = dout.p;
    ASSERT_EQ(bitepCombine(cg.g, ch2.h, &rc, bs), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::vector<uint8_t> rank_major_both = dout.get<uint8_t>(in.T * row);
    rc.y = cl7.recv_x;
    ASSERT_EQ(cudaMemset(dout.p, 0xff, in.T * row), cudaSuccess);
    ASSERT_EQ(bitepCombine(cg.g, ch7.h, &rc, bs), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(dout.get<uint8_t>(in.T * row), rank_major_both) << "rank-major combine, rank " << rank;
  }

  // Caller-owned receive buffers on the device, each a row longer than needed: the layout points into them,
  // they hold the host's rows bit for bit, and the row past the capacity keeps its poison.
  constexpr int kPoison = 0xab;
  Dev crx((R + 1) * row), cxx((N + 1) * row);
  ASSERT_EQ(cudaMemset(crx.p, kPoison, (R + 1) * row), cudaSuccess);
  ASSERT_EQ(cudaMemset(cxx.p, kPoison, (N + 1) * row), cudaSuccess);
  bitepDispatchArgs_t cb = ca;
  cb.recv_x = crx.p;
  cb.recv_x_capacity = R;
  cb.expert_x = cxx.p;
  cb.expert_x_capacity = N;
  {
    HandleGuard ch4;
    ASSERT_EQ(bitepDispatch(cg.g, &cb, bs, &ch4.h), bitepSuccess) << bitepGetLastError();
    bitepDispatchLayout_t cl4;
    ASSERT_EQ(bitepHandleGetLayout(ch4.h, &cl4), bitepSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(cl4.recv_x, crx.p);
    EXPECT_EQ(cl4.expert_x, cxx.p);
    const std::vector<uint8_t> got_rx = crx.get<uint8_t>((R + 1) * row), got_xx = cxx.get<uint8_t>((N + 1) * row);
    EXPECT_TRUE(std::equal(got_rx.begin(), got_rx.begin() + R * row, static_cast<const uint8_t*>(hl.recv_x)))
        << "caller recv_x, rank " << rank;
    EXPECT_TRUE(std::equal(got_xx.begin(), got_xx.begin() + N * row, cex.begin())) << "caller expert_x, rank " << rank;
    EXPECT_TRUE(std::all_of(got_rx.begin() + R * row, got_rx.end(), [](uint8_t b) { return b == kPoison; }))
        << "recv_x written past its capacity, rank " << rank;
    EXPECT_TRUE(std::all_of(got_xx.begin() + N * row, got_xx.end(), [](uint8_t b) { return b == kPoison; }))
        << "expert_x written past its capacity, rank " << rank;
  }

  // The expert-major capacity one row short on the last rank (when it has expert rows; every rank knows it
  // from the world): that rank fails with bitepCapacityExceeded, the others with bitepRemoteError naming it,
  // nothing reaches its buffer, and the group works on.
  const int victim = W - 1;
  if (expected_receive(s, W, victim, world).N > 0) {
    ASSERT_EQ(cudaMemset(cxx.p, kPoison, (N + 1) * row), cudaSuccess);
    bitepDispatchArgs_t cs = ca;
    if (rank == victim) {
      cs.expert_x = cxx.p;
      cs.expert_x_capacity = N - 1;
    }
    bitepHandle_t h5 = nullptr;
    const bitepResult_t r5 = bitepDispatch(cg.g, &cs, bs, &h5);
    const std::string err = bitepGetLastError();
    EXPECT_EQ(h5, nullptr);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    if (rank == victim) {
      EXPECT_EQ(r5, bitepCapacityExceeded) << err;
      EXPECT_NE(err.find("args->expert_x_capacity"), std::string::npos) << err;
      const std::vector<uint8_t> got = cxx.get<uint8_t>((N + 1) * row);
      EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](uint8_t b) { return b == kPoison; }))
          << "a failed dispatch wrote the caller's expert_x";
    } else {
      EXPECT_EQ(r5, bitepRemoteError) << err;
      EXPECT_NE(err.find("rank " + std::to_string(victim)), std::string::npos) << err;
    }
    HandleGuard ch6;
    ASSERT_EQ(bitepDispatch(cg.g, &ca, bs, &ch6.h), bitepSuccess) << bitepGetLastError();
    bitepDispatchLayout_t cl6;
    ASSERT_EQ(bitepHandleGetLayout(ch6.h, &cl6), bitepSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(download<uint8_t>(cl6.expert_x, N * row), cex) << "the dispatch after a capacity failure, rank " << rank;
  }
  cudaStreamDestroy(stream);
}

// This rank's part of a test on a cuda group over MPI_COMM_WORLD: its GPU, the group (spec s), a stream, and its
// dispatch inputs on the device (args: bitepDispatch's for them). set_up's fatal failures and skip (no GPU per rank)
// are the test's: check HasFatalFailure() / IsSkipped() after it.
struct CudaRank {
  Spec s;
  int device = 0, W = world_size(), rank = world_rank();
  std::vector<Input> world;
  GroupGuard g;
  cudaStream_t stream = nullptr;
  std::unique_ptr<Dev> x, map, topk;
  bitepDispatchArgs_t args = BITEP_DISPATCH_ARGS_INIT;
  CudaRank() = default;
  CudaRank(const CudaRank&) = delete;
  CudaRank& operator=(const CudaRank&) = delete;
  ~CudaRank() {
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
  const Input& in() const { return world[rank]; }
  size_t row() const { return s.H * dsize(s.dtype); }
  bitepStream_t bs() const { return reinterpret_cast<bitepStream_t>(stream); }
  void set_up(double timeout_s) {
    std::string why;
    if (!gpu_per_rank(&device, &why)) GTEST_SKIP() << why;
    ASSERT_EQ(cudaSetDevice(device), cudaSuccess);
    world = make_world(s, W);
    bitepGroupConfig_t c = group_config(s, W, timeout_s);
    c.backend = bitepBackendCuda;
    c.device = device;
    ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g.g), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    const Input& i = in();
    x = std::make_unique<Dev>(i.x.data(), i.x.size());
    map = std::make_unique<Dev>(i.map.data(), i.map.size());
    topk = std::make_unique<Dev>(i.topk.data(), 4 * i.topk.size());
    args = dispatch_args(s, i);
    args.x = i.T ? x->p : nullptr;
    args.routing_map = i.T ? map->p : nullptr;
    args.topk_weights = i.T ? static_cast<const float*>(topk->p) : nullptr;
  }
};

// bitepDispatch and bitepCombine take memory of the group's device. Rank 0's x in host memory, then in another
// GPU's (where every rank sees two): rank 0 fails naming args->x and the rule, its peers with bitepRemoteError naming
// rank 0, no handle is made, and the group works on (the count exchange told every rank). Then every rank's combine
// out in host memory: each rank fails naming args->out and the rule. A cuda group's combine agrees on nothing, so at
// W > 1 that failure leaves each rank's group unusable (collective.h failed_alone): the next call says so; at W = 1
// the group works on, and the combine's out in another GPU's memory is refused too. Last, on every rank: the pool of
// the group, whose failed combine queued nothing with the peers, is trimmed once idle.
void run_wrong_memory() {
  CudaRank cr;
  cr.set_up(test_timeout_s());
  if (testing::Test::HasFatalFailure() || testing::Test::IsSkipped()) return;
  const int W = cr.W, rank = cr.rank;
  const Input& in = cr.in();
  ASSERT_GT(cr.world[0].T, 0);
  bool all_tokens = true;
  for (const Input& q : cr.world) all_tokens = all_tokens && q.T > 0;
  ASSERT_TRUE(all_tokens) << "the combine part needs tokens on every rank (an empty rank checks no out)";
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
  const int other = n > 0 ? (cr.device + 1) % n : 0;
  const size_t row = cr.row();
  void* far = nullptr;  // T rows on the other device: rank 0's x, then every rank's out
  if (n >= 2 && cudaSetDevice(other) == cudaSuccess) {
    if (cudaMalloc(&far, in.T * row) == cudaSuccess)
      cudaMemcpy(far, in.x.data(), in.T * row, cudaMemcpyHostToDevice);
    else
      far = nullptr;
    (void)cudaGetLastError();
  }
  ASSERT_EQ(cudaSetDevice(cr.device), cudaSuccess);
  // Where some rank has no memory on another GPU, no rank tries it (a rank that left alone would hold the others).
  int two = far != nullptr ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &two, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  std::vector<uint8_t> host_rows(in.T * row);
  struct Case {
    const void* ptr;
    std::string rule;
  };
  std::vector<Case> cases = {{host_rows.data(), "is not device memory"}};
  if (two == 1)
    cases.push_back({far, "is memory of CUDA device " + std::to_string(other) + ", but the call runs on device " +
                              std::to_string(cr.device)});
  else if (rank == 0)
    std::printf("[ note     ] a rank sees one CUDA device: another GPU's memory not tried\n");
  for (const Case& cs : cases) {
    bitepDispatchArgs_t bad = cr.args;
    if (rank == 0) bad.x = cs.ptr;
    bitepHandle_t h = nullptr;
    const bitepResult_t r = bitepDispatch(cr.g.g, &bad, cr.bs(), &h);
    const std::string err = bitepGetLastError();
    EXPECT_EQ(h, nullptr);
    if (rank == 0) {
      EXPECT_EQ(r, bitepInvalidArgument) << err;
      EXPECT_NE(err.find("args->x"), std::string::npos) << err;
      EXPECT_NE(err.find(cs.rule), std::string::npos) << err;
    } else {
      EXPECT_EQ(r, bitepRemoteError) << err;
      EXPECT_NE(err.find("rank 0"), std::string::npos) << err;
    }
  }
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(cr.g.g, &cr.args, cr.bs(), &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lay;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lay), bitepSuccess);
  Dev out(in.T * row);
  bitepCombineArgs_t cb = BITEP_COMBINE_ARGS_INIT;
  cb.y = lay.expert_x;
  cb.layout = bitepLayoutExpertMajor;
  cb.weighted = 0;
  for (size_t i = 0; i < (W == 1 ? cases.size() : 1); ++i) {
    bitepCombineArgs_t bad = cb;
    bad.out = const_cast<void*>(cases[i].ptr);
    const bitepResult_t r = bitepCombine(cr.g.g, h.h, &bad, cr.bs());
    const std::string err = bitepGetLastError();
    EXPECT_EQ(r, bitepInvalidArgument) << err;
    EXPECT_NE(err.find("args->out"), std::string::npos) << err;
    EXPECT_NE(err.find(cases[i].rule), std::string::npos) << err;
  }
  cb.out = out.p;
  const bitepResult_t r = bitepCombine(cr.g.g, h.h, &cb, cr.bs());
  const std::string err = bitepGetLastError();
  if (W == 1) {
    EXPECT_EQ(r, bitepSuccess) << err;
  } else {
    EXPECT_EQ(r, bitepInvalidUsage) << err;
    EXPECT_NE(err.find("unusable after this rank failed bitepCombine on its own"), std::string::npos) << err;
    EXPECT_NE(err.find("args->out"), std::string::npos) << err;
  }
  EXPECT_EQ(cudaStreamSynchronize(cr.stream), cudaSuccess);
  // Every rank's failed combine was refused by its checks, before it queued anything with its peers: no peer can write
  // into the pool, so once the dispatch's handle is gone and its work done, the pool is trimmed (and freed at
  // destruction) as a usable group's is (src/ep/group.h pool_if_idle).
  EXPECT_EQ(bitepHandleDestroy(h.h), bitepSuccess) << bitepGetLastError();
  h.h = nullptr;
  EXPECT_EQ(cudaStreamSynchronize(cr.stream), cudaSuccess);
  size_t before = 0, after = 0, freed = 0;
  ASSERT_EQ(bitepGroupMemoryBytes(cr.g.g, &before), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepGroupTrimMemory(cr.g.g, &freed), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepGroupMemoryBytes(cr.g.g, &after), bitepSuccess) << bitepGetLastError();
  EXPECT_GT(freed, 0u) << "rank " << rank << ": the idle pool of a group whose failed call queued nothing was kept";
  EXPECT_EQ(before - after, freed) << "rank " << rank;
  if (far != nullptr) {
    cudaSetDevice(other);
    cudaFree(far);
    cudaSetDevice(cr.device);
  }
}

// One rank fails a combine on its own (rank 0's args->layout out of range) while its peers make theirs: a cuda
// group's combine agrees on nothing, so the peers go on into the transfer and wait for rank 0 there. Rank 0's next
// call must not meet them out of turn: it is refused, naming the group unusable, the combine and its error. The
// peers' next call fails (they time out in the combine's transfer or the next exchange), within a few of the group's
// timeouts, and never succeeds. After that every rank's group refuses calls. At W = 1 the group works on.
void run_combine_failed_alone() {
  const char* blocking = std::getenv("BITEP_NCCL_BLOCKING");
  if (blocking != nullptr && std::string(blocking) == "1" && world_size() > 1)
    GTEST_SKIP() << "BITEP_NCCL_BLOCKING=1: a blocking communicator's collective calls (the window's deregistration "
                    "at teardown) are not polled against the group's timeout, and the peers' communicators are "
                    "aborted here";
  CudaRank cr;
  const double timeout = std::max(3.0, test_timeout_s() / 10);  // 3 s, longer where the tests' timeout is raised
  cr.set_up(timeout);
  if (testing::Test::HasFatalFailure() || testing::Test::IsSkipped()) return;
  const int W = cr.W, rank = cr.rank;
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(cr.g.g, &cr.args, cr.bs(), &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lay;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lay), bitepSuccess);
  Dev out(std::max<int64_t>(cr.in().T, 1) * cr.row());
  bitepCombineArgs_t cb = BITEP_COMBINE_ARGS_INIT;
  cb.y = lay.expert_x;
  cb.layout = bitepLayoutExpertMajor;
  cb.weighted = 0;
  cb.out = out.p;
  if (rank == 0) cb.layout = static_cast<bitepLayout_t>(7);  // refused by its argument checks
  const bitepResult_t rc = bitepCombine(cr.g.g, h.h, &cb, cr.bs());
  const std::string ec = bitepGetLastError();
  if (rank == 0) {
    EXPECT_EQ(rc, bitepInvalidArgument) << ec;
    EXPECT_NE(ec.find("args->layout is 7"), std::string::npos) << ec;
  }
  const auto t0 = std::chrono::steady_clock::now();
  HandleGuard next;
  const bitepResult_t rn = bitepDispatch(cr.g.g, &cr.args, cr.bs(), &next.h);
  const std::string en = bitepGetLastError();
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (W == 1) {
    EXPECT_EQ(rn, bitepSuccess) << en;
  } else if (rank == 0) {
    EXPECT_EQ(rn, bitepInvalidUsage) << en;
    EXPECT_NE(en.find("unusable after this rank failed bitepCombine on its own"), std::string::npos) << en;
    EXPECT_NE(en.find("args->layout is 7"), std::string::npos) << en;
    EXPECT_LT(took, 1.0) << "rank 0's refusal waited";
    EXPECT_EQ(next.h, nullptr);
  } else {
    EXPECT_NE(rn, bitepSuccess) << "rank " << rank << ": a dispatch after rank 0 left the combine succeeded";
    EXPECT_LT(took, 6 * timeout) << en;
    EXPECT_EQ(next.h, nullptr);
  }
  // Every rank's queued work ends before any rank tears its group down: a peer's combine, past its timed-out barrier,
  // still stores into rank 0's window (its communicator aborted, an NCCL path's kernels end).
  const cudaError_t synced = cudaStreamSynchronize(cr.stream);
  (void)cudaGetLastError();
  MPI_Barrier(MPI_COMM_WORLD);
  if (W > 1) {
    HandleGuard again;
    EXPECT_EQ(bitepDispatch(cr.g.g, &cr.args, cr.bs(), &again.h), bitepInvalidUsage) << bitepGetLastError();
    EXPECT_NE(std::string(bitepGetLastError()).find("unusable"), std::string::npos) << bitepGetLastError();
  } else {
    EXPECT_EQ(synced, cudaSuccess);
  }
}
#endif

TEST(EpCuda, MatchesHostBackend) {
#ifdef BITEP_MULTIRANK_CUDA
  Spec s;
  run_against_host(s);
#else
  GTEST_SKIP() << "this bitep was built without CUDA: the cuda backend test needs a CUDA build and one GPU per rank";
#endif
}

TEST(EpCuda, MatchesHostBackendIndicesDenseAligned) {
#ifdef BITEP_MULTIRANK_CUDA
  Spec s;
  s.fmt = bitepMapTopkIndices;
  s.weights = Weights::kDense;
  s.align = 4;
  s.k = 3;
  s.H = 7;
  run_against_host(s);
#else
  GTEST_SKIP() << "this bitep was built without CUDA: the cuda backend test needs a CUDA build and one GPU per rank";
#endif
}

// Every scenario of the host grid (tests/multirank/ep_dispatch_test.cc) on the cuda backend.
class EpCudaGrid : public testing::TestWithParam<Spec> {};

TEST_P(EpCudaGrid, MatchesHostBackend) {
#ifdef BITEP_MULTIRANK_CUDA
  run_against_host(GetParam());
#else
  GTEST_SKIP() << "this bitep was built without CUDA: the cuda backend test needs a CUDA build and one GPU per rank";
#endif
}

TEST(EpCuda, BuffersOfAnotherMemorySpaceRefused) {
#ifdef BITEP_MULTIRANK_CUDA
  run_wrong_memory();
#else
  GTEST_SKIP() << "this bitep was built without CUDA: the cuda backend test needs a CUDA build and one GPU per rank";
#endif
}

TEST(EpCuda, CombineFailedOnOneRankLeavesTheGroupUnusable) {
#ifdef BITEP_MULTIRANK_CUDA
  run_combine_failed_alone();
#else
  GTEST_SKIP() << "this bitep was built without CUDA: the cuda backend test needs a CUDA build and one GPU per rank";
#endif
}

// Named EpCuda/...: device-check's filter EpCuda* picks it with the ones above.
INSTANTIATE_TEST_SUITE_P(EpCuda,
                         EpCudaGrid,
                         testing::ValuesIn(spec_grid()),
                         [](const testing::TestParamInfo<Spec>& info) { return info.param.name; });

}  // namespace
}  // namespace ept
