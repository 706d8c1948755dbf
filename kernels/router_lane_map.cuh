// SPDX-License-Identifier: Apache-2.0
// The routing map at a lane's octets, for the post-top-k softmax's backward kernels (the kSparse bucket kernel of
// router_backward_bucket.cuh and router_backward_routed.cu): the warp-per-token layout of router_common.cuh, the map
// read a tile ahead of its use. Internal to the kernels.
#pragma once

#include <cstdint>

#include "kernels/router_common.cuh"

namespace bitep::kernels::router_detail {

// A bytemap octet's 8 bytes (one aligned 8-byte load) as its bits: bit b set where byte b is nonzero.
__device__ __forceinline__ uint32_t bytemap_octet_bits(uint2 q) {
  uint32_t rb = 0u;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    rb |= static_cast<uint32_t>(((q.x >> (8 * b)) & 0xffu) != 0) << b;
    rb |= static_cast<uint32_t>(((q.y >> (8 * b)) & 0xffu) != 0) << (b + 4);
  }
  return rb;
}

// A tile's map at a lane's octets, loaded a tile ahead of its use. fetch: a bitmap's octet byte in x; a bytemap's 8
// bytes where they are one aligned load, else the octet's bits in x; nothing for a token past T. bits: the octet's
// routed bits from what fetch loaded (a bitmap's pad bits cleared).
template <int G, int NS>
struct LaneMap {
  const uint8_t* map;
  int64_t num_tokens;
  int num_experts, row_bytes, sl;
  bool bitmap;
  __device__ LaneMap(const RouterBackwardParams& p, int lane)
      : map(p.routing_map),
        num_tokens(p.num_tokens),
        num_experts(p.num_experts),
        row_bytes(p.map_format == MapFormat::kBitmap ? map_bytes_of(p.num_experts) : p.num_experts),
        sl(lane % G),
        bitmap(p.map_format == MapFormat::kBitmap) {}
  __device__ int octet_n(int64_t t, int s) const {
    return t < num_tokens ? min(max(num_experts - (s * G + sl) * 8, 0), 8) : 0;
  }
  __device__ const uint8_t* ptr(int64_t t, int s) const {
    return map + t * row_bytes + (bitmap ? s * G + sl : (s * G + sl) * 8);
  }
  __device__ bool whole8(int64_t t, int s, int n) const {
    return !bitmap && n == 8 && (reinterpret_cast<uintptr_t>(ptr(t, s)) & 7u) == 0;
  }
  __device__ void fetch(int64_t t, uint2* raw) const {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const int n = octet_n(t, s);
      const uint8_t* m = ptr(t, s);
      raw[s] = make_uint2(0u, 0u);
      if (n == 0) continue;
      if (bitmap) {
        raw[s].x = __ldg(m);
      } else if (whole8(t, s, n)) {
        raw[s] = __ldg(reinterpret_cast<const uint2*>(m));
      } else {
#pragma unroll
        for (int b = 0; b < 8; ++b)
          if (b < n) raw[s].x |= static_cast<uint32_t>(__ldg(m + b) != 0) << b;
      }
    }
  }
  __device__ uint32_t bits(int64_t t, int s, uint2 raw) const {
    const int n = octet_n(t, s);
    const uint32_t rb = whole8(t, s, n) ? bytemap_octet_bits(raw) : raw.x;
    return rb & ((1u << n) - 1u);
  }
};

}  // namespace bitep::kernels::router_detail
