// SPDX-License-Identifier: Apache-2.0
// Flags between GPUs: release stores and acquire loads at system scope (a peer's window over NVLink), the
// global timer that bounds a wait. Shared by the peer window (comm/nccl_window.cu) and the dispatch's arrival
// flags (kernels/permute.cu raises them, kernels/expert_major.cu waits for them). And flags between the blocks
// of one grid, at device scope (the one-launch expert positions).
#pragma once

#include <cstdint>

namespace bitep::kernels {

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Between the blocks of one grid (device scope): a flag raised after the block's stores, and the wait for it.
__device__ __forceinline__ void store_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int load_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The block waits until flags [0, n) are all raised (nonzero): its first warp polls them, 32 a load, with a
// short pause between polls. A block-wide barrier: every thread of the block calls it.
__device__ __forceinline__ void wait_raised(const int* flags, int n) {
  if (threadIdx.x < 32) {
    const unsigned lane = threadIdx.x;
    for (int j0 = 0; j0 < n; j0 += 32) {
      const int j = j0 + static_cast<int>(lane);
      bool up = j >= n || load_acquire_gpu(flags + j) != 0;
      while (!__all_sync(0xffffffffu, up)) {
        __nanosleep(128);
        if (!up) up = load_acquire_gpu(flags + j) != 0;
      }
    }
  }
  __syncthreads();
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace bitep::kernels
