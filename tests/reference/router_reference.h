// SPDX-License-Identifier: Apache-2.0
// fp64 brute-force definition of the router (TE fused router semantics, DESIGN.md "Router semantics"),
// and the comparisons every router test uses. Plain C++, no CUDA: the oracle for the host reference
// backend (CI) and for the CUDA kernels (GPU machine).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bitep/bitep.h"

namespace bitep::ref {

struct Forward {
  std::vector<double> probs;     // [T, E]: routed weights (aux: the scores over all experts)
  std::vector<uint8_t> bytemap;  // [T, E]
  std::vector<int32_t> indices;  // [T, k] ascending
  std::vector<double> weights;   // [T, k] in index order
  std::vector<double> saved;     // [T, E] TE's intermediate output
  std::vector<double> sel;       // [T, E] selection scores (scores + bias)
  // Per token: the smallest gap between the last kept and the first dropped selection score
  // (experts, and groups for group-limited routing); a map that differs from this one is explained
  // by rounding only where 0 < margin < tolerance.
  std::vector<double> margin;  // [T]
};

// The logits as exact doubles (bf16 / fp16 widened exactly).
std::vector<double> to_double(const void* data, bitepDataType_t dtype, size_t n);

// aux = false: bitepRouterForward; aux = true: bitepAuxScoresForward.
Forward router_forward(
    const bitepRouterConfig_t& cfg, int64_t T, const std::vector<double>& logits, const float* expert_bias, bool aux);

// One token's values for a given expert set (ascending, k of them), as router_forward computes them for its
// own: to check a kernel's values where it chose other experts at a near-tie.
struct TokenValues {
  std::vector<double> weights;  // [k]
  std::vector<double> probs;    // [E]
  std::vector<double> saved;    // [E]
  std::vector<double> sel;      // [E] selection scores
};
TokenValues token_values(const bitepRouterConfig_t& cfg,
                         const double* x,
                         const float* expert_bias,
                         const std::vector<int>& chosen,
                         bool aux);

// Whether `chosen` (k distinct experts, ascending) is a top-k selection over the selection scores `sel` up to
// a relative rounding of tol: every chosen expert at least every dropped candidate within tol, and for
// group-limited routing every used group within tol of the group_topk-th group score, every group clearly
// above it taken (its experts among the candidates), group_topk groups taken in all, those that gave no
// expert at the cut and beaten by every chosen expert. Any non-finite score: false (no rounding explains
// those). why: the first violation.
bool near_tie_selection(const bitepRouterConfig_t& cfg,
                        const std::vector<double>& sel,
                        const std::vector<int>& chosen,
                        bool aux,
                        double tol,
                        std::string* why);

// grad_probs -> grad_logits for the given map (bytemap [T, E]); aux = true for the aux-loss scores.
std::vector<double> router_backward(const bitepRouterConfig_t& cfg,
                                    int64_t T,
                                    const std::vector<double>& logits,
                                    const std::vector<uint8_t>& bytemap,
                                    const std::vector<double>& grad_probs,
                                    bool aux);

// The scale M of a backward's rounding errors, fp64: each element of grad_logits with every term taken by its magnitude
// (no cancellation in y_i (g_i - dot) for softmax, g_i / d - dot / d^2 for the normalisation), over the entries of
// grad_probs that reach the gradient (the routed ones; all for the pre-top-k softmax and aux). Its norm is spread like
// the gradient itself, so an error against ||M|| fails a zero or half gradient. From the logits x, the map (bytemap)
// and grad_probs gp; aux = true for the aux-loss scores. into_sigmoid (optional): for sigmoid rows, the magnitude
// reaching the sigmoid's derivative (M_e / sigmoid'(x_e)), else 0.
std::vector<double> grad_scale(const bitepRouterConfig_t& c,
                               int64_t T,
                               const std::vector<double>& x,
                               const std::vector<uint8_t>& bytemap,
                               const std::vector<float>& gp,
                               bool aux,
                               std::vector<double>* into_sigmoid = nullptr);

// loss and its gradient, in fp64.
double aux_loss(int64_t T,
                int E,
                int k,
                int64_t total_tokens,
                double coeff,
                const std::vector<double>& probs,
                const std::vector<int32_t>& tokens_per_expert);

// Map conversions.
std::vector<uint8_t> pack_bitmap(const uint8_t* bytemap, int64_t T, int E);
std::vector<int32_t> indices_from_bytemap(const uint8_t* bytemap, int64_t T, int E, int k, std::string* error);
std::vector<int32_t> indices_from_bitmap(const uint8_t* bitmap, int64_t T, int E, int k, std::string* error);

struct MapCompare {
  int64_t differing_tokens = 0;   // tokens whose expert set differs from the reference
  int64_t near_ties = 0;          // of those, explained by a selection gap below the tolerance
  std::string first_unexplained;  // empty when every difference is a near-tie
};
// got: [T, k] ascending indices. tol: relative gap under which a difference is rounding.
MapCompare compare_indices(const Forward& ref, const std::vector<int32_t>& got, int64_t T, int k, double tol);

// max over rows of ||got - ref|| / max(||ref||, floor), on the rows in `rows` (all when empty).
double max_row_rel_err(const std::vector<double>& ref,
                       const float* got,
                       int64_t T,
                       int width,
                       const std::vector<char>& rows_to_check = {},
                       double floor = 1e-30);

}  // namespace bitep::ref
