// SPDX-License-Identifier: Apache-2.0
// examples/moe_layer: one MoE layer (router -> dispatch -> expert FFNs -> combine) over the ranks of
// MPI_COMM_WORLD, checked against a single-rank computation of the same layer.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

struct Options {
  int64_t tokens = 256;  // per rank
  int hidden = 128;
  int experts = 0;  // 0: 2 per rank
  int topk = 2;
  int ffn = 0;  // 0: 2 * hidden
  int iters = 5;
  std::string backend = "host";
  uint64_t seed = 7;
  // cuda only: the decode path. --low-latency: bitepDispatchLowLatency (no host wait; the expert counts stay on the
  // device, so the experts run as one kernel over the expert-major rows); --graph: the same step (router, dispatch,
  // experts, combine) captured once into a CUDA graph and launched once per iteration.
  bool low_latency = false;
  bool graph = false;
};

// This rank's inputs and the layer's weights (the same on every rank).
// Fails the calling function (return 1) on a bitep error, printing the code and bitepGetLastError().
// Needs a `p` (Problem) in scope for the rank.
#define BITEP_OK(call)                                                                                \
  do {                                                                                                \
    const bitepResult_t r_ = (call);                                                                  \
    if (r_ != bitepSuccess) {                                                                         \
      std::fprintf(stderr, "[rank %d] %s failed: %s\n  %s\n", p.rank, #call, bitepGetErrorString(r_), \
                   bitepGetLastError());                                                              \
      return 1;                                                                                       \
    }                                                                                                 \
  } while (0)

struct Problem {
  int rank = 0, nranks = 1;
  int64_t T = 0;
  int E = 0, k = 0, H = 0, F = 0;
  std::vector<float> logits;  // [T, E]
  std::vector<uint16_t> x;    // [T, H] bf16
  std::vector<float> w1, w2;  // [E, F, H], [E, H, F] (values exact in bf16)
};

// Seconds per stage, averaged over the iterations; with --graph the whole step (one launch) alone.
struct Timings {
  double router = 0, dispatch = 0, experts = 0, combine = 0;
  double step = 0;
};

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even (no NaN in this example)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// tanh-approximated GELU, as the cuda path computes it.
float gelu(float v);

// y[H] = W2_e gelu(W1_e x), fp32 accumulation, the activation rounded to bf16 (as the cuda path stores it).
void expert_ffn(const Problem& p, int e, const uint16_t* x, float* y);

// Runs the layer opts.iters times; out [T, H] bf16 of the last iteration. Returns 0 on success.
int run_host(const Options& opts, const Problem& p, std::vector<uint16_t>* out, Timings* t);
int run_cuda(const Options& opts, const Problem& p, std::vector<uint16_t>* out, Timings* t);
