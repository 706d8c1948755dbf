// SPDX-License-Identifier: Apache-2.0
// Rows through shared memory by bulk (TMA) copies, sm_90 and later: one thread per block moves its rows
// through a ring of buffers, each row read once and stored to any number of destinations. Shared by the
// bulk permute (kernels/permute.cu) and the bulk expert copies (kernels/expert_major.cu); in an anonymous
// namespace, so each has its own copy.
#pragma once

#include <algorithm>
#include <atomic>

#include "kernels/ep_common.cuh"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

constexpr int kBulkMaxBufs = 4;                // rows in flight per block
constexpr int64_t kBulkSmemBytes = 48 * 1024;  // per block: kBulkMaxBufs rows, or as many as fit (>= 2)

// One thread's ring of nbuf row buffers in shared memory (sm_90+): row n of the thread's sequence goes into
// buffer n % nbuf by a bulk load that completes on that buffer's mbarrier; its bulk stores form one bulk group.
struct BulkRing {
  uint32_t smem0, bar0, bytes;
  int nbuf;
  __device__ void init() const {
    for (int b = 0; b < nbuf; ++b) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar0 + 8 * b));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __device__ void load(int64_t n, const void* src) const {
    const uint32_t b = static_cast<uint32_t>(n % nbuf);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar0 + 8 * b), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem0 + b * bytes),
                 "l"(src), "r"(bytes), "r"(bar0 + 8 * b)
                 : "memory");
  }
  __device__ void wait(int64_t n) const {
    const uint32_t b = static_cast<uint32_t>(n % nbuf), parity = static_cast<uint32_t>((n / nbuf) & 1);
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                   : "=r"(done)
                   : "r"(bar0 + 8 * b), "r"(parity)
                   : "memory");
  }
  __device__ void store(int64_t n, void* dst) const {
    const uint32_t b = static_cast<uint32_t>(n % nbuf);
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem0 + b * bytes),
                 "r"(bytes)
                 : "memory");
  }
};

// The thread's `mine` rows through the ring: load the first nbuf; then per row wait for it, stores(n) issues
// its bulk stores (one group), done(n) runs after the commit; a buffer is loaded again once the stores of its
// previous row have read it (all groups but the newest). src(n) is row n's source; finish() after the last
// row's stores are complete.
template <class Src, class Stores, class Done, class Finish>
__device__ __forceinline__ void bulk_rows(
    const BulkRing& ring, int64_t mine, Src src, Stores stores, Done done, Finish finish) {
  ring.init();
  for (int64_t n = 0; n < mine && n < ring.nbuf; ++n) ring.load(n, src(n));
  for (int64_t n = 0; n < mine; ++n) {
    ring.wait(n);
    stores(n);
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    done(n);
    if (n >= 1 && n - 1 + ring.nbuf < mine) {
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      ring.load(n - 1 + ring.nbuf, src(n - 1 + ring.nbuf));
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  finish();
}

__device__ __forceinline__ BulkRing make_ring(unsigned char* smem, uint64_t* bar, int64_t row_bytes, int nbuf) {
  return {static_cast<uint32_t>(__cvta_generic_to_shared(smem)), static_cast<uint32_t>(__cvta_generic_to_shared(bar)),
          static_cast<uint32_t>(row_bytes), nbuf};
}

// Blocks per SM that the bulk kernels' rings of ring_bytes leave room for (1 KiB reserved per block), at
// most per_sm (> 0, else kRowBlocksPerSm).
inline cudaError_t bulk_blocks_per_sm(int64_t ring_bytes, int per_sm, int64_t* out) {
  int smem_sm = 0;
  const cudaError_t err = smem_per_sm_bytes(&smem_sm);
  const int64_t fit = std::max<int64_t>(1, smem_sm / (ring_bytes + 1024 + 128));
  *out = std::min<int64_t>(fit, per_sm > 0 ? per_sm : kRowBlocksPerSm);
  return err;
}

// Whether rows of row_bytes can go through `kernel`'s ring on the current device: at least two rows in
// kBulkSmemBytes, and the kernel's binary built for sm_90 or later (its architecture cached per device).
template <class Kernel>
cudaError_t bulk_available(Kernel kernel, int64_t row_bytes, bool* out) {
  *out = false;
  if (row_bytes <= 0 || kBulkSmemBytes / row_bytes < 2) return cudaSuccess;
  static std::atomic<int> cache[kMaxCachedDevices];
  int arch = 0;
  const cudaError_t err = cached_per_device(
      cache,
      [kernel](int, int* v) {
        cudaFuncAttributes attr;
        const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
        *v = e == cudaSuccess && attr.binaryVersion > 0 ? attr.binaryVersion : 1;
        return e;
      },
      &arch);
  *out = err == cudaSuccess && arch >= 90;
  return err;
}

}  // namespace
}  // namespace bitep::kernels
