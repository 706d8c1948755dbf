// SPDX-License-Identifier: Apache-2.0
// The baseline EP pipeline of ep_bench: what stacks built on top-k indices do, in plain CUDA + NCCL.
//   dispatch: [T, k] indices -> conversion kernel -> BYTEMAP [T, E] -> per-expert column scan (slot of each
//             token in each expert) -> per-expert permute (a token is copied once per expert, no per-rank
//             dedup) -> count exchange ([W, L] counts, host sync) -> all-to-all of the rows -> expert-major
//             sort (received [source][expert] chunks reordered to [expert][source]).
//   combine:  expert-major rows -> inverse sort -> all-to-all back -> per token, sum over its k rows of
//             weight x row (fp32, one rounding).
// Buffers grow on first use and are reused; the self chunk is a local copy (never through NCCL).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <vector>

namespace baseline {

class Pipeline {
 public:
  Pipeline(ncclComm_t comm, int nranks, int rank, int num_experts, int topk, int hidden, cudaStream_t stream);
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // indices [T, k] int32 (distinct experts), x [T, H] bf16, device memory. Returns false on a CUDA / NCCL
  // error (message in error()).
  bool dispatch(const int32_t* indices, const __nv_bfloat16* x, int64_t num_tokens);
  // y [num_expert_rows, H] expert-major (one row per received row, same order as expert_x()), weights
  // [T, k] fp32 in index order; out [T, H] bf16. Uses the last dispatch's indices (still valid).
  bool combine(const __nv_bfloat16* y, const float* weights, __nv_bfloat16* out);

  const __nv_bfloat16* expert_x() const { return expert_x_; }
  int64_t num_expert_rows() const { return recv_rows_; }
  // Bytes this rank sent to other ranks in the last dispatch (rows x H x 2).
  int64_t cross_bytes() const { return cross_bytes_; }
  const char* error() const { return error_; }

 private:
  bool ensure(void** p, size_t* cap, size_t bytes);
  bool check(cudaError_t e, const char* what);
  bool check(ncclResult_t r, const char* what);
  bool exchange_rows(const __nv_bfloat16* send,
                     const std::vector<int64_t>& send_off,
                     const std::vector<int64_t>& send_cnt,
                     __nv_bfloat16* recv,
                     const std::vector<int64_t>& recv_off,
                     const std::vector<int64_t>& recv_cnt);

  ncclComm_t comm_;
  int W_, rank_, E_, k_, H_, L_;
  cudaStream_t stream_;
  const int32_t* indices_ = nullptr;  // the last dispatch's (the caller keeps them until combine)
  int64_t T_ = 0, send_rows_ = 0, recv_rows_ = 0, cross_bytes_ = 0;
  char error_[256] = {0};

  // Device buffers and their capacities (bytes).
  uint8_t* bytemap_ = nullptr;
  size_t bytemap_cap_ = 0;
  int32_t* slot_ = nullptr;  // [T, E] slot of token t in expert e's chunk, or -1
  size_t slot_cap_ = 0;
  int32_t* counts_ = nullptr;  // [E] send counts, then [W, L] receive counts
  size_t counts_cap_ = 0;
  int64_t* expert_off_ = nullptr;  // [E + 1] first send row of each expert
  size_t expert_off_cap_ = 0;
  __nv_bfloat16* send_x_ = nullptr;  // [T * k, H] (also the rows returned by combine)
  size_t send_x_cap_ = 0;
  __nv_bfloat16* recv_x_ = nullptr;  // [R, H] [source][local expert] order
  size_t recv_x_cap_ = 0;
  __nv_bfloat16* expert_x_ = nullptr;  // [R, H] expert-major
  size_t expert_x_cap_ = 0;
  int64_t* chunks_ = nullptr;  // [W * L, 3]: source start, expert-major start, rows
  size_t chunks_cap_ = 0;
  int32_t* pinned_ = nullptr;  // [2E] host: send counts, receive counts
  int64_t* pinned_chunks_ = nullptr;

  std::vector<int64_t> send_off_, send_cnt_, recv_off_, recv_cnt_;  // rows per peer
};

}  // namespace baseline
