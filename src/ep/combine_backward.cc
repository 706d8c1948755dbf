// SPDX-License-Identifier: Apache-2.0
// bitepCombineBackward: grad_out goes along the dispatch's routes (permute without maps or weights,
// all-to-all-v with the handle's counts) -> expert-major (weighted) scatter = grad_y; and, when weight
// gradients are wanted, dot(y_row, grad_row) in fp32 per (received row, expert) goes back to the source
// ranks -> grad_topk_weights / grad_probs.
//
// Whether the weight gradients travel must be the same on every rank (it adds an all-to-all): they do iff
// the combine is weighted and y is given. Host backend: the ranks agree on it (a rank without expert rows
// may pass y = NULL; a rank with expert rows that passes NULL while another passes y fails the call on
// every rank). cuda backend: each rank decides from its own y, so pass y on every rank or on none (a rank
// without expert rows may pass any non-NULL pointer; it is not read).
#include <vector>

#include "src/args.h"
#include "src/check.h"
#include "src/ep/collective.h"
#include "src/ep/combine.h"
#include "src/ep/exec.h"

namespace bitep::ep {
namespace {

constexpr int32_t kBitWeighted = 1, kBitY = 2, kBitRows = 4;

bitepResult_t check_args(const bitepGroup* g, const bitepHandle* h, const bitepCombineBackwardArgs_t* a) {
  BITEP_CHECK_STRUCT(a, "args", bitepCombineBackwardArgs_t, BITEP_COMBINE_BWD_ARGS_MAGIC,
                     "BITEP_COMBINE_BWD_ARGS_INIT");
  BITEP_ARG_CHECK(a->weighted == 0 || a->weighted == 1, "args->weighted is %d, must be 0 or 1", a->weighted);
  if (a->weighted)
    BITEP_ARG_CHECK(h->has_weights,
                    "args->weighted is 1 but the dispatch had no weights: give args->probs or "
                    "args->topk_weights to bitepDispatch, or set weighted = 0");
  const int64_t T = h->num_tokens, N = h->num_expert_rows;
  const uint64_t row = static_cast<uint64_t>(dtype_size(g->config.dtype)) * g->config.hidden;
  const int E = g->config.num_experts, k = g->config.topk, ds = dtype_size(g->config.dtype);
  if (T > 0)
    BITEP_ARG_CHECK(a->grad_out != nullptr, "args->grad_out is NULL but the dispatch had %lld tokens on this rank",
                    static_cast<long long>(T));
  if (N > 0)
    BITEP_ARG_CHECK(a->grad_y != nullptr, "args->grad_y is NULL but the handle has %lld expert-major rows",
                    static_cast<long long>(N));
  if (a->grad_topk_weights != nullptr || a->grad_probs != nullptr)
    BITEP_ARG_CHECK(a->y != nullptr || N == 0,
                    "args->grad_topk_weights or args->grad_probs is set but args->y is "
                    "NULL: the weight gradients need the forward's expert outputs y");
  return check_buffers(g->config.backend,
                       {{"args->grad_out", a->grad_out, static_cast<uint64_t>(T) * row, false},
                        {"args->y", a->y, static_cast<uint64_t>(N) * row, false},
                        {"args->grad_y", a->grad_y, static_cast<uint64_t>(N) * row, true},
                        {"args->grad_topk_weights", a->grad_topk_weights, static_cast<uint64_t>(T) * k * 4, true},
                        {"args->grad_probs", a->grad_probs, static_cast<uint64_t>(T) * E * 4, true}},
                       {ds, ds, ds, 4, 4}, g->device);
}

// Every rank's bits -> whether the weight gradients travel (host backend), or the call's common error.
bitepResult_t decide_weight_grads(const bitepGroup* g, const std::vector<int32_t>& bits, bool* wgrad) {
  int giver = -1, lacker = -1;
  for (int q = 0; q < g->nranks; ++q) {
    if ((bits[q] & kBitWeighted) != (bits[0] & kBitWeighted))
      BITEP_FAIL(bitepInvalidArgument,
                 "args->weighted differs across ranks: rank 0 has %d, rank %d has %d (this is "
                 "rank %d)",
                 bits[0] & kBitWeighted, q, bits[q] & kBitWeighted, g->rank);
    if (bits[q] & kBitY) {
      if (giver < 0) giver = q;
    } else if (bits[q] & kBitRows) {
      if (lacker < 0) lacker = q;
    }
  }
  *wgrad = (bits[0] & kBitWeighted) && giver >= 0;
  if (*wgrad && lacker >= 0)
    BITEP_FAIL(bitepInvalidArgument,
               "rank %d gives args->y (weight gradients wanted) but rank %d, which has expert "
               "rows, does not: give y on every rank, or on none (this is rank %d)",
               giver, lacker, g->rank);
  return bitepSuccess;
}

bitepResult_t backward(Exec& ex, bitepGroup* g, bitepHandle* h, const bitepCombineBackwardArgs_t* a, bool wgrad) {
  const bitepGroupConfig_t& c = g->config;
  const int W = g->nranks, self = g->rank, KL = g->max_row_experts;
  const size_t row = static_cast<size_t>(dtype_size(c.dtype)) * c.hidden;
  const int64_t T = h->num_tokens, S = h->num_send_rows, R = h->num_recv_rows;
  // Gradient rows along the dispatch's routes.
  void *send_g = nullptr, *recv_g = nullptr;
  BITEP_CHECK(ex.temp(row * S, &send_g));
  BITEP_CHECK(ex.temp(row * R, &recv_g));
  if (T > 0) {
    kernels::PermuteParams pp = permute_params(h, g);
    pp.routing = h->routing;  // not read: no maps, no weights
    pp.x = a->grad_out;
    pp.send_offsets = h->send_offsets_dev;
    pp.send_x = send_g;
    pp.recv_x = recv_g;
    BITEP_CHECK(ex.permute(pp));
  }
  std::vector<std::vector<PeerBuffers>> per_peer(W);
  add_route_buffers(h, self, Route::kOut, send_g, recv_g, row, &per_peer);
  BITEP_CHECK(peer_alltoallv(g, per_peer, ex.stream(), c.timeout_s));
  // grad_y: the expert-major scatter, weighted by the router weights when the combine was.
  if (R > 0 || h->num_expert_rows > 0) {
    kernels::ExpertMajorParams ep = expert_major_params(h, g);
    ep.positions_given = true;  // the dispatch's positions: read, not recomputed
    ep.recv_x = recv_g;
    ep.expert_x = a->grad_y;
    ep.recv_weights = a->weighted ? h->recv_weights : nullptr;
    void* src = nullptr;  // the gather's source table (cuda)
    BITEP_CHECK(ex.temp(sizeof(int64_t) * h->num_expert_rows, &src));
    ep.expert_src = static_cast<int64_t*>(src);
    BITEP_CHECK(ex.expert_major(ep));
  }
  if (T > 0 && a->grad_probs != nullptr) BITEP_CHECK(ex.zero(a->grad_probs, sizeof(float) * T * c.num_experts));
  if (T > 0 && a->grad_topk_weights != nullptr) BITEP_CHECK(ex.zero(a->grad_topk_weights, sizeof(float) * T * c.topk));
  if (!wgrad) return bitepSuccess;  // unweighted combine: the weights have no gradient (zeros)
  // Weight gradients on the receiving side, then back to the sources.
  void *gw = nullptr, *ret_gw = nullptr;
  BITEP_CHECK(ex.temp(sizeof(float) * KL * R, &gw));
  BITEP_CHECK(ex.temp(sizeof(float) * KL * S, &ret_gw));
  if (R > 0) {
    kernels::ReduceParams rp;
    rp.num_recv_rows = R;
    rp.max_row_experts = KL;
    rp.hidden = c.hidden;
    rp.dtype = to_kernel_dtype(c.dtype);
    rp.y = a->y;
    rp.recv_expert_rows = h->recv_expert_rows;
    rp.grad_rows = recv_g;
    rp.grad_weights = static_cast<float*>(gw);
    BITEP_CHECK(ex.reduce(rp));
  }
  for (auto& list : per_peer) list.clear();
  add_route_buffers(h, self, Route::kBack, gw, ret_gw, sizeof(float) * KL, &per_peer);
  BITEP_CHECK(peer_alltoallv(g, per_peer, ex.stream(), c.timeout_s));
  if (T == 0) return bitepSuccess;
  kernels::WeightGradParams wp;
  wp.num_tokens = T;
  wp.num_experts = c.num_experts;
  wp.topk = c.topk;
  wp.num_ranks = W;
  wp.self_rank = self;
  wp.routing = h->routing;
  wp.token_slot = h->token_slot;
  wp.send_offsets = h->send_offsets_dev;
  wp.ret_grad_w = static_cast<const float*>(ret_gw);
  wp.self_grad_w = static_cast<const float*>(gw);
  wp.self_offset = h->recv_offsets[self];
  if (a->grad_probs != nullptr) {
    wp.routing.weight_format = kernels::WeightFormat::kDense;
    wp.grad_dense = a->grad_probs;
    wp.grad_compact = nullptr;
    BITEP_CHECK(ex.weight_grad(wp));
  }
  if (a->grad_topk_weights != nullptr) {
    wp.routing.weight_format = kernels::WeightFormat::kCompact;
    wp.grad_dense = nullptr;
    wp.grad_compact = a->grad_topk_weights;
    BITEP_CHECK(ex.weight_grad(wp));
  }
  return bitepSuccess;
}

}  // namespace
}  // namespace bitep::ep

extern "C" bitepResult_t bitepCombineBackward(bitepGroup_t group,
                                              bitepHandle_t handle,
                                              const bitepCombineBackwardArgs_t* args,
                                              bitepStream_t stream) {
  return bitep::guard("bitepCombineBackward", [&]() -> bitepResult_t {
    using namespace bitep::ep;
    bitepResult_t local = bitepSuccess;
    GroupCall call;
    BITEP_CHECK(check_call_agreed(group, handle, /*backward=*/true, &call, "bitepCombineBackward", &local));
    bool shared = false;  // the failure returned is every rank's (host groups' agreement), not this rank's alone
    const bitepResult_t r = bitep::catch_all([&]() -> bitepResult_t {
      Exec ex(group, stream);
      BITEP_CHECK(ex.begin());
      if (local == bitepSuccess && ex.capturing())
        BITEP_FAIL(bitepNotSupported,
                   "bitepCombineBackward: the stream is capturing a CUDA graph, and the backward passes cannot be "
                   "captured (their all-to-alls use temporary buffers and host-side counts)");
      if (local == bitepSuccess) local = check_args(group, handle, args);
      const bool ok = local == bitepSuccess;
      bool wgrad = ok && args->weighted && args->y != nullptr;
      if (group->agree_always) {
        const int32_t bits = ok ? (args->weighted ? kBitWeighted : 0) | (args->y ? kBitY : 0) |
                                      (handle->num_expert_rows > 0 ? kBitRows : 0) |
                                      dispatch_bits(handle, CallKind::kCombineBackward)
                                : 0;
        std::vector<int32_t> all;
        shared = true;
        BITEP_CHECK(agree_status(group, local, "this combine backward", bits, &all));
        BITEP_CHECK(same_dispatch(group, all, "this combine backward"));
        BITEP_CHECK(decide_weight_grads(group, all, &wgrad));
        shared = false;
      } else if (!ok) {
        return local;  // cuda: no agreement, the peers go on into the transfer
      }
      FenceOnExit fence(handle, stream);
      return backward(ex, group, handle, args, wgrad);
    });
    return shared ? r : failed_alone(group, r, "bitepCombineBackward");
  });
}
