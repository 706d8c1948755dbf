// SPDX-License-Identifier: Apache-2.0
// Rows to a peer by the copy engine, each chunk followed by its arrival flag (kernels/ep.h launch_ce_chunks):
// the window's rows pass without SM stores over NVLink, so the expert copies beside it keep every SM.
#include <cuda.h>

#include "kernels/ep.h"

namespace bitep::kernels {
namespace {

// cuStreamWriteValue32 and cuStreamWaitValue32 (the same signature) through the runtime's driver entry point
// (bitep does not link libcuda); null where the driver has none.
using StreamValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

StreamValue32 entry(const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    p = nullptr;
  }
  return reinterpret_cast<StreamValue32>(p);
}

StreamValue32 write_value32() {
  static const StreamValue32 fn = entry("cuStreamWriteValue32");
  return fn;
}

StreamValue32 wait_value32() {
  static const StreamValue32 fn = entry("cuStreamWaitValue32");
  return fn;
}

cudaError_t from_driver(CUresult r) {
  switch (r) {
    case CUDA_SUCCESS:
      return cudaSuccess;
    case CUDA_ERROR_NOT_SUPPORTED:
      return cudaErrorNotSupported;
    case CUDA_ERROR_INVALID_VALUE:
      return cudaErrorInvalidValue;
    case CUDA_ERROR_INVALID_HANDLE:
      return cudaErrorInvalidResourceHandle;
    default:
      return cudaErrorUnknown;
  }
}

}  // namespace

bool ce_chunks_available() { return write_value32() != nullptr && wait_value32() != nullptr; }

cudaError_t launch_ce_chunks(const CeChunk* chunks, int n, uint32_t value, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const StreamValue32 write = write_value32(), wait = wait_value32();
  if (write == nullptr || wait == nullptr) return cudaErrorNotSupported;
  for (int i = 0; i < n; ++i) {
    const CeChunk& c = chunks[i];
    if (c.flag == nullptr || (c.bytes > 0 && (c.dst == nullptr || c.src == nullptr))) return cudaErrorInvalidValue;
    if (c.wait != nullptr) {
      const cudaError_t e = from_driver(wait(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(c.wait),
                                             value, CU_STREAM_WAIT_VALUE_GEQ));
      if (e != cudaSuccess) return e;
    }
    if (c.bytes > 0) {
      const cudaError_t e = cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyDeviceToDevice, stream);
      if (e != cudaSuccess) return e;
    }
    const cudaError_t e = from_driver(write(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(c.flag),
                                            value, CU_STREAM_WRITE_VALUE_DEFAULT));
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace bitep::kernels
