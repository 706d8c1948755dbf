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

}  // namespace
