// SPDX-License-Identifier: Apache-2.0
// BITEP_LAUNCH_PDL: the router's and the aux loss's kernels launched dependent on the kernel before them (programmatic
// dependent launch) wait for it before they read an input or write an output. Each case runs a producer kernel that
// lets its dependents launch at once, sleeps, then writes the call's input and reads the call's first output back; the
// call, launched dependent on it, must give the outputs of the new input, bit for bit those of a plain launch on it,
// and the producer must have seen that output untouched (the call wrote nothing before the producer ended). A probe
// kernel without the wait, launched the same way, shows that on this device a dependent kernel does start before the
// producer ends (without that, a missing wait could not show). And the stale input gives other outputs than the new
// one, so a call that read it would fail the comparison. Skips, saying why, without a CUDA device or below sm_90.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/device_info.cuh"
#include "kernels/router.h"
#include "tests/gpu/router_gpu_test.h"

namespace {

using namespace router_gpu_test;
using bitep::kernels::launch_maybe_dependent;

constexpr int kProducerBlocks = 8;
constexpr int kProducerThreads = 256;
constexpr unsigned long long kSleepNs = 2000000;  // 2 ms: a dependent launch starts within a few us
constexpr int kControlTries = 5;  // the control's tries: other processes' kernels share the GPU under ctest -j

// Lets its dependents launch, sleeps, copies src to dst (bytes, a multiple of 4), then counts the words of `watch`
// that are not the poison (0xffffffff) into *touched, and adds one to *done for each block that finished.
__global__ void producer(const uint32_t* src,
                         uint32_t* dst,
                         size_t words,
                         const uint32_t* watch,
                         size_t watch_words,
                         unsigned long long* touched,
                         int* done) {
  bitep::kernels::dependents_may_launch();
  if (threadIdx.x == 0) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < kSleepNs);
  }
  __syncthreads();
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (size_t i = first; i < words; i += stride) dst[i] = src[i];
  unsigned long long n = 0;
  for (size_t i = first; i < watch_words; i += stride) n += reinterpret_cast<const volatile uint32_t*>(watch)[i] != ~0u;
  if (n) atomicAdd(touched, n);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(done, 1);
}

// Reads *done, with the wait for the kernel before it (wait = 1) or without.
__global__ void probe(const int* done, int* seen, int wait) {
  if (wait) bitep::kernels::wait_for_prerequisite();
  *seen = *reinterpret_cast<const volatile int*>(done);
}

struct Flags {
  unsigned long long touched = 0;
  int done = 0, seen = 0;
};

class RouterPdl : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_GPU();
    int dev = 0, major = 0;
    CUDA_OK(cudaGetDevice(&dev));
    CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major < 9) GTEST_SKIP() << "sm_" << major << "x: programmatic dependent launch needs sm_90";
    // A non-blocking stream, every copy and poison on it: a stream that synchronises with the legacy default stream
    // (cudaStreamCreate) never let the dependent probe start before the producer ended (H100, CUDA 13.0).
    CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_OK(cudaMalloc(&flags_, sizeof(Flags)));
    // Each kernel's first launch loads it (lazy loading), which held the first dependent probe back until the producer
    // ended (H100, CUDA 13.0): both launched once here.
    CUDA_OK(cudaMemsetAsync(flags_, 0, sizeof(Flags), stream_));
    producer<<<1, 32, 0, stream_>>>(nullptr, nullptr, 0, nullptr, 0, &flags_->touched, &flags_->done);
    probe<<<1, 1, 0, stream_>>>(&flags_->done, &flags_->seen, 0);
    CUDA_OK(cudaStreamSynchronize(stream_));
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
    if (flags_) cudaFree(flags_);
  }

  void upload(const DevBuf& d, const void* src) {
    ASSERT_EQ(cudaMemcpyAsync(d.ptr(), src, d.bytes, cudaMemcpyHostToDevice, stream_), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  }
  void poison(const DevBuf& d) {
    ASSERT_EQ(cudaMemsetAsync(d.base, 0xff, d.offset + d.bytes + kGuard, stream_), cudaSuccess);
  }
  // Every output poisoned (0xff bytes, guards included), then the stream drained.
  void poison_all(const std::vector<const DevBuf*>& outs) {
    for (const DevBuf* o : outs) poison(*o);
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  }
  // Every output's bytes, each output's guard checked.
  static std::vector<std::vector<uint8_t>> download_all(const std::vector<const DevBuf*>& outs) {
    std::vector<std::vector<uint8_t>> got;
    for (const DevBuf* o : outs) {
      got.push_back(o->download<uint8_t>());
      EXPECT_TRUE(o->guard_intact()) << "a write past an output";
    }
    return got;
  }
  Flags read_flags() {
    Flags f;
    EXPECT_EQ(cudaMemcpy(&f, flags_, sizeof(f), cudaMemcpyDeviceToHost), cudaSuccess);
    return f;
  }
  void launch_producer(const DevBuf& fresh, const DevBuf& input, const DevBuf& watch) {
    ASSERT_EQ(cudaMemsetAsync(flags_, 0, sizeof(Flags), stream_), cudaSuccess);
    producer<<<kProducerBlocks, kProducerThreads, 0, stream_>>>(
        static_cast<const uint32_t*>(fresh.ptr()), static_cast<uint32_t*>(input.ptr()), input.bytes / 4,
        static_cast<const uint32_t*>(watch.ptr()), watch.bytes / 4, &flags_->touched, &flags_->done);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  }

  // The control: a probe launched dependent on the producer, without the wait, reads the producer's count of finished
  // blocks before they all finished (in one of kControlTries tries); with the wait, after. Under compute-sanitizer
  // (BITEP_TEST_SANITIZER, set by scripts/device-check.sh), which runs kernels one at a time, no overlap is expected:
  // the case then checks the outputs alone.
  void expect_overlap_shows(const DevBuf& fresh, const DevBuf& input, const DevBuf& watch) {
    int early = 0;
    for (int t = 0; t < kControlTries && early == 0; ++t) {
      ASSERT_NO_FATAL_FAILURE(launch_producer(fresh, input, watch));
      ASSERT_EQ(launch_maybe_dependent(true, probe, dim3(1), dim3(1), 0, stream_, &flags_->done, &flags_->seen, 0),
                cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      early += read_flags().seen < kProducerBlocks;
    }
    const char* san = std::getenv("BITEP_TEST_SANITIZER");
    if (san != nullptr && *san != '\0')
      std::printf("[ INFO     ] under compute-sanitizer %s: the dependent probe started early in %d of %d tries\n", san,
                  early, kControlTries);
    else
      EXPECT_GT(early, 0) << "the probe without the wait started after the producer ended in each of " << kControlTries
                          << " tries: this device does not overlap them, so the test cannot tell";
    ASSERT_NO_FATAL_FAILURE(launch_producer(fresh, input, watch));
    ASSERT_EQ(launch_maybe_dependent(true, probe, dim3(1), dim3(1), 0, stream_, &flags_->done, &flags_->seen, 1),
              cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    EXPECT_EQ(read_flags().seen, kProducerBlocks) << "the probe that waits read the producer's count before it ended";
  }

  // One case: `input` (device) holds `stale`; the call reads it and writes `outs` (outs[0] watched). The call with
  // BITEP_LAUNCH_PDL behind the producer that writes `fresh` into input must match a plain call on `fresh`.
  void run_case(const std::string& what,
                const DevBuf& input,
                const std::vector<uint8_t>& stale,
                const std::vector<uint8_t>& fresh,
                const std::vector<const DevBuf*>& outs,
                const std::function<bitepResult_t(int flags, cudaStream_t s)>& call) {
    SCOPED_TRACE(what);
    ASSERT_EQ(stale.size(), input.bytes);
    ASSERT_EQ(fresh.size(), input.bytes);
    DevBuf fresh_dev(input.bytes);
    ASSERT_NE(fresh_dev.ptr(), nullptr);
    upload(fresh_dev, fresh.data());

    // Plain calls on the stale and on the fresh input.
    upload(input, stale.data());
    poison_all(outs);
    ASSERT_EQ(call(0, stream_), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    const auto from_stale = download_all(outs);
    upload(input, fresh.data());
    poison_all(outs);
    ASSERT_EQ(call(0, stream_), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    const auto want = download_all(outs);
    ASSERT_TRUE(from_stale != want) << "the stale input gives the fresh one's outputs: the case could not tell";

    // The dependent call behind the producer, which writes the fresh input only after its sleep.
    upload(input, stale.data());
    poison_all(outs);
    ASSERT_NO_FATAL_FAILURE(expect_overlap_shows(fresh_dev, input, *outs[0]));
    upload(input, stale.data());
    poison_all(outs);
    ASSERT_NO_FATAL_FAILURE(launch_producer(fresh_dev, input, *outs[0]));
    ASSERT_EQ(call(BITEP_LAUNCH_PDL, stream_), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    const Flags f = read_flags();
    EXPECT_EQ(f.done, kProducerBlocks);
    EXPECT_EQ(f.touched, 0ull) << "the call wrote its first output while the kernel before it ran";
    const auto got = download_all(outs);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_TRUE(got[i] == want[i]) << "output " << i << " differs from the plain launch's on the fresh input"
                                     << (got[i] == from_stale[i] ? " (it is the stale input's)" : "");
  }

  cudaStream_t stream_ = nullptr;
  Flags* flags_ = nullptr;
};

struct FwdCase {
  int E, k;
  bitepScoreFunction_t fn;
  int pre, groups, group_topk;
  bitepDataType_t dt;
  int64_t T;
  bitepMapFormat_t map;
  bool compact, aux;
  int ranks;
  int want_kernel;  // last_router_forward_kernel(): the path this case covers
};

std::string fwd_name(const FwdCase& c) {
  return std::string(c.aux ? "aux scores " : "forward ") + "E=" + std::to_string(c.E) + " k=" + std::to_string(c.k) +
         " fn=" + std::to_string(static_cast<int>(c.fn)) + (c.pre ? " pre" : "") +
         (c.groups ? " groups=" + std::to_string(c.groups) : "") + " " + dt_name(c.dt) + " T=" + std::to_string(c.T) +
         (c.map == bitepMapBitmapU8 ? " bitmap" : " bytemap") + (c.compact ? " compact" : "") +
         (c.ranks ? " W=" + std::to_string(c.ranks) : "");
}

TEST_F(RouterPdl, ForwardWaitsForTheKernelBefore) {
  const FwdCase cases[] = {
      // DeepSeek-V3's staged instance; the post-top-k softmax at 8 lanes a token with the compact outputs and the
      // dispatch layout (its rank counts cleared by a memset between the producer and the kernel); the pre-top-k
      // softmax at E = 130; the generic kernel (E past the buckets); the aux-loss scores.
      {256, 8, bitepScoreSigmoid, 0, 8, 4, bitepBfloat16, 4096, bitepMapBitmapU8, false, false, 0, 4},
      {64, 6, bitepScoreSoftmax, 0, 0, 0, bitepFloat32, 1000, bitepMapBytemap, true, false, 4, 1},
      {130, 4, bitepScoreSoftmax, 1, 0, 0, bitepFloat32, 777, bitepMapBitmapU8, true, false, 0, 2},
      {3000, 4, bitepScoreSoftmax, 0, 0, 0, bitepFloat32, 300, bitepMapBitmapU8, true, false, 0, -1},
      {130, 4, bitepScoreSoftmax, 0, 0, 0, bitepBfloat16, 500, bitepMapBitmapU8, false, true, 0, 0},
  };
  for (const FwdCase& c : cases) {
    bitepRouterConfig_t cfg = make_config(c.E, c.k, c.fn, c.pre, c.dt);
    cfg.num_groups = c.groups, cfg.group_topk = c.group_topk;
    if (c.fn == bitepScoreSigmoid) cfg.scaling_factor = 2.5f;
    const std::vector<uint8_t> stale = make_logits(c.T, c.E, c.dt, 11), fresh = make_logits(c.T, c.E, c.dt, 12);
    const std::vector<float> bias = c.fn == bitepScoreSigmoid ? make_bias(c.E, 13) : std::vector<float>{};
    const size_t TE = static_cast<size_t>(c.T) * c.E;
    DevBuf logits(stale.size()), probs(TE * 4), saved(TE * 4), bias_dev(bias.size() * 4);
    DevBuf map(static_cast<size_t>(c.T) * row_map_bytes(c.map, c.E));
    DevBuf weights(c.compact ? static_cast<size_t>(c.T) * c.k * 4 : 0), indices(weights.bytes);
    DevBuf mask(static_cast<size_t>(c.T) * (c.ranks ? (c.ranks + 7) / 8 : 0)), counts(static_cast<size_t>(c.ranks) * 4);
    if (!bias.empty()) upload(bias_dev, bias.data());
    std::vector<const DevBuf*> outs = {&probs, &map, &saved};
    if (c.compact) outs.push_back(&weights), outs.push_back(&indices);
    if (c.ranks) outs.push_back(&mask), outs.push_back(&counts);
    int kernel = -3;
    auto call = [&](int flags, cudaStream_t s) {
      bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
      a.num_tokens = c.T, a.logits = logits.ptr(), a.probs = static_cast<float*>(probs.ptr());
      a.expert_bias = bias.empty() ? nullptr : static_cast<const float*>(bias_dev.ptr());
      a.routing_map = map.ptr(), a.map_format = c.map, a.saved = static_cast<float*>(saved.ptr());
      if (c.compact) {
        a.topk_weights = static_cast<float*>(weights.ptr());
        a.topk_indices = static_cast<int32_t*>(indices.ptr());
      }
      if (c.ranks) {
        a.num_ranks = c.ranks;
        a.rank_mask = static_cast<uint8_t*>(mask.ptr());
        a.rank_counts = static_cast<int32_t*>(counts.ptr());
      }
      a.launch_flags = flags;
      const bitepResult_t r = c.aux ? bitepAuxScoresForward(bitepBackendCuda, &cfg, &a, s)
                                    : bitepRouterForward(bitepBackendCuda, &cfg, &a, s);
      kernel = bitep::kernels::last_router_forward_kernel();
      return r;
    };
    run_case(fwd_name(c), logits, stale, fresh, outs, call);
    EXPECT_EQ(kernel, c.want_kernel) << fwd_name(c) << ": not the kernel this case covers";
  }
}

TEST_F(RouterPdl, BackwardWaitsForTheKernelBefore) {
  struct BwdCase {
    int E, k;
    bitepDataType_t dt;
    int64_t T;
    bitepMapFormat_t map;
    bool saved;
    int want_kernel;  // last_router_backward_kernel()
  };
  // The post-top-k softmax: the saved mode's warp kernel at E = 64, the recompute's routed-expert kernel at E = 512
  // (bf16), the generic kernel past the buckets.
  const BwdCase cases[] = {
      {64, 6, bitepFloat32, 1000, bitepMapBitmapU8, true, 0},
      {512, 8, bitepBfloat16, 2048, bitepMapBytemap, false, 1},
      {3000, 4, bitepFloat32, 300, bitepMapBitmapU8, true, -1},
  };
  for (const BwdCase& c : cases) {
    const bitepRouterConfig_t cfg = make_config(c.E, c.k, bitepScoreSoftmax, 0, c.dt);
    const std::string what = "backward E=" + std::to_string(c.E) + " " + dt_name(c.dt) + " T=" + std::to_string(c.T) +
                             (c.saved ? " saved" : " recompute");
    const size_t TE = static_cast<size_t>(c.T) * c.E;
    const std::vector<uint8_t> lg = make_logits(c.T, c.E, c.dt, 21);
    DevBuf logits(lg.size()), probs(TE * 4), saved(TE * 4), map(static_cast<size_t>(c.T) * row_map_bytes(c.map, c.E));
    logits.upload(lg.data());
    {
      bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
      a.num_tokens = c.T, a.logits = logits.ptr(), a.probs = static_cast<float*>(probs.ptr());
      a.routing_map = map.ptr(), a.map_format = c.map, a.saved = static_cast<float*>(saved.ptr());
      ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
    std::vector<float> g0(TE), g1(TE);
    for (size_t i = 0; i < TE; ++i) g0[i] = gauss(31, i), g1[i] = gauss(32, i);
    const std::vector<uint8_t> stale = encode(g0, bitepFloat32), fresh = encode(g1, bitepFloat32);
    DevBuf grad_probs(TE * 4), grad_logits(lg.size());
    int kernel = -3;
    auto call = [&](int flags, cudaStream_t s) {
      bitepRouterBackwardArgs_t a = BITEP_ROUTER_BWD_ARGS_INIT;
      a.num_tokens = c.T, a.grad_probs = static_cast<const float*>(grad_probs.ptr());
      a.routing_map = map.ptr(), a.map_format = c.map;
      if (c.saved)
        a.saved = static_cast<const float*>(saved.ptr());
      else
        a.logits = logits.ptr();
      a.grad_logits = grad_logits.ptr();
      a.launch_flags = flags;
      const bitepResult_t r = bitepRouterBackward(bitepBackendCuda, &cfg, &a, s);
      kernel = bitep::kernels::last_router_backward_kernel();
      return r;
    };
    run_case(what, grad_probs, stale, fresh, {&grad_logits}, call);
    EXPECT_EQ(kernel, c.want_kernel) << what << ": not the kernel this case covers";
  }
}

// The producer and the flagged call captured into a CUDA graph (the dependent launch becomes a programmatic edge), the
// graph launched twice, each time from the stale input: the outputs of the fresh input, bit for bit a plain call's,
// and the watched output untouched while the producer ran. Backward too: its kernel behind a captured forward's.
TEST_F(RouterPdl, CapturedInCudaGraph) {
  const int64_t T = 4096;
  const int E = 256, k = 8;
  bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSigmoid, 0, bitepBfloat16);
  cfg.num_groups = 8, cfg.group_topk = 4, cfg.scaling_factor = 2.5f;
  const std::vector<uint8_t> stale = make_logits(T, E, bitepBfloat16, 51), fresh = make_logits(T, E, bitepBfloat16, 52);
  const std::vector<float> bias = make_bias(E, 53);
  const size_t TE = static_cast<size_t>(T) * E;
  DevBuf logits(stale.size()), fresh_dev(fresh.size()), bias_dev(E * 4), probs(TE * 4), saved(TE * 4), map(TE / 8);
  DevBuf grad_probs(TE * 4), grad_logits(stale.size());
  upload(fresh_dev, fresh.data());
  upload(bias_dev, bias.data());
  std::vector<float> g(TE);
  for (size_t i = 0; i < TE; ++i) g[i] = gauss(54, i);
  upload(grad_probs, g.data());
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T, a.logits = logits.ptr(), a.expert_bias = static_cast<const float*>(bias_dev.ptr());
  a.probs = static_cast<float*>(probs.ptr()), a.saved = static_cast<float*>(saved.ptr());
  a.routing_map = map.ptr(), a.map_format = bitepMapBitmapU8;
  bitepRouterBackwardArgs_t b = BITEP_ROUTER_BWD_ARGS_INIT;
  b.num_tokens = T, b.grad_probs = static_cast<const float*>(grad_probs.ptr());
  b.routing_map = map.ptr(), b.map_format = bitepMapBitmapU8, b.saved = static_cast<const float*>(saved.ptr());
  b.grad_logits = grad_logits.ptr();
  const std::vector<const DevBuf*> outs = {&probs, &saved, &map, &grad_logits};
  auto reset = [&] {
    upload(logits, stale.data());
    poison_all(outs);
  };
  // Plain calls on the fresh input: what the graph must give.
  ASSERT_NO_FATAL_FAILURE(reset());
  upload(logits, fresh.data());
  ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &a, stream_), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepRouterBackward(bitepBackendCuda, &cfg, &b, stream_), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const auto want = download_all(outs);

  a.launch_flags = BITEP_LAUNCH_PDL, b.launch_flags = BITEP_LAUNCH_PDL;
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), cudaSuccess);
  launch_producer(fresh_dev, logits, probs);
  const bitepResult_t rf = bitepRouterForward(bitepBackendCuda, &cfg, &a, stream_);
  const bitepResult_t rb = bitepRouterBackward(bitepBackendCuda, &cfg, &b, stream_);
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  ASSERT_EQ(rf, bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(rb, bitepSuccess) << bitepGetLastError();
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int launch = 0; launch < 2; ++launch) {
    SCOPED_TRACE("graph launch " + std::to_string(launch));
    ASSERT_NO_FATAL_FAILURE(reset());
    ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    const Flags f = read_flags();
    EXPECT_EQ(f.done, kProducerBlocks);
    EXPECT_EQ(f.touched, 0ull) << "the forward wrote probs while the producer ran";
    const auto got = download_all(outs);
    for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(got[i] == want[i]) << "output " << i << " differs";
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

TEST_F(RouterPdl, AuxLossWaitsForTheKernelBefore) {
  const int64_t T = 2000;
  const int E = 64;
  std::vector<float> p0(static_cast<size_t>(T) * E), p1(p0.size());
  for (size_t i = 0; i < p0.size(); ++i) p0[i] = 0.5f + 0.25f * gauss(41, i), p1[i] = 0.5f + 0.25f * gauss(42, i);
  std::vector<int32_t> tpe(E);
  for (int e = 0; e < E; ++e) tpe[e] = 10 + (e * 7) % 13;
  DevBuf probs(p0.size() * 4), tpe_dev(E * 4), loss(4), grad_loss(4), grad_probs(p0.size() * 4);
  upload(tpe_dev, tpe.data());
  bitepAuxLossArgs_t a = BITEP_AUX_LOSS_ARGS_INIT;
  a.num_tokens = T, a.num_experts = E, a.topk = 4, a.total_num_tokens = T, a.coeff = 1e-2f;
  a.probs = static_cast<const float*>(probs.ptr()), a.tokens_per_expert = static_cast<const int32_t*>(tpe_dev.ptr());
  a.loss = static_cast<float*>(loss.ptr()), a.grad_probs = static_cast<float*>(grad_probs.ptr());
  a.grad_loss = static_cast<const float*>(grad_loss.ptr());
  run_case("aux loss forward", probs, encode(p0, bitepFloat32), encode(p1, bitepFloat32), {&loss},
           [&](int flags, cudaStream_t s) {
             bitepAuxLossArgs_t b = a;
             b.launch_flags = flags;
             return bitepAuxLossForward(bitepBackendCuda, &b, s);
           });
  const float g0 = 0.75f, g1 = -1.5f;
  std::vector<uint8_t> s0(4), s1(4);
  std::memcpy(s0.data(), &g0, 4), std::memcpy(s1.data(), &g1, 4);
  run_case("aux loss backward", grad_loss, s0, s1, {&grad_probs}, [&](int flags, cudaStream_t s) {
    bitepAuxLossArgs_t b = a;
    b.launch_flags = flags;
    return bitepAuxLossBackward(bitepBackendCuda, &b, s);
  });
}

}  // namespace
