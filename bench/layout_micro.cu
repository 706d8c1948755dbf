// SPDX-License-Identifier: Apache-2.0
// launch_ep_layout alone (bench/NOTES.md, "The layout in one launch"): T tokens, E experts, k = 8, W ranks, uniform
// bitmap routing; the four-launch and the one-launch forms, each timed by events around 50 calls (median, min).
// Usage: layout_micro [T [E [W]]] (default 2048 256 1). The one-launch form runs only where layout_scratch_ints
// allows it (E <= kLayoutOneLaunchMaxExperts). Timing only: the GPU tests check the outputs.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/ep.h"
#include "kernels/ep_params.h"

namespace K = bitep::kernels;
#define CK(x)                                        \
  do {                                               \
    cudaError_t e = (x);                             \
    if (e != cudaSuccess) {                          \
      printf("%s: %s\n", #x, cudaGetErrorString(e)); \
      exit(1);                                       \
    }                                                \
  } while (0)

int main(int argc, char** argv) {
  const int64_t T = argc > 1 ? atoll(argv[1]) : 2048;
  const int E = argc > 2 ? atoi(argv[2]) : 256, W = argc > 3 ? atoi(argv[3]) : 1, k = 8;
  if (T < 1 || E < k || W < 1 || E % W != 0) {
    printf("layout_micro [T [E [W]]]: need T >= 1, E >= %d, W >= 1 dividing E\n", k);
    return 2;
  }
  const int MB = (E + 7) / 8, L = E / W;
  std::vector<uint8_t> map(size_t(T) * MB, 0);
  std::mt19937 rng(1);
  for (int64_t t = 0; t < T; ++t) {
    int n = 0;
    while (n < k) {
      int e = rng() % E;
      uint8_t& b = map[t * MB + e / 8];
      if (!(b & (1 << (e % 8)))) {
        b |= 1 << (e % 8);
        ++n;
      }
    }
  }
  uint8_t* dmap;
  int32_t *counts, *slot, *scratch, *pack;
  CK(cudaMalloc(&dmap, map.size()));
  CK(cudaMemcpy(dmap, map.data(), map.size(), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&counts, 4 * W * (L + 1)));
  CK(cudaMalloc(&slot, 4 * T * W));
  const int row = L + 2 + W;
  CK(cudaMalloc(&pack, 4 * W * row));
  const int64_t sc = K::layout_scratch_ints(T, E, W);
  CK(cudaMalloc(&scratch, 4 * std::max<int64_t>(sc, 1)));
  for (int fused = 0; fused < (sc > 0 ? 2 : 1); ++fused) {
    K::LayoutParams p;
    p.num_tokens = T;
    p.num_experts = E;
    p.topk = k;
    p.num_ranks = W;
    p.routing.format = K::RoutingFormat::kBitmap;
    p.routing.map = dmap;
    p.counts = counts;
    p.token_slot = slot;
    p.pack_out = pack;
    p.pack_row = row;
    p.pack_flags = 0;
    p.scratch = fused ? scratch : nullptr;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> v;
    for (int i = 0; i < 60; ++i) {
      CK(cudaEventRecord(a));
      CK(K::launch_ep_layout(p, nullptr));
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      if (i >= 10) v.push_back(ms * 1000);
    }
    std::sort(v.begin(), v.end());
    printf("T=%lld E=%d W=%d %s: median %.1f us (min %.1f)\n", (long long)T, E, W,
           fused ? "one launch" : "four launches", v[v.size() / 2], v[0]);
  }
  return 0;
}
