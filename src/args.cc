// SPDX-License-Identifier: Apache-2.0
#include "src/args.h"

#include "src/capture.h"
#include "src/check.h"

namespace bitep {

bitepResult_t check_struct(const void* p,
                           size_t size,
                           size_t expected_size,
                           unsigned magic,
                           unsigned expected_magic,
                           const char* name,
                           const char* init_macro) {
  BITEP_ARG_CHECK(p != nullptr, "%s is NULL", name);
  BITEP_ARG_CHECK(magic == expected_magic, "%s->magic is 0x%x, expected 0x%x: initialise the struct with %s", name,
                  magic, expected_magic, init_macro);
  BITEP_ARG_CHECK(size == expected_size,
                  "%s->size is %zu, this library's struct has %zu bytes: initialise it with %s and rebuild against "
                  "this bitep.h",
                  name, size, expected_size, init_macro);
  return bitepSuccess;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > UINT64_MAX / a) return true;
  *out = a * b;
  return false;
}

bitepResult_t check_backend(bitepBackend_t backend) {
  BITEP_ARG_CHECK(backend == bitepBackendHost || backend == bitepBackendCuda,
                  "backend is %d, expected bitepBackendHost (0) or bitepBackendCuda (1)", static_cast<int>(backend));
#ifndef BITEP_HAVE_CUDA
  if (backend == bitepBackendCuda)
    BITEP_FAIL(bitepNotSupported, "backend is bitepBackendCuda but this bitep was built without CUDA");
#endif
  return bitepSuccess;
}

bitepResult_t check_dtype(bitepDataType_t dtype, const char* name) {
  BITEP_ARG_CHECK(dtype == bitepFloat32 || dtype == bitepBfloat16 || dtype == bitepFloat16,
                  "%s is %d, expected bitepFloat32 (0), bitepBfloat16 (1) or bitepFloat16 (2)", name,
                  static_cast<int>(dtype));
  return bitepSuccess;
}

bitepResult_t check_buffers(bitepBackend_t backend,
                            const std::vector<Buffer>& buffers,
                            const std::vector<int>& align,
                            int device) {
  // The pointer queries would invalidate a capture in global mode that the caller's stream may be in (a router
  // or a low-latency call captured into a CUDA graph): they are not part of it.
  RelaxedCaptureMode relaxed;
#ifndef BITEP_HAVE_CUDA
  (void)device;
#endif
  for (size_t i = 0; i < buffers.size(); ++i) {
    const Buffer& b = buffers[i];
    if (b.ptr == nullptr || b.bytes == 0) continue;
    const auto addr = reinterpret_cast<uintptr_t>(b.ptr);
    BITEP_ARG_CHECK(addr % align[i] == 0, "%s (%p) is not aligned to %d bytes, its element size", b.name, b.ptr,
                    align[i]);
#ifdef BITEP_HAVE_CUDA
    cudaPointerAttributes attr{};
    cudaError_t err = cudaPointerGetAttributes(&attr, b.ptr);
    (void)cudaGetLastError();
    const bool on_device =
        err == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged);
    const bool host_ok = err != cudaSuccess || attr.type != cudaMemoryTypeDevice;
    if (backend == bitepBackendCuda) {
      BITEP_ARG_CHECK(on_device, "%s (%p) is not device memory: the cuda backend takes device pointers", b.name, b.ptr);
      // Another GPU's memory faults the kernel, or crosses the link on every access where peer access is on. (The
      // current device is asked for only here: a machine without one fails the checks above, naming the buffer.)
      if (attr.type == cudaMemoryTypeDevice && device < 0 && cudaGetDevice(&device) != cudaSuccess) {
        (void)cudaGetLastError();
        device = attr.device;
      }
      BITEP_ARG_CHECK(attr.type != cudaMemoryTypeDevice || attr.device == device,
                      "%s (%p) is memory of CUDA device %d, but the call runs on device %d: pass that device's memory",
                      b.name, b.ptr, attr.device, device);
    } else {
      BITEP_ARG_CHECK(host_ok, "%s (%p) is device memory: the host backend takes host pointers", b.name, b.ptr);
    }
#else
    (void)backend;
#endif
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    const Buffer& a = buffers[i];
    if (a.ptr == nullptr || a.bytes == 0) continue;
    for (size_t j = i + 1; j < buffers.size(); ++j) {
      const Buffer& b = buffers[j];
      if (b.ptr == nullptr || b.bytes == 0 || !(a.written || b.written)) continue;
      const auto a0 = reinterpret_cast<uintptr_t>(a.ptr), b0 = reinterpret_cast<uintptr_t>(b.ptr);
      if (a0 < b0 + b.bytes && b0 < a0 + a.bytes) {
        const Buffer& w = a.written ? a : b;
        const Buffer& o = a.written ? b : a;
        BITEP_FAIL(bitepInvalidArgument, "%s overlaps %s: an output must not overlap any other buffer", w.name, o.name);
      }
    }
  }
  return bitepSuccess;
}

}  // namespace bitep
