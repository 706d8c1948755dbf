// SPDX-License-Identifier: Apache-2.0
// Internal error handling: every failure sets the thread's last-error text (what failed, where, why)
// and returns a bitepResult_t. Nothing here exits or aborts.
#pragma once

#include <cstdarg>
#include <exception>
#include <new>
#include <string>
#include <utility>

#include "bitep/bitep.h"

namespace bitep {

// Sets the calling thread's last-error text (printf-style) and returns `result`.
bitepResult_t set_error(bitepResult_t result, const char* file, int line, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

// Prepends context ("bitepDispatch: ") to the current last-error text.
void prefix_error(const char* context);

// Clears the calling thread's last-error text.
void clear_error();

}  // namespace bitep

// Fails with bitepInvalidArgument unless `cond`; the message names the argument and the constraint.
#define BITEP_ARG_CHECK(cond, ...)                                                                 \
  do {                                                                                             \
    if (!(cond)) return ::bitep::set_error(bitepInvalidArgument, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

#define BITEP_FAIL(result, ...) return ::bitep::set_error((result), __FILE__, __LINE__, __VA_ARGS__)

// Propagates a failing bitepResult_t (the callee already set the detail).
#define BITEP_CHECK(cmd)                               \
  do {                                                 \
    bitepResult_t bitep_res_ = (cmd);                  \
    if (bitep_res_ != bitepSuccess) return bitep_res_; \
  } while (0)

#define BITEP_CHECK_GOTO(cmd, res, label)  \
  do {                                     \
    (res) = (cmd);                         \
    if ((res) != bitepSuccess) goto label; \
  } while (0)

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
namespace bitep {
// Maps a CUDA error, clears the sticky error state where it can be cleared, records the detail.
bitepResult_t cuda_error(cudaError_t err, const char* call, const char* file, int line);
}  // namespace bitep
#define BITEP_CUDA_CHECK(cmd)                                                                        \
  do {                                                                                               \
    cudaError_t bitep_err_ = (cmd);                                                                  \
    if (bitep_err_ != cudaSuccess) return ::bitep::cuda_error(bitep_err_, #cmd, __FILE__, __LINE__); \
  } while (0)
#define BITEP_CUDA_CHECK_GOTO(cmd, res, label)                           \
  do {                                                                   \
    cudaError_t bitep_err_ = (cmd);                                      \
    if (bitep_err_ != cudaSuccess) {                                     \
      (res) = ::bitep::cuda_error(bitep_err_, #cmd, __FILE__, __LINE__); \
      goto label;                                                        \
    }                                                                    \
  } while (0)
#endif

#ifdef BITEP_HAVE_NCCL
#include <nccl.h>
namespace bitep {
bitepResult_t nccl_error(ncclResult_t err, const char* call, const char* file, int line);
}  // namespace bitep
#define BITEP_NCCL_CHECK(cmd)                                           \
  do {                                                                  \
    ncclResult_t bitep_err_ = (cmd);                                    \
    if (bitep_err_ != ncclSuccess && bitep_err_ != ncclInProgress)      \
      return ::bitep::nccl_error(bitep_err_, #cmd, __FILE__, __LINE__); \
  } while (0)
#endif

#ifdef BITEP_HAVE_MPI
namespace bitep {
bitepResult_t mpi_error(int err, const char* call, const char* file, int line);
}  // namespace bitep
#define BITEP_MPI_CHECK(cmd)                                                                                \
  do {                                                                                                      \
    int bitep_err_ = (cmd);                                                                                 \
    if (bitep_err_ != 0 /* MPI_SUCCESS */) return ::bitep::mpi_error(bitep_err_, #cmd, __FILE__, __LINE__); \
  } while (0)
#endif

namespace bitep {
// Runs `body` (a lambda returning bitepResult_t) and turns an escaping C++ exception into the error it stands for
// (std::bad_alloc: bitepOutOfMemory), so that a caller can still act on the failure (collective.h failed_alone).
template <typename F>
bitepResult_t catch_all(F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return set_error(bitepOutOfMemory, __FILE__, __LINE__, "host allocation failed");
  } catch (const std::exception& e) {
    return set_error(bitepInternalError, __FILE__, __LINE__, "unexpected exception: %s", e.what());
  } catch (...) {
    return set_error(bitepInternalError, __FILE__, __LINE__, "unexpected exception");
  }
}

// An API call's body through catch_all, its error detail prefixed with the call: no exception crosses the C boundary.
template <typename F>
bitepResult_t guard(const char* api, F&& body) noexcept {
  const bitepResult_t r = catch_all(std::forward<F>(body));
  if (r != bitepSuccess) prefix_error(api);
  return r;
}
}  // namespace bitep
