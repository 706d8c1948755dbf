// SPDX-License-Identifier: Apache-2.0
// launch_ep_layout alone (bench/NOTES.md, "The layout in one launch"): T tokens, E experts, k = 8, W ranks, uniform
// bitmap routing; the four-launch and the one-launch forms, each timed by events around 50 calls (median, min), three
// ways (bench/NOTES.md, "The small dispatch's kernels"):
//   warm       the calls back to back (code and data in L2 from the call before);
//   cold       L2 flushed before each call (2x its size written), as ep_bench does before each dispatch;
//   code warm  L2 flushed, then the same launch on a second set of buffers (its code fetched, its data not this
//              call's), then the timed call: near "warm", the cold time is the code's fetch; near "cold", the data's.
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
  // Two sets of buffers: [0] timed, [1] for the code-warm launch before it.
  struct Buffers {
    uint8_t* map;
    int32_t *counts, *slot, *scratch, *pack;
  } buf[2];
  const int row = L + 2 + W;
  const int64_t sc = K::layout_scratch_ints(T, E, W);
  for (Buffers& b : buf) {
    CK(cudaMalloc(&b.map, map.size()));
    CK(cudaMemcpy(b.map, map.data(), map.size(), cudaMemcpyHostToDevice));
    CK(cudaMalloc(&b.counts, 4 * W * (L + 1)));
    CK(cudaMalloc(&b.slot, 4 * T * W));
    CK(cudaMalloc(&b.pack, 4 * W * row));
    CK(cudaMalloc(&b.scratch, 4 * std::max<int64_t>(sc, 1)));
  }
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  void* flush;
  const size_t flush_bytes = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
  CK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  static const char* kModes[] = {"warm", "cold", "code warm"};
  for (int fused = 0; fused < (sc > 0 ? 2 : 1); ++fused) {
    auto params = [&](const Buffers& q) {
      K::LayoutParams p;
      p.num_tokens = T;
      p.num_experts = E;
      p.topk = k;
      p.num_ranks = W;
      p.routing.format = K::RoutingFormat::kBitmap;
      p.routing.map = q.map;
      p.counts = q.counts;
      p.token_slot = q.slot;
      p.pack_out = q.pack;
      p.pack_row = row;
      p.pack_flags = 0;
      p.scratch = fused ? q.scratch : nullptr;
      return p;
    };
    const K::LayoutParams timed = params(buf[0]), other = params(buf[1]);
    for (int mode = 0; mode < 3; ++mode) {
      std::vector<float> v;
      for (int i = 0; i < 60; ++i) {
        if (mode >= 1) CK(cudaMemsetAsync(flush, i & 0xff, flush_bytes));
        if (mode == 2) CK(K::launch_ep_layout(other, nullptr));
        CK(cudaEventRecord(a));
        CK(K::launch_ep_layout(timed, nullptr));
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (i >= 10) v.push_back(ms * 1000);
      }
      std::sort(v.begin(), v.end());
      printf("T=%lld E=%d W=%d %s, %s: median %.1f us (min %.1f)\n", (long long)T, E, W,
             T <= K::kScanSingleRows ? "one block"
             : fused                 ? "one launch"
                                     : "four launches",
             kModes[mode], v[v.size() / 2], v[0]);
    }
  }
  return 0;
}
