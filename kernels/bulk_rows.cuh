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

constexpr int kBulkMaxBufs = 4;  // rows in flight per block
// Per block: kBulkMaxBufs rows, or as many as fit (>= 2), within what the kernel can take (bulk_smem).
constexpr int64_t kBulkSmemBytes = 48 * 1024;

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

// A bulk kernel's shared memory on the current device (bulk_smem): `ring`, the dynamic bytes its ring may
// take, and `fixed`, what each of its blocks takes beside the ring (static shared memory, the per-block
// reservation).
struct BulkSmem {
  int64_t ring = 0;
  int64_t fixed = 0;
};

// Per device, the BulkSmem of one kernel (each launcher keeps its kernel's in a static).
struct BulkSmemCache {
  std::atomic<int> ring[kMaxCachedDevices];
  std::atomic<int> fixed[kMaxCachedDevices];
};

// `kernel`'s BulkSmem, queried once per device into `cache`. The ring takes kBulkSmemBytes, or the device's
// opt-in maximum less the kernel's static shared memory where that is less; the kernel is opted in to it
// (cudaFuncAttributeMaxDynamicSharedMemorySize) where it is past the 48 KiB default less the static size
// (on an H200 the static 128 bytes leave 49024 without opting in, short of four rows of 12 KiB). ring is 1
// (no ring of two rows) where the kernel's binary is older than sm_90.
template <class Kernel>
cudaError_t bulk_smem(Kernel kernel, BulkSmemCache& cache, BulkSmem* out) {
  int ring = 0, fixed = 0;
  cudaError_t err = cached_per_device(
      cache.ring,
      [kernel](int, int* v) {
        *v = 1;
        cudaFuncAttributes attr;
        cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
        if (e != cudaSuccess || attr.binaryVersion < 90) return e;
        int optin = 0;
        if ((e = smem_optin_bytes(&optin)) != cudaSuccess) return e;
        const int static_bytes = static_cast<int>(attr.sharedSizeBytes);
        const int most = static_cast<int>(std::min<int64_t>(kBulkSmemBytes, optin - static_bytes));
        if (most > 48 * 1024 - static_bytes &&
            (e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most)) != cudaSuccess)
          return e;
        *v = std::max(most, 1);
        return cudaSuccess;
      },
      &ring);
  if (err == cudaSuccess)
    err = cached_per_device(
        cache.fixed,
        [kernel](int dev, int* v) {
          *v = 1;
          cudaFuncAttributes attr;
          cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
          int reserved = 0;
          if (e == cudaSuccess) e = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev);
          if (e == cudaSuccess) *v = std::max(1, static_cast<int>(attr.sharedSizeBytes) + reserved);
          return e;
        },
        &fixed);
  out->ring = ring;
  out->fixed = fixed;
  return err;
}

// Rows of row_bytes a block's ring holds: kBulkMaxBufs, or as many as s.ring holds; the bulk copies need >= 2.
inline int bulk_bufs(const BulkSmem& s, int64_t row_bytes) {
  return row_bytes > 0 ? static_cast<int>(std::min<int64_t>(kBulkMaxBufs, s.ring / row_bytes)) : 0;
}

// Blocks per SM that rings of ring_bytes leave room for (each block also takes s.fixed), at most per_sm
// (> 0, else kRowBlocksPerSm).
inline cudaError_t bulk_blocks_per_sm(const BulkSmem& s, int64_t ring_bytes, int per_sm, int64_t* out) {
  int smem_sm = 0;
  const cudaError_t err = smem_per_sm_bytes(&smem_sm);
  const int64_t fit = std::max<int64_t>(1, smem_sm / (ring_bytes + s.fixed));
  *out = std::min<int64_t>(fit, per_sm > 0 ? per_sm : kRowBlocksPerSm);
  return err;
}

// Whether rows of row_bytes can go through the ring of the kernel whose BulkSmem is s: at least two rows in it
// (none where the kernel's binary is older than sm_90).
inline bool bulk_available(const BulkSmem& s, int64_t row_bytes) { return bulk_bufs(s, row_bytes) >= 2; }

}  // namespace
}  // namespace bitep::kernels
