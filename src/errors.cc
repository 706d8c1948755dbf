// SPDX-License-Identifier: Apache-2.0
// Error codes, the thread-local last-error text, version.
#include <cstdio>
#include <new>
#include <string>

#include "check.h"

#ifdef BITEP_HAVE_MPI
#include <mpi.h>
#endif

namespace bitep {
namespace {
thread_local std::string g_last_error;
}  // namespace

bitepResult_t set_error(bitepResult_t result, const char* file, int line, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  char where[256];
  std::snprintf(where, sizeof(where), " (%s, %s:%d)", bitepGetErrorString(result), base, line);
  g_last_error = std::string(buf) + where;
  return result;
}

void prefix_error(const char* context) {
  if (context == nullptr || g_last_error.rfind(context, 0) == 0) return;
  g_last_error = std::string(context) + ": " + g_last_error;
}

void clear_error() { g_last_error.clear(); }

#ifdef BITEP_HAVE_CUDA
bitepResult_t cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  // cudaGetLastError clears the error unless it is sticky (then the context is lost anyway).
  (void)cudaGetLastError();
  bitepResult_t r = err == cudaErrorMemoryAllocation ? bitepOutOfMemory : bitepCudaError;
  return set_error(r, file, line, "%s failed: %s (%s)", call, cudaGetErrorString(err), cudaGetErrorName(err));
}
#endif

#ifdef BITEP_HAVE_NCCL
bitepResult_t nccl_error(ncclResult_t err, const char* call, const char* file, int line) {
  return set_error(bitepNcclError, file, line, "%s failed: %s", call, ncclGetErrorString(err));
}
#endif

#ifdef BITEP_HAVE_MPI
bitepResult_t mpi_error(int err, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(err, text, &len) != MPI_SUCCESS) std::snprintf(text, sizeof(text), "MPI error %d", err);
  return set_error(bitepMpiError, file, line, "%s failed: %s", call, text);
}
#endif

}  // namespace bitep

extern "C" {

const char* bitepGetErrorString(bitepResult_t result) {
  switch (result) {
    case bitepSuccess:
      return "bitepSuccess: no error";
    case bitepInvalidArgument:
      return "bitepInvalidArgument: an argument breaks a constraint (see bitepGetLastError)";
    case bitepInvalidUsage:
      return "bitepInvalidUsage: call order or handle state is wrong (see bitepGetLastError)";
    case bitepCudaError:
      return "bitepCudaError: a CUDA call failed";
    case bitepNcclError:
      return "bitepNcclError: an NCCL call failed or a peer failed (NCCL_DEBUG=WARN tells more)";
    case bitepMpiError:
      return "bitepMpiError: an MPI call failed";
    case bitepOutOfMemory:
      return "bitepOutOfMemory: an allocation failed";
    case bitepCapacityExceeded:
      return "bitepCapacityExceeded: a caller-provided buffer is too small for the traffic";
    case bitepNotSupported:
      return "bitepNotSupported: this build or device lacks what the call needs";
    case bitepTimeout:
      return "bitepTimeout: a peer did not answer within the group's timeout";
    case bitepRemoteError:
      return "bitepRemoteError: another rank failed the same collective call";
    case bitepInternalError:
      return "bitepInternalError: a bug in bitep, please report bitepGetLastError()";
    default:
      return "unknown bitepResult_t value";
  }
}

const char* bitepGetLastError(void) { return bitep::g_last_error.c_str(); }

bitepResult_t bitepGetVersion(int* version) {
  if (version == nullptr)
    return bitep::set_error(bitepInvalidArgument, __FILE__, __LINE__, "bitepGetVersion: version is NULL");
  *version = BITEP_VERSION_CODE;
  return bitepSuccess;
}

bitepResult_t bitepCudaAvailable(int* available) {
  if (available == nullptr)
    return bitep::set_error(bitepInvalidArgument, __FILE__, __LINE__, "bitepCudaAvailable: available is NULL");
  *available = 0;
#ifdef BITEP_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) *available = 1;
  (void)cudaGetLastError();
#endif
  return bitepSuccess;
}

}  // extern "C"
