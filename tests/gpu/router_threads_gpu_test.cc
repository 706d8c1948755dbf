// SPDX-License-Identifier: Apache-2.0
// The cuda router from several threads at once, each on a stream of its own (bitep.h, "Threads"): the first launches
// of each kernel family race for the launchers' cached occupancy and device attributes, and every output must still
// equal, bit for bit, what the same call gives alone on one stream afterwards (the kernels are deterministic).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bitep/bitep.h"
#include "tests/gpu/router_gpu_test.h"

namespace {

using router_gpu_test::gpu_visible;

// One thread's calls: a config from another kernel family each (E 64 to 2048), bf16 or fp32 logits.
struct Job {
  bitepRouterConfig_t config = BITEP_ROUTER_CONFIG_INIT;
  int64_t tokens = 0;
};

Job make_job(int i) {
  static const int kExperts[] = {64, 130, 256, 512, 1000, 2048};
  static const int kTopk[] = {6, 8, 8, 8, 16, 32};
  Job j;
  j.config.num_experts = kExperts[i];
  j.config.topk = kTopk[i];
  j.config.score_function = i == 2 ? bitepScoreSigmoid : bitepScoreSoftmax;
  j.config.use_pre_softmax = i == 3 ? 1 : 0;
  if (i == 2) {  // DeepSeek-V3's shape
    j.config.num_groups = 8;
    j.config.group_topk = 4;
    j.config.scaling_factor = 2.5f;
  }
  j.config.logits_dtype = i % 2 ? bitepFloat32 : bitepBfloat16;
  j.tokens = 3000 + 17 * i;
  return j;
}

// Device buffers of one job and its outputs copied back after `rounds` forward calls on fresh logits; "" or the
// first failure.
std::string run_job(const Job& j, int rounds, cudaStream_t stream, std::vector<uint8_t>* all) {
  const size_t E = static_cast<size_t>(j.config.num_experts), k = static_cast<size_t>(j.config.topk);
  const size_t T = static_cast<size_t>(j.tokens), esize = j.config.logits_dtype == bitepFloat32 ? 4 : 2;
  const size_t sizes[] = {T * E * esize, T * E * 4, T * ((E + 7) / 8), T * k * 4, T * k * 4, T * E * 4};
  std::vector<void*> d(6, nullptr);
  std::string err;
  for (int b = 0; b < 6 && err.empty(); ++b)
    if (cudaMalloc(&d[b], sizes[b]) != cudaSuccess) err = "cudaMalloc failed";
  std::mt19937 rng(static_cast<uint32_t>(E * 31 + k));
  std::vector<uint8_t> logits(sizes[0]);
  for (int r = 0; r < rounds && err.empty(); ++r) {
    for (size_t i = 0; i < T * E; ++i) {
      const float v = std::normal_distribution<float>(0.0f, 2.0f)(rng);
      if (esize == 4) {
        std::memcpy(&logits[i * 4], &v, 4);
      } else {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        const uint16_t h = static_cast<uint16_t>(u >> 16);  // truncated to bf16: any bits will do
        std::memcpy(&logits[i * 2], &h, 2);
      }
    }
    if (cudaMemcpyAsync(d[0], logits.data(), sizes[0], cudaMemcpyHostToDevice, stream) != cudaSuccess) {
      err = "cudaMemcpyAsync of the logits failed";
      break;
    }
    bitepRouterForwardArgs_t f = BITEP_ROUTER_FWD_ARGS_INIT;
    f.num_tokens = j.tokens;
    f.logits = d[0];
    f.probs = static_cast<float*>(d[1]);
    f.routing_map = d[2];
    f.map_format = bitepMapBitmapU8;
    f.topk_weights = static_cast<float*>(d[3]);
    f.topk_indices = static_cast<int32_t*>(d[4]);
    f.saved = static_cast<float*>(d[5]);
    const bitepResult_t res = bitepRouterForward(bitepBackendCuda, &j.config, &f, stream);
    if (res != bitepSuccess) {
      err = std::string("bitepRouterForward: ") + bitepGetLastError();
      break;
    }
    for (int b = 1; b < 6; ++b) {
      const size_t at = all->size();
      all->resize(at + sizes[b]);
      if (cudaMemcpyAsync(all->data() + at, d[b], sizes[b], cudaMemcpyDeviceToHost, stream) != cudaSuccess)
        err = "cudaMemcpyAsync of an output failed";
    }
    if (cudaStreamSynchronize(stream) != cudaSuccess) err = cudaGetErrorString(cudaGetLastError());
  }
  for (void* p : d)
    if (p != nullptr) cudaFree(p);
  return err;
}

TEST(RouterGpuThreads, StreamsOfManyThreadsGiveWhatOneStreamGives) {
  std::string why;
  if (!gpu_visible(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  constexpr int kThreads = 6, kRounds = 3;
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  std::vector<std::vector<uint8_t>> concurrent(kThreads), alone(kThreads);
  std::vector<std::string> errors(kThreads);
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      cudaSetDevice(device);
      cudaStream_t s = nullptr;
      cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      errors[i] = run_job(make_job(i), kRounds, s, &concurrent[i]);
      cudaStreamDestroy(s);
    });
  for (std::thread& t : threads) t.join();
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
  for (int i = 0; i < kThreads; ++i) {
    EXPECT_EQ(errors[i], "") << "job " << i << " on its thread";
    EXPECT_EQ(run_job(make_job(i), kRounds, s, &alone[i]), "") << "job " << i << " alone";
    ASSERT_EQ(concurrent[i].size(), alone[i].size()) << "job " << i;
    EXPECT_TRUE(!alone[i].empty() && std::memcmp(concurrent[i].data(), alone[i].data(), alone[i].size()) == 0)
        << "job " << i << " (E = " << make_job(i).config.num_experts
        << "): outputs from its own thread differ from the same calls alone";
  }
  cudaStreamDestroy(s);
}

// Two backward calls that take one kernel with different dynamic shared memory (E = 1024: the sigmoid router's
// backward from the saved tensor with a bytemap stages more than the aux scores' backward), each from a thread of its
// own, many times at once. The kernel's shared memory limit is an attribute of the kernel: a launcher that set it to
// its own need made the other thread's launch fail when the set fell between that thread's set and its launch
// (kernels/device_info.cuh raise_dynamic_smem). Every call must succeed and give the bits it gives alone.
TEST(RouterGpuThreads, BackwardsOfOneKernelWithDifferentSharedMemory) {
  std::string why;
  if (!gpu_visible(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  constexpr int64_t T = 2048;
  constexpr int E = 1024, kCalls = 200;
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = E;
  cfg.topk = 8;
  cfg.score_function = bitepScoreSigmoid;
  cfg.logits_dtype = bitepFloat32;
  const size_t n = static_cast<size_t>(T) * E;
  std::vector<float> logits(n), grad(n);
  std::mt19937 rng(7);
  for (float& v : logits) v = std::normal_distribution<float>(0.0f, 2.0f)(rng);
  for (float& v : grad) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
  // [logits, grad, router probs, router saved, bytemap, aux probs, aux saved, grad out A, grad out B]
  std::vector<void*> d(9, nullptr);
  const size_t bytes[] = {4 * n, 4 * n, 4 * n, 4 * n, n, 4 * n, 4 * n, 4 * n, 4 * n};
  for (int b = 0; b < 9; ++b) ASSERT_EQ(cudaMalloc(&d[b], bytes[b]), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d[0], logits.data(), 4 * n, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d[1], grad.data(), 4 * n, cudaMemcpyHostToDevice), cudaSuccess);
  bitepRouterForwardArgs_t f = BITEP_ROUTER_FWD_ARGS_INIT;
  f.num_tokens = T;
  f.logits = d[0];
  f.probs = static_cast<float*>(d[2]);
  f.saved = static_cast<float*>(d[3]);
  f.routing_map = d[4];
  f.map_format = bitepMapBytemap;
  ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &f, nullptr), bitepSuccess) << bitepGetLastError();
  bitepRouterForwardArgs_t fa = BITEP_ROUTER_FWD_ARGS_INIT;
  fa.num_tokens = T;
  fa.logits = d[0];
  fa.probs = static_cast<float*>(d[5]);
  fa.saved = static_cast<float*>(d[6]);
  ASSERT_EQ(bitepAuxScoresForward(bitepBackendCuda, &cfg, &fa, nullptr), bitepSuccess) << bitepGetLastError();
  bitepRouterBackwardArgs_t ba = BITEP_ROUTER_BWD_ARGS_INIT;  // the router's: saved tensor and bytemap
  ba.num_tokens = T;
  ba.grad_probs = static_cast<const float*>(d[1]);
  ba.routing_map = d[4];
  ba.map_format = bitepMapBytemap;
  ba.saved = static_cast<const float*>(d[3]);
  ba.grad_logits = d[7];
  bitepRouterBackwardArgs_t bb = BITEP_ROUTER_BWD_ARGS_INIT;  // the aux scores': saved tensor, no map
  bb.num_tokens = T;
  bb.grad_probs = static_cast<const float*>(d[1]);
  bb.saved = static_cast<const float*>(d[6]);
  bb.grad_logits = d[8];
  auto call = [&](int which, cudaStream_t s) {
    return which == 0 ? bitepRouterBackward(bitepBackendCuda, &cfg, &ba, s)
                      : bitepAuxScoresBackward(bitepBackendCuda, &cfg, &bb, s);
  };
  std::vector<std::vector<uint8_t>> want(2, std::vector<uint8_t>(4 * n)), got = want;
  for (int w = 0; w < 2; ++w) {
    ASSERT_EQ(call(w, nullptr), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(cudaMemcpy(want[w].data(), d[7 + w], 4 * n, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  std::vector<std::string> errors(2);
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < 2; ++w)
    threads.emplace_back([&, w] {
      cudaSetDevice(device);
      cudaStream_t s = nullptr;
      cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
      ready.fetch_add(1);
      while (ready.load() < 2) std::this_thread::yield();
      for (int i = 0; i < kCalls && errors[w].empty(); ++i)
        if (call(w, s) != bitepSuccess) errors[w] = "call " + std::to_string(i) + ": " + bitepGetLastError();
      if (cudaStreamSynchronize(s) != cudaSuccess && errors[w].empty()) errors[w] = "the stream failed";
      cudaStreamDestroy(s);
    });
  for (std::thread& t : threads) t.join();
  for (int w = 0; w < 2; ++w) {
    EXPECT_EQ(errors[w], "") << (w == 0 ? "bitepRouterBackward" : "bitepAuxScoresBackward");
    ASSERT_EQ(cudaMemcpy(got[w].data(), d[7 + w], 4 * n, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_TRUE(got[w] == want[w]) << (w == 0 ? "bitepRouterBackward" : "bitepAuxScoresBackward")
                                   << ": the gradient from its thread differs from the call alone";
  }
  for (void* p : d) cudaFree(p);
}

}  // namespace
