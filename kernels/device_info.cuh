// SPDX-License-Identifier: Apache-2.0
// Host-side device facts the launchers size their grids from, queried once per device and cached
// (launchers run on hot paths: no cudaGetDeviceProperties per call).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace bitep::kernels {

constexpr int kMaxCachedDevices = 64;

// Per-device cache of one positive int: returns the cached value, or computes it with `query(dev, &v)`
// (a cudaError_t-returning callable), stores it and returns it. Devices past kMaxCachedDevices are not cached.
template <typename Query>
inline cudaError_t cached_per_device(std::atomic<int> (&cache)[kMaxCachedDevices], Query query, int* out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cacheable = dev >= 0 && dev < kMaxCachedDevices;
  if (cacheable) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) {
      *out = c;
      return cudaSuccess;
    }
  }
  int v = 0;
  err = query(dev, &v);
  if (err != cudaSuccess) return err;
  if (cacheable) cache[dev].store(v, std::memory_order_relaxed);
  *out = v;
  return cudaSuccess;
}

// An attribute of the current device, cached per device in `cache`, at least `floor`.
inline cudaError_t cached_attribute(std::atomic<int> (&cache)[kMaxCachedDevices],
                                    cudaDeviceAttr attr,
                                    int floor,
                                    int* out) {
  return cached_per_device(
      cache,
      [attr, floor](int dev, int* v) {
        const cudaError_t e = cudaDeviceGetAttribute(v, attr, dev);
        if (*v < floor) *v = floor;
        return e;
      },
      out);
}

// Number of SMs of the current device (at least 1).
inline cudaError_t sm_count(int* out) {
  static std::atomic<int> cache[kMaxCachedDevices];
  return cached_attribute(cache, cudaDevAttrMultiProcessorCount, 1, out);
}

// Largest dynamic shared memory a block may opt in to on the current device (at least 48 KiB).
inline cudaError_t smem_optin_bytes(int* out) {
  static std::atomic<int> cache[kMaxCachedDevices];
  return cached_attribute(cache, cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024, out);
}

// Shared memory of one SM (at least 48 KiB).
inline cudaError_t smem_per_sm_bytes(int* out) {
  static std::atomic<int> cache[kMaxCachedDevices];
  return cached_attribute(cache, cudaDevAttrMaxSharedMemoryPerMultiprocessor, 48 * 1024, out);
}

// Dynamic shared memory `kernel` may take on the current device without opting in: the 48 KiB default less
// its static shared memory (cudaFuncAttributes::sharedSizeBytes). Cached per device in `cache`.
template <class Kernel>
cudaError_t default_dynamic_smem(Kernel kernel, std::atomic<int> (&cache)[kMaxCachedDevices], int* out) {
  return cached_per_device(
      cache,
      [kernel](int, int* v) {
        cudaFuncAttributes attr;
        const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
        *v = e == cudaSuccess ? 48 * 1024 - static_cast<int>(attr.sharedSizeBytes) : 0;
        return e;
      },
      out);
}

// Lets `kernel` take `smem` bytes of dynamic shared memory on the current device: raises its
// cudaFuncAttributeMaxDynamicSharedMemorySize to smem where it is lower, never lowers it. The attribute is the
// kernel's, not the launch's: a call on another thread that set a lower value between this one's set and its launch
// would make this launch fail (the router calls may run on any number of threads at once), so the value only grows,
// under one lock. cudaErrorInvalidValue where smem and the static shared memory pass the device's opt-in maximum.
inline cudaError_t raise_dynamic_smem(const void* kernel, size_t smem) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> raised;  // (kernel, device) -> the value set
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  size_t& now = raised[{kernel, device}];
  if (smem <= now) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess) now = smem;
  return err;
}

// Lets `kernel` take `smem` bytes of dynamic shared memory: where that is past default_dynamic_smem (cached in
// `cache`), raises its limit (raise_dynamic_smem).
template <class Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, std::atomic<int> (&cache)[kMaxCachedDevices], size_t smem) {
  int fits = 0;
  const cudaError_t err = default_dynamic_smem(kernel, cache, &fits);
  if (err != cudaSuccess || smem <= static_cast<size_t>(fits)) return err;
  return raise_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
}

// Compute capability major of the current device (0 when unknown).
inline cudaError_t cc_major(int* out) {
  static std::atomic<int> cache[kMaxCachedDevices];
  return cached_attribute(cache, cudaDevAttrComputeCapabilityMajor, 0, out);
}

// Programmatic dependent launch (sm_90+): a kernel launched with launch_dependent() may start while the
// kernel before it on the stream runs, once that one triggers (dependents_may_launch()) or ends;
// wait_for_prerequisite() then waits for it to complete with its memory visible. Both are no-ops below sm_90
// and in a kernel launched without the attribute.
__device__ __forceinline__ void wait_for_prerequisite() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void dependents_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The first step of a kernel that launch_maybe_dependent() may launch dependent: wait for the kernel before it, then
// let the kernel after it launch (which, launched dependent too, waits in turn for this one to end before it reads).
__device__ __forceinline__ void dependent_start() {
  wait_for_prerequisite();
  dependents_may_launch();
}
// The launch attribute of a dependent launch (programmatic stream serialization), for cudaLaunchKernelEx.
inline cudaLaunchAttribute dependent_launch_attribute() {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return attr;
}
// A launch on `stream`: dependent on the kernel before it (programmatic stream serialization) when `dependent` and the
// device is sm_90+, else a plain launch. A kernel launched dependent calls wait_for_prerequisite() before it reads or
// writes any memory the kernel before it may touch.
template <class... KernelArgs, class... Args>
cudaError_t launch_maybe_dependent(bool dependent,
                                   void (*kernel)(KernelArgs...),
                                   dim3 grid,
                                   dim3 block,
                                   size_t smem,
                                   cudaStream_t stream,
                                   Args&&... args) {
  int major = 0;
  if (dependent) {
    const cudaError_t err = cc_major(&major);
    if (err != cudaSuccess) return err;
  }
  if (major < 9) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = stream;
  cudaLaunchAttribute attr[1] = {dependent_launch_attribute()};
  cfg.attrs = attr, cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
template <class... KernelArgs, class... Args>
cudaError_t launch_dependent(
    void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  return launch_maybe_dependent(true, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

// Persistent grid: enough blocks for `work` units of `per_block` each, at most sms * per_sm, at least 1.
inline unsigned persistent_grid(int64_t work, int per_block, int sms, int per_sm) {
  const int64_t need = (work + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  const int64_t g = need < cap ? need : cap;
  return static_cast<unsigned>(g > 0 ? g : 1);
}

}  // namespace bitep::kernels
