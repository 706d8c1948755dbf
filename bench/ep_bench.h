// SPDX-License-Identifier: Apache-2.0
// ep_bench's inputs and checks (ep_bench_kernels.cu). Inputs are deterministic functions of (seed, rank,
// token): every rank knows what any row it receives must hold, without talking.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace epbench {

// Router logits [T, E] fp32 in [0, 4); skewed: experts 0..3 (all on rank 0) get +3, so nearly every token
// picks them (the incast case).
void gen_logits(float* logits, int64_t T, int E, int rank, uint64_t seed, bool skewed, cudaStream_t s);

// Token rows [T, H] bf16 that name their origin: x[t][0] = rank, x[t][1] = t / 256, x[t][2] = t % 256,
// x[t][h >= 3] = pattern(rank, t, h) (multiples of 1/64 in [-2, 2): exact in bf16). Needs H >= 3.
void gen_x(__nv_bfloat16* x, int64_t T, int H, int rank, cudaStream_t s);

// Received rank-major rows [n, H]: rows [src_off[s], src_off[s + 1]) come from rank s in ascending token
// order and carry that token's payload. wrong += bad rows.
void check_recv_rows(
    const __nv_bfloat16* rows, int64_t n, int H, const int64_t* src_off, int W, int* wrong, cudaStream_t s);

// Rows [n, H] in any order: each carries the payload its header names.
void check_rows_payload(const __nv_bfloat16* rows, int64_t n, int H, int* wrong, cudaStream_t s);

// The expert-major view of received rows: for every entry j of recv_expert_rows[i] that is >= 0,
// expert_x[pos] == recv_x[i]; the number of such entries equals the popcount of recv_map[i], which is in
// [1, KL]; weights (if not null) are > 0 on those entries and 0 after.
void check_expert_major(const __nv_bfloat16* recv_x,
                        const __nv_bfloat16* expert_x,
                        const int32_t* rows,
                        const uint8_t* map,
                        const float* weights,
                        int64_t R,
                        int KL,
                        int MB,
                        int H,
                        int* wrong,
                        cudaStream_t s);

// Pad rows [offsets[l] + counts[l], offsets[l + 1]) of expert_x are zero.
void check_pad_rows(const __nv_bfloat16* expert_x,
                    const int32_t* offsets,
                    const int32_t* counts,
                    int L,
                    int H,
                    int* wrong,
                    cudaStream_t s);

// a == b bit for bit ([n] bf16). wrong += differing elements.
void check_equal(const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n, int* wrong, cudaStream_t s);
// bitep's weighted combine through identity experts, bit for bit: per token, for each rank r ascending
// that holds some of its experts, partial_r = bf16(acc) with acc = fmaf(w_j, x, acc) over the token's
// experts on r in ascending order (kernels/ep_params.h, reduce); out = bf16(sum_r float(partial_r)).
// The partials travel in bf16, so out is x only up to that double rounding. Counts wrong tokens.
void check_combine(const __nv_bfloat16* out,
                   const __nv_bfloat16* x,
                   const uint8_t* bitmap,
                   const float* topk_weights,
                   int64_t T,
                   int H,
                   int E,
                   int k,
                   int W,
                   int* wrong,
                   cudaStream_t s);

// The placement check, on the host: where each received row lands, against the documented layout
// (bitepDispatchLayout_t). R received rows by ascending source rank, then source token; local expert l's block is
// rows [offsets[l], offsets[l] + counts[l]), its rows in ascending receive-row order, then pad rows up to
// offsets[l + 1].

// The rows one rank must receive, in receive order, from the routing of every source rank.
struct ExpectedRows {
  std::vector<int32_t> origin;  // [R, 2] source rank, token
  std::vector<uint8_t> map;     // [R, ceil(L/8)] the token's map slice of the rank's L experts, pad bits 0
  std::vector<float> weights;   // [R, min(k, L)] its compact weights of those experts in bit order, 0-padded
};

// Appends the rows that source rank s sends to rank `rank` (those with one of its experts), given s's routing:
// bitmap BITMAP_U8 [T, ceil(E/8)] and compact weights [T, k], host memory.
void append_expected_rows(
    ExpectedRows* e, const uint8_t* bitmap, const float* topk_weights, int64_t T, int E, int k, int W, int s, int rank);

// One rank's received layout, copied to the host.
struct Placement {
  int L = 0, KL = 0;  // local experts, max_row_experts
  int alignment = 1;  // the group's expert_alignment
  int64_t R = 0, num_expert_rows = 0;
  std::vector<uint16_t> headers;  // [R, 3] bf16 bits of each received row's first 3 elements, its origin (fewer: wrong)
  std::vector<uint8_t> map;       // [R, ceil(L/8)] recv_map
  std::vector<float> weights;     // [R, KL] recv_weights; empty when the dispatch has none
  std::vector<int32_t> rows;      // [R, KL] recv_expert_rows
  std::vector<int32_t> offsets;   // [L + 1] expert_offsets
  std::vector<int32_t> counts;    // [L] expert_counts
};

// Counts what differs from e: a missing or extra row; a row whose header, map slice (pad bits included), weights
// (bit for bit) or positions differ (entry j of row i, l the j-th set bit of its slice, must be offsets[l] + the
// rows before i with bit l; entries past the popcount -1); an expert whose rows are not counts[l] or whose block
// is not counts[l] rounded up to the alignment; offsets[0] != 0 or offsets[L] != num_expert_rows.
int64_t check_placement(const ExpectedRows& e, const Placement& p);

// The placement check's own test: one corrupted copy of p at a time (a map bit flipped, two entries of different
// experts swapped, a weight one ulp up), each checked; p itself is left alone. wrong = check_placement on the copy;
// applied = false where p cannot hold the corruption (no weights; no two experts with rows). None when p.R = 0.
struct Corruption {
  const char* what;
  bool applied;
  int64_t wrong;
};
std::vector<Corruption> corrupt_placement(const ExpectedRows& e, const Placement& p);

}  // namespace epbench
