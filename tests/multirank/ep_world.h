// SPDX-License-Identifier: Apache-2.0
// The deterministic world of the multi-rank EP tests: every input is a function of (seed, rank, token),
// so each rank computes what every other rank sends, and so what it must receive, without talking.
// Payload rows encode their source: x[t][0] = source rank + 1, x[t][1] = token (mod 251) - 125.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "bitep/bitep.h"
#include "bitep/bitep_mpi.h"

namespace ept {

int world_rank();
int world_size();

enum class Weights { kNone, kDense, kCompact };
enum class Route { kRandom, kOneRank, kHotExpert };

struct Spec {
  std::string name = "basic";
  int L = 4;  // local experts per rank; E = L * W
  int k = 2;  // clamped to E
  int H = 8;
  bitepDataType_t dtype = bitepBfloat16;
  int align = 1;
  bitepMapFormat_t fmt = bitepMapBitmapU8;
  Weights weights = Weights::kCompact;
  Route route = Route::kRandom;
  int target = 0;  // kOneRank: the rank (mod W: -1 is the last); kHotExpert: the expert (mod E)
  uint64_t seed = 1;
  std::function<int64_t(int rank, int W)> tokens = [](int r, int) { return int64_t{5} + 3 * r; };

  int E(int W) const { return L * W; }
  int topk(int W) const { return k < E(W) ? k : E(W); }
};

inline void PrintTo(const Spec& s, std::ostream* os) { *os << s.name; }

// One rank's dispatch input.
struct Input {
  int64_t T = 0;
  std::vector<std::vector<int>> experts;  // [T] ascending
  std::vector<std::vector<float>> w;      // [T] weight of each expert above
  std::vector<uint8_t> x;                 // [T, H] dtype
  std::vector<uint8_t> map;               // the routing input in spec.fmt
  std::vector<float> probs;               // dense [T, E] (Weights::kDense)
  std::vector<float> topk;                // compact [T, k] (Weights::kCompact)
  std::vector<std::vector<int>> compact;  // [T] compact position of each expert (index order for indices)
};

// The scenarios every backend runs: zero tokens on some ranks or all, all tokens to one rank, one hot
// expert, one local expert, L not a multiple of 8, k = 1 and k = E, odd H, each routing format and weight
// form, alignment.
std::vector<Spec> spec_grid();
// n scenarios drawn from seed: L 1-12, k 1-9, H 1-40, each dtype, alignment 1-16, routing format, weight form and
// route, 0-40 tokens a rank (the host backend's grid only).
std::vector<Spec> random_specs(int n, uint64_t seed);

Input make_input(const Spec& s, int W, int rank);
std::vector<Input> make_world(const Spec& s, int W);
bitepDispatchArgs_t dispatch_args(const Spec& s, const Input& in);

// dtype helpers (exact RNE, as the library's definition).
size_t dsize(bitepDataType_t d);
float load(bitepDataType_t d, const void* base, int64_t i);
void store(bitepDataType_t d, void* base, int64_t i, float v);
float round_to(bitepDataType_t d, float v);

float x_value(const Spec& s, int rank, int64_t t, int h);
float grad_value(const Spec& s, int rank, int64_t t, int h);
// Toy expert e: y = round(fmaf(a_e, x, b_e)).
float toy_a(int e);
float toy_b(int e);
float toy_y(bitepDataType_t d, int e, float x);

struct GroupGuard {
  bitepGroup_t g = nullptr;
  GroupGuard() = default;
  GroupGuard(const GroupGuard&) = delete;
  GroupGuard& operator=(const GroupGuard&) = delete;
  ~GroupGuard();
};
// The groups' timeout: BITEP_TEST_TIMEOUT_S, default 30 s (runs under compute-sanitizer, where NCCL's init
// alone can take longer, raise it).
double test_timeout_s();
bitepGroupConfig_t group_config(const Spec& s, int W, double timeout_s = test_timeout_s());
bitepResult_t make_group(const Spec& s, GroupGuard* out, double timeout_s = test_timeout_s());

struct HandleGuard {
  bitepHandle_t h = nullptr;
  HandleGuard() = default;
  HandleGuard(const HandleGuard&) = delete;
  HandleGuard& operator=(const HandleGuard&) = delete;
  ~HandleGuard();
};

// What this rank must receive.
struct Expected {
  std::vector<int> src_rank;                           // [R]
  std::vector<int64_t> src_token;                      // [R]
  std::vector<std::vector<int>> local;                 // [R] local experts, ascending
  std::vector<std::vector<float>> wrow;                // [R] their weights
  std::vector<int64_t> recv_counts, send_counts;       // [W]
  std::vector<int64_t> expert_counts, expert_offsets;  // [L], [L + 1]
  int64_t R = 0, N = 0;
};
Expected expected_receive(const Spec& s, int W, int rank, const std::vector<Input>& world);

// Expert-major outputs of the toy experts for a dispatch's expert_x; pad rows hold a poison value.
std::vector<uint8_t> toy_expert_outputs(const Spec& s, int W, int rank, const bitepDispatchLayout_t& lo);
// Reference combine of this rank's tokens through the toy experts, [T, H] as floats of the dtype, with
// the library's exact rounding points.
std::vector<float> reference_combine(const Spec& s, int W, int rank, const Input& in, bool weighted);

}  // namespace ept
