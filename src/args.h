// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the API entry points: versioned structs, buffer extents, overlap,
// alignment, and whether a pointer lives where the backend needs it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "bitep/bitep.h"
#include "kernels/router_params.h"
#include "src/check.h"

namespace bitep {

// A caller's buffer: name for messages, pointer, extent in bytes, whether bitep writes it.
struct Buffer {
  const char* name;
  const void* ptr;
  uint64_t bytes;
  bool written;
};

// Checks a versioned struct: non-NULL, size exactly what this library was built with (a caller built against another
// version of bitep.h is refused), right magic.
bitepResult_t check_struct(const void* p,
                           size_t size,
                           size_t expected_size,
                           unsigned magic,
                           unsigned expected_magic,
                           const char* name,
                           const char* init_macro);

// `name` is the argument's name in the public API ("config", "args").
#define BITEP_CHECK_STRUCT(ptr, name, type, magic_value, init_macro)                                        \
  BITEP_CHECK(::bitep::check_struct((ptr), (ptr) ? (ptr)->size : 0, sizeof(type), (ptr) ? (ptr)->magic : 0, \
                                    (magic_value), name, init_macro))

// Each buffer with ptr != NULL: aligned to `align` bytes (per buffer), no written buffer overlaps any
// other buffer, and every pointer is accessible to the backend (device memory for cuda, host memory
// for host). cuda: device memory must be `device`'s (-1: the current device's; managed memory passes).
// Buffers of zero bytes are skipped.
bitepResult_t check_buffers(bitepBackend_t backend,
                            const std::vector<Buffer>& buffers,
                            const std::vector<int>& align,
                            int device = -1);

// a * b with overflow detection into `out`; false on overflow.
bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out);

bitepResult_t check_backend(bitepBackend_t backend);
bitepResult_t check_dtype(bitepDataType_t dtype, const char* name);

inline kernels::DType to_kernel_dtype(bitepDataType_t d) {
  return d == bitepBfloat16 ? kernels::DType::kBF16 : d == bitepFloat16 ? kernels::DType::kF16 : kernels::DType::kF32;
}
inline int dtype_size(bitepDataType_t d) { return d == bitepFloat32 ? 4 : 2; }

}  // namespace bitep
