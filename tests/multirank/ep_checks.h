// SPDX-License-Identifier: Apache-2.0
// Checks shared by the multi-rank EP tests (gtest assertions on what a rank received and computed).
#pragma once

#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "tests/multirank/ep_world.h"

namespace ept {

// Counts mismatches, keeps the first few messages.
struct Mismatches {
  int64_t n = 0;
  std::string first;
  void add(const std::string& what) {
    if (n++ < 5) first += "\n  " + what;
  }
};

#define MISMATCH(m, cond, ...) \
  do {                         \
    if (!(cond)) {             \
      std::ostringstream os_;  \
      os_ << __VA_ARGS__;      \
      (m).add(os_.str());      \
    }                          \
  } while (0)

// Exactly what this rank must have received, against the layout of its dispatch.
void check_received(const Spec& s, int W, int rank, const std::vector<Input>& world, const bitepDispatchLayout_t& lo);

// A dispatch of this rank's input into the group's pool buffers (collective), checked as above, its handle destroyed:
// the group still works.
void dispatch_and_check(bitepGroup_t g, const Spec& s, int W, int rank, const std::vector<Input>& world);

// bitepCombine into a fresh [T, H] buffer (one canary byte past the end is checked).
std::vector<uint8_t> combine(bitepGroup_t g,
                             bitepHandle_t h,
                             const void* y,
                             bitepLayout_t layout,
                             int weighted,
                             int64_t T,
                             const Spec& s,
                             bitepResult_t* res);

void expect_values(const Spec& s, const std::vector<uint8_t>& got, const std::vector<float>& want, const char* what);

#ifdef BITEP_MULTIRANK_CUDA
// True when every rank has a GPU of its own (its index on the node, *device); else why not. Collective. With
// BITEP_CUDA_TRANSPORT=ipc (the cuda groups over MPI and CUDA IPC) the node's ranks share its GPUs: *device is
// the index modulo the GPUs, and one GPU is enough.
bool gpu_per_rank(int* device, std::string* why);
#endif

// The config topk of a spec (one-rank routing caps it at L).
int config_topk(const Spec& s, int W);

// The weight gradients of a combine backward through the toy experts against the analytic fp64 dot
// products dot(y_e(x_t), grad_out_t) (0 where not routed, or everywhere when unweighted), within 1e-5 of
// the sum of the products' magnitudes: compact [T, k] in the dispatch's order and dense [T, E].
void check_weight_grads(const Spec& s,
                        int W,
                        int rank,
                        const Input& in,
                        const std::vector<uint8_t>& grad_out,
                        int weighted,
                        const float* compact,
                        const float* dense,
                        Mismatches* m);

}  // namespace ept
