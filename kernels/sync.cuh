// SPDX-License-Identifier: Apache-2.0
// Flags between GPUs: release stores and acquire loads at system scope (a peer's window over NVLink), the
// global timer that bounds a wait. Shared by the peer window (comm/nccl_window.cu) and the dispatch's
// arrival flags (kernels/permute.cu raises them, kernels/expert_major.cu waits for them).
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

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace bitep::kernels
