// SPDX-License-Identifier: Apache-2.0
#include "tests/multirank/ep_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#ifdef BITEP_MULTIRANK_CUDA
#include <cuda_runtime.h>
#endif

namespace ept {

#ifdef BITEP_MULTIRANK_CUDA
// Skips unless every rank has a GPU of its own (its index on the node); returns that device.
bool gpu_per_rank(int* device, std::string* why) {
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int local = 0, n = 0;
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
  (void)cudaGetLastError();
  const char* transport = std::getenv("BITEP_CUDA_TRANSPORT");
  const bool shared = transport != nullptr && std::strcmp(transport, "ipc") == 0;
  int have = (shared ? n > 0 : local < n) ? 1 : 0, all = 0;
  MPI_Allreduce(&have, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  *device = shared && n > 0 ? local % n : local;
  *why = std::string(shared ? "the cuda backend test needs a GPU (BITEP_CUDA_TRANSPORT=ipc: ranks share them)"
                            : "the cuda backend test needs one GPU per rank") +
         "; rank " + std::to_string(world_rank()) + " sees " + std::to_string(n) + " GPU(s) for local rank " +
         std::to_string(local);
  return all != 0;
}
#endif

int config_topk(const Spec& s, int W) { return s.route == Route::kOneRank ? std::min(s.topk(W), s.L) : s.topk(W); }

void check_received(const Spec& s, int W, int rank, const std::vector<Input>& world, const bitepDispatchLayout_t& lo) {
  const Expected x = expected_receive(s, W, rank, world);
  const int L = s.L, k = s.route == Route::kOneRank ? std::min(s.topk(W), L) : s.topk(W);
  const int KL = std::min(k, L), MB = (L + 7) / 8;
  const size_t row = s.H * dsize(s.dtype);
  ASSERT_EQ(lo.num_ranks, W);
  ASSERT_EQ(lo.num_local_experts, L);
  ASSERT_EQ(lo.max_row_experts, KL);
  ASSERT_EQ(lo.num_recv_rows, x.R);
  ASSERT_EQ(lo.num_expert_rows, x.N);
  for (int r = 0; r < W; ++r) {
    EXPECT_EQ(lo.recv_counts_host[r], x.recv_counts[r]) << "from rank " << r;
    EXPECT_EQ(lo.send_counts_host[r], x.send_counts[r]) << "to rank " << r;
  }
  for (int l = 0; l < L; ++l) {
    EXPECT_EQ(lo.expert_counts_host[l], x.expert_counts[l]) << "expert " << l;
    EXPECT_EQ(lo.expert_counts[l], x.expert_counts[l]) << "expert " << l;
    EXPECT_EQ(lo.expert_offsets[l], x.expert_offsets[l]) << "expert " << l;
  }
  EXPECT_EQ(lo.expert_offsets[L], x.N);
  // Weights given (dense or compact) and some rank has tokens: the layout shows them, on every rank, even one that
  // receives no row (with no token anywhere there is nothing to weigh, and the layout has none).
  const bool any_tokens = std::any_of(world.begin(), world.end(), [](const Input& in) { return in.T > 0; });
  if (s.weights == Weights::kNone)
    EXPECT_EQ(lo.recv_weights, nullptr);
  else if (any_tokens)
    EXPECT_NE(lo.recv_weights, nullptr) << "weights were given but the layout has no recv_weights, rank " << rank;
  Mismatches m;
  std::vector<int64_t> next(x.expert_offsets.begin(), x.expert_offsets.end() - 1);
  for (int64_t i = 0; i < x.R; ++i) {
    const int src = x.src_rank[i];
    const int64_t t = x.src_token[i];
    const uint8_t* got = static_cast<const uint8_t*>(lo.recv_x) + i * row;
    MISMATCH(m, std::memcmp(got, world[src].x.data() + t * row, row) == 0,
             "recv_x row " << i << " is not token " << t << " of rank " << src << " (x[0] = " << load(s.dtype, got, 0)
                           << ")");
    std::vector<uint8_t> map(MB, 0);
    for (int l : x.local[i]) map[l / 8] |= static_cast<uint8_t>(1u << (l % 8));
    MISMATCH(m, std::memcmp(lo.recv_map + i * MB, map.data(), MB) == 0, "recv_map row " << i);
    for (int j = 0; j < KL; ++j) {
      const bool set = j < static_cast<int>(x.local[i].size());
      if (lo.recv_weights != nullptr)
        MISMATCH(m, lo.recv_weights[i * KL + j] == (set ? x.wrow[i][j] : 0.0f),
                 "recv_weights[" << i << "][" << j << "] = " << lo.recv_weights[i * KL + j]);
      const int32_t pos = lo.recv_expert_rows[i * KL + j];
      if (!set) {
        MISMATCH(m, pos == -1, "recv_expert_rows[" << i << "][" << j << "] = " << pos << ", expected -1");
        continue;
      }
      const int64_t want = next[x.local[i][j]]++;
      MISMATCH(m, pos == want, "recv_expert_rows[" << i << "][" << j << "] = " << pos << ", expected " << want);
      if (pos >= 0 && pos < x.N)
        MISMATCH(m, std::memcmp(static_cast<const uint8_t*>(lo.expert_x) + pos * row, got, row) == 0,
                 "expert_x row " << pos << " is not recv_x row " << i);
    }
  }
  for (int l = 0; l < L; ++l)
    for (int64_t r = x.expert_offsets[l] + x.expert_counts[l]; r < x.expert_offsets[l + 1]; ++r)
      for (size_t b = 0; b < row; ++b)
        MISMATCH(m, static_cast<const uint8_t*>(lo.expert_x)[r * row + b] == 0, "pad row " << r << " is not zero");
  EXPECT_EQ(m.n, 0) << "on rank " << rank << ":" << m.first;
}

void dispatch_and_check(bitepGroup_t g, const Spec& s, int W, int rank, const std::vector<Input>& world) {
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  check_received(s, W, rank, world, lo);
}

std::vector<uint8_t> combine(bitepGroup_t g,
                             bitepHandle_t h,
                             const void* y,
                             bitepLayout_t layout,
                             int weighted,
                             int64_t T,
                             const Spec& s,
                             bitepResult_t* res) {
  std::vector<uint8_t> out(T * s.H * dsize(s.dtype) + 1, 0xcd);
  const size_t canary = out.size() - 1;
  bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
  c.y = y;
  c.layout = layout;
  c.weighted = weighted;
  c.out = out.data();
  *res = bitepCombine(g, h, &c, nullptr);
  EXPECT_EQ(out[canary], 0xcd) << "bitepCombine wrote past out";
  out.pop_back();
  return out;
}

void expect_values(const Spec& s, const std::vector<uint8_t>& got, const std::vector<float>& want, const char* what) {
  Mismatches m;
  for (size_t i = 0; i < want.size(); ++i) {
    const float v = load(s.dtype, got.data(), static_cast<int64_t>(i));
    MISMATCH(m, v == want[i], what << "[" << i / s.H << "][" << i % s.H << "] = " << v << ", expected " << want[i]);
  }
  EXPECT_EQ(m.n, 0) << "on rank " << world_rank() << ":" << m.first;
}

void check_weight_grads(const Spec& s,
                        int W,
                        int rank,
                        const Input& in,
                        const std::vector<uint8_t>& grad_out,
                        int weighted,
                        const float* compact,
                        const float* dense,
                        Mismatches* m) {
  const int E = s.E(W), k = config_topk(s, W);
  for (int64_t t = 0; t < in.T; ++t) {
    std::vector<double> want(E, 0.0), scale(E, 0.0);
    for (size_t j = 0; j < in.experts[t].size(); ++j) {
      const int e = in.experts[t][j];
      double d = 0, sc = 0;
      for (int hh = 0; hh < s.H; ++hh) {
        const double p = static_cast<double>(toy_y(s.dtype, e, x_value(s, rank, t, hh))) *
                         load(s.dtype, grad_out.data(), t * s.H + hh);
        d += p;
        sc += std::fabs(p);
      }
      want[e] = weighted ? d : 0.0;
      scale[e] = sc;
      const float got = compact[t * k + in.compact[t][j]];
      MISMATCH(*m, std::fabs(got - want[e]) <= 1e-5 * sc + 1e-6,
               "grad_topk_weights[" << t << "][" << in.compact[t][j] << "] = " << got << ", expected " << want[e]);
    }
    for (int e = 0; e < E; ++e)
      MISMATCH(*m, std::fabs(dense[t * E + e] - want[e]) <= 1e-5 * scale[e] + 1e-6,
               "grad_probs[" << t << "][" << e << "] = " << dense[t * E + e] << ", expected " << want[e]);
  }
}

}  // namespace ept
