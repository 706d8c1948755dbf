// SPDX-License-Identifier: Apache-2.0
// Router API: argument checks, then the host reference or the CUDA launchers.
#include <algorithm>
#include <climits>
#include <cmath>

#include "src/args.h"
#include "src/capture.h"
#include "src/check.h"
#include "src/env.h"
#include "src/host/router_host.h"

#ifdef BITEP_HAVE_CUDA
#include "kernels/router.h"
#endif

namespace bitep {
namespace {

using kernels::MapFormat;
using kernels::RouterMode;

bitepResult_t check_config(const bitepRouterConfig_t* c, RouterMode mode) {
  BITEP_CHECK_STRUCT(c, "config", bitepRouterConfig_t, BITEP_ROUTER_CONFIG_MAGIC, "BITEP_ROUTER_CONFIG_INIT");
  BITEP_ARG_CHECK(c->num_experts >= 1, "config->num_experts is %d, must be >= 1", c->num_experts);
  BITEP_ARG_CHECK(c->topk >= 1 && c->topk <= c->num_experts, "config->topk is %d, must be in [1, num_experts = %d]",
                  c->topk, c->num_experts);
  BITEP_ARG_CHECK(c->score_function == bitepScoreSoftmax || c->score_function == bitepScoreSigmoid ||
                      c->score_function == bitepScoreSqrtSoftplus,
                  "config->score_function is %d, expected bitepScoreSoftmax (0), bitepScoreSigmoid (1) or "
                  "bitepScoreSqrtSoftplus (2)",
                  static_cast<int>(c->score_function));
  BITEP_CHECK(check_dtype(c->logits_dtype, "config->logits_dtype"));
  if (mode == RouterMode::kAuxScores) return bitepSuccess;  // groups, scaling and pre-softmax are not used
  BITEP_ARG_CHECK(c->use_pre_softmax == 0 || c->use_pre_softmax == 1, "config->use_pre_softmax is %d, must be 0 or 1",
                  c->use_pre_softmax);
  BITEP_ARG_CHECK(!c->use_pre_softmax || c->score_function == bitepScoreSoftmax,
                  "config->use_pre_softmax is 1 but config->score_function is not bitepScoreSoftmax");
  BITEP_ARG_CHECK(std::isfinite(c->scaling_factor), "config->scaling_factor is %g, must be finite",
                  static_cast<double>(c->scaling_factor));
  BITEP_ARG_CHECK(c->num_groups >= 0, "config->num_groups is %d, must be >= 0", c->num_groups);
  if (c->num_groups == 0) {
    BITEP_ARG_CHECK(c->group_topk == 0, "config->group_topk is %d but config->num_groups is 0 (no group routing)",
                    c->group_topk);
  } else {
    BITEP_ARG_CHECK(c->num_experts % c->num_groups == 0,
                    "config->num_experts (%d) %% config->num_groups (%d) != 0: groups must be equal", c->num_experts,
                    c->num_groups);
    BITEP_ARG_CHECK(c->group_topk >= 1 && c->group_topk <= c->num_groups,
                    "config->group_topk is %d, must be in [1, num_groups = %d]", c->group_topk, c->num_groups);
    BITEP_ARG_CHECK(c->group_topk <= c->topk,
                    "config->group_topk (%d) > config->topk (%d): each kept group's score sums its top "
                    "topk / group_topk experts, which must be >= 1",
                    c->group_topk, c->topk);
    const int group_size = c->num_experts / c->num_groups;
    BITEP_ARG_CHECK(c->topk / c->group_topk <= group_size,
                    "config->topk / config->group_topk (%d) > experts per group (%d)", c->topk / c->group_topk,
                    group_size);
    BITEP_ARG_CHECK(c->topk <= c->group_topk * group_size,
                    "config->topk (%d) > config->group_topk * experts per group (%d): too few candidate experts",
                    c->topk, c->group_topk * group_size);
  }
  return bitepSuccess;
}

bitepResult_t check_map_format(bitepMapFormat_t f, const void* map, const char* name) {
  BITEP_ARG_CHECK(f == bitepMapNone || f == bitepMapBytemap || f == bitepMapBitmapU8,
                  "%s is %d, expected bitepMapBytemap (1) or bitepMapBitmapU8 (2) here", name, static_cast<int>(f));
  BITEP_ARG_CHECK(map == nullptr || f != bitepMapNone, "args->routing_map is set but %s is bitepMapNone", name);
  return bitepSuccess;
}

bitepResult_t check_launch_flags(int flags) {
  BITEP_ARG_CHECK((flags & ~BITEP_LAUNCH_PDL) == 0,
                  "args->launch_flags is 0x%x: the only flag is BITEP_LAUNCH_PDL (0x%x); 0 for none",
                  static_cast<unsigned>(flags), static_cast<unsigned>(BITEP_LAUNCH_PDL));
  return bitepSuccess;
}

uint64_t map_bytes(bitepMapFormat_t f, uint64_t T, int E) {
  return f == bitepMapBytemap ? T * E : T * static_cast<uint64_t>(kernels::bitmap_bytes(E));
}

// `experts` names the argument E comes from ("config->num_experts", "args->num_experts").
bitepResult_t check_tokens(int64_t T, int E, const char* experts) {
  BITEP_ARG_CHECK(T >= 0, "args->num_tokens is %lld, must be >= 0", static_cast<long long>(T));
  uint64_t bytes = 0;
  BITEP_ARG_CHECK(
      !mul_overflows(static_cast<uint64_t>(T), static_cast<uint64_t>(E) * 4, &bytes) && bytes < (uint64_t{1} << 62),
      "args->num_tokens (%lld) x %s (%d) overflows a 64-bit byte count", static_cast<long long>(T), experts, E);
  return bitepSuccess;
}

// BITEP_ROUTER_SPEC=0: the CUDA router's any-path kernels only (not those compiled for one score path). Read
// per call (a getenv beside the call's argument checks), so a test compares both kernels in one process.
bool spec_kernels() { return !env_is("BITEP_ROUTER_SPEC", "0"); }
// BITEP_ROUTER_TWO_OCTETS_MIN=N: the E 65-256 post-top-k softmax at two octets a lane (half the lanes a token)
// from N tokens on (the default, -1, is 64 x the SMs; 0 at any count: the tests run that kernel on small rows). Read
// per call.
int two_octet_min_tokens() { return env_int("BITEP_ROUTER_TWO_OCTETS_MIN", 0, 1 << 30, -1); }
// BITEP_ROUTER_MANY_WINS_MIN_K=K: the E 129-2048 post-top-k softmax's instance with longer lane caches from k = K on
// (the default, -1, is kernels/router_params.h's many_wins_min_topk; 0 or 1 at every k, 65 at none). Read per call.
int many_wins_min_topk() { return env_int("BITEP_ROUTER_MANY_WINS_MIN_K", 0, 1 << 30, -1); }
// BITEP_ROUTER_WHOLE_OCTETS=0: E a multiple of 8 below the bucket's width runs the spec kernels' general body, not
// their instances for whole octets (an A/B knob; the tests compare both). Read per call.
bool whole_octets() { return !env_is("BITEP_ROUTER_WHOLE_OCTETS", "0"); }

kernels::RouterForwardParams to_params(const bitepRouterConfig_t* c, const bitepRouterForwardArgs_t* a, RouterMode m) {
  kernels::RouterForwardParams p;
  p.mode = m;
  p.num_tokens = a->num_tokens;
  p.num_experts = c->num_experts;
  p.topk = c->topk;
  p.score_fn = static_cast<kernels::ScoreFn>(c->score_function);
  p.use_pre_softmax = c->use_pre_softmax != 0;
  // Group-limited routing that keeps every group (group_topk == num_groups; num_groups = 1 among them, as in Kimi K2's
  // and GLM-4.5's configs) leaves every expert a candidate, as no groups do: the same selection, and the group scores
  // decide nothing. So both backends take it as no groups, and the GPU its warp kernels, whatever the group width
  // (groups of 20 or 48 experts, not a power of two of octets, took the block-per-token generic kernel).
  const bool groups = m == RouterMode::kTopk && c->num_groups > 0 && c->group_topk < c->num_groups;
  p.num_groups = groups ? c->num_groups : 0;
  p.group_topk = groups ? c->group_topk : 0;
  p.scaling_factor = m == RouterMode::kTopk ? c->scaling_factor : 1.0f;
  p.logits_dtype = to_kernel_dtype(c->logits_dtype);
  p.logits = a->logits;
  p.expert_bias = a->expert_bias;
  p.probs = a->probs;
  p.routing_map = static_cast<uint8_t*>(a->routing_map);
  p.map_format = static_cast<MapFormat>(a->map_format);
  p.topk_weights = a->topk_weights;
  p.topk_indices = a->topk_indices;
  p.saved = a->saved;
  p.num_ranks = a->num_ranks;
  p.rank_mask = a->rank_mask;
  p.rank_counts = a->rank_counts;
  p.pdl = (a->launch_flags & BITEP_LAUNCH_PDL) != 0;
  return p;
}

// With no tokens the per-rank counts are still outputs: all zero.
bitepResult_t zero_rank_counts(bitepBackend_t backend, const bitepRouterForwardArgs_t* a, bitepStream_t stream) {
  if (a->rank_counts == nullptr) return bitepSuccess;
  BITEP_CHECK(check_buffers(backend, {{"args->rank_counts", a->rank_counts, uint64_t(a->num_ranks) * 4, true}}, {4}));
  if (backend == bitepBackendHost) {
    std::fill(a->rank_counts, a->rank_counts + a->num_ranks, 0);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  BITEP_CUDA_CHECK(
      cudaMemsetAsync(a->rank_counts, 0, sizeof(int32_t) * a->num_ranks, reinterpret_cast<cudaStream_t>(stream)));
#else
  (void)stream;
#endif
  return bitepSuccess;
}

bitepResult_t forward(bitepBackend_t backend,
                      const bitepRouterConfig_t* config,
                      const bitepRouterForwardArgs_t* a,
                      bitepStream_t stream,
                      RouterMode mode) {
  BITEP_CHECK(check_backend(backend));
  BITEP_CHECK(check_config(config, mode));
  BITEP_CHECK_STRUCT(a, "args", bitepRouterForwardArgs_t, BITEP_ROUTER_FWD_ARGS_MAGIC, "BITEP_ROUTER_FWD_ARGS_INIT");
#ifdef BITEP_HAVE_CUDA
  if (backend == bitepBackendCuda && mode == RouterMode::kTopk && config->num_groups > 0) {
    int max_groups = 0;
    BITEP_CUDA_CHECK(kernels::router_forward_max_groups(&max_groups));
    if (config->num_groups > max_groups)
      BITEP_FAIL(bitepNotSupported,
                 "config->num_groups is %d: the cuda backend holds the group scores in shared memory, %d groups at "
                 "most on this device (the host backend has no limit)",
                 config->num_groups, max_groups);
  }
#endif
  const int E = config->num_experts, k = config->topk;
  BITEP_CHECK(check_tokens(a->num_tokens, E, "config->num_experts"));
  BITEP_CHECK(check_launch_flags(a->launch_flags));
  BITEP_CHECK(check_map_format(a->map_format, a->routing_map, "args->map_format"));
  BITEP_ARG_CHECK(a->num_ranks >= 0, "args->num_ranks is %d, must be >= 0", a->num_ranks);
  if (a->num_ranks > 0)
    BITEP_ARG_CHECK(E % a->num_ranks == 0,
                    "config->num_experts (%d) %% args->num_ranks (%d) != 0: every rank owns "
                    "num_experts / num_ranks experts",
                    E, a->num_ranks);
  else
    BITEP_ARG_CHECK(a->rank_mask == nullptr && a->rank_counts == nullptr,
                    "args->rank_mask or args->rank_counts is set but args->num_ranks is 0");
  BITEP_ARG_CHECK(a->rank_counts == nullptr || a->num_tokens <= INT32_MAX,
                  "args->num_tokens (%lld) > INT32_MAX with args->rank_counts set: the per-rank token counts are int32",
                  static_cast<long long>(a->num_tokens));
  if (a->expert_bias != nullptr)
    BITEP_ARG_CHECK(mode == RouterMode::kTopk && config->score_function != bitepScoreSoftmax,
                    "args->expert_bias is set but applies to the sigmoid and sqrtsoftplus top-k router only");
  if (mode == RouterMode::kAuxScores) {
    BITEP_ARG_CHECK(a->probs != nullptr, "args->probs (the aux-loss scores [T, E]) is NULL");
    BITEP_ARG_CHECK(
        a->topk_weights == nullptr && a->topk_indices == nullptr && a->num_ranks == 0,
        "args->topk_weights, args->topk_indices and args->num_ranks must be NULL / 0 for the aux-loss scores");
  }
  const uint64_t T = static_cast<uint64_t>(a->num_tokens);
  if (T == 0) return zero_rank_counts(backend, a, stream);
  BITEP_ARG_CHECK(a->logits != nullptr, "args->logits is NULL");
  BITEP_ARG_CHECK(a->map_format == bitepMapNone || a->routing_map != nullptr,
                  "args->routing_map is NULL but args->map_format asks for a map");
  const uint64_t mask_bytes = a->num_ranks > 0 ? T * kernels::bitmap_bytes(a->num_ranks) : 0;
  const uint64_t TE = T * E;
  BITEP_CHECK(check_buffers(backend,
                            {{"args->logits", a->logits, TE * dtype_size(config->logits_dtype), false},
                             {"args->expert_bias", a->expert_bias, static_cast<uint64_t>(E) * 4, false},
                             {"args->probs", a->probs, TE * 4, true},
                             {"args->routing_map", a->routing_map, map_bytes(a->map_format, T, E), true},
                             {"args->topk_weights", a->topk_weights, T * k * 4, true},
                             {"args->topk_indices", a->topk_indices, T * k * 4, true},
                             {"args->saved", a->saved, TE * 4, true},
                             {"args->rank_mask", a->rank_mask, mask_bytes, true},
                             {"args->rank_counts", a->rank_counts, static_cast<uint64_t>(a->num_ranks) * 4, true}},
                            {dtype_size(config->logits_dtype), 4, 4, 1, 4, 4, 4, 1, 4}));
  kernels::RouterForwardParams p = to_params(config, a, mode);
  p.spec_kernels = spec_kernels();
  p.two_octet_min_tokens = two_octet_min_tokens();
  p.many_wins_min_topk = many_wins_min_topk();
  p.whole_octets = whole_octets();
  if (backend == bitepBackendHost) {
    host::router_forward(p);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  BITEP_CUDA_CHECK(kernels::launch_router_forward(p, reinterpret_cast<cudaStream_t>(stream)));
#else
  (void)stream;
#endif
  return bitepSuccess;
}

bitepResult_t backward(bitepBackend_t backend,
                       const bitepRouterConfig_t* config,
                       const bitepRouterBackwardArgs_t* a,
                       bitepStream_t stream,
                       RouterMode mode) {
  BITEP_CHECK(check_backend(backend));
  BITEP_CHECK(check_config(config, mode));
  BITEP_CHECK_STRUCT(a, "args", bitepRouterBackwardArgs_t, BITEP_ROUTER_BWD_ARGS_MAGIC, "BITEP_ROUTER_BWD_ARGS_INIT");
  const int E = config->num_experts;
  BITEP_CHECK(check_tokens(a->num_tokens, E, "config->num_experts"));
  BITEP_CHECK(check_launch_flags(a->launch_flags));
  if (mode == RouterMode::kTopk) {
    BITEP_CHECK(check_map_format(a->map_format, a->routing_map, "args->map_format"));
    BITEP_ARG_CHECK(a->map_format != bitepMapNone,
                    "args->map_format is bitepMapNone: the backward needs the forward's map");
  }
  const bool use_map = mode == RouterMode::kTopk;
  const uint64_t T = static_cast<uint64_t>(a->num_tokens);
  if (T == 0) return bitepSuccess;
  BITEP_ARG_CHECK(!use_map || a->routing_map != nullptr,
                  "args->routing_map is NULL: the backward needs the forward's map");
  BITEP_ARG_CHECK(a->grad_probs != nullptr, "args->grad_probs is NULL");
  BITEP_ARG_CHECK(a->grad_logits != nullptr, "args->grad_logits is NULL");
  BITEP_ARG_CHECK(a->saved != nullptr || a->logits != nullptr,
                  "args->saved and args->logits are both NULL: give the forward's saved tensor, or the logits to "
                  "recompute from");
  const uint64_t TE = T * E;
  const int ds = dtype_size(config->logits_dtype);
  BITEP_CHECK(
      check_buffers(backend,
                    {{"args->grad_probs", a->grad_probs, TE * 4, false},
                     {"args->routing_map", use_map ? a->routing_map : nullptr, map_bytes(a->map_format, T, E), false},
                     {"args->saved", a->saved, TE * 4, false},
                     {"args->logits", a->saved ? nullptr : a->logits, TE * ds, false},
                     {"args->grad_logits", a->grad_logits, TE * ds, true}},
                    {4, 1, 4, ds, ds}));
  kernels::RouterBackwardParams p;
  p.mode = mode;
  p.num_tokens = a->num_tokens;
  p.num_experts = E;
  p.topk = config->topk;
  p.score_fn = static_cast<kernels::ScoreFn>(config->score_function);
  p.use_pre_softmax = mode == RouterMode::kTopk && config->use_pre_softmax != 0;
  p.scaling_factor = mode == RouterMode::kTopk ? config->scaling_factor : 1.0f;
  p.logits_dtype = to_kernel_dtype(config->logits_dtype);
  p.grad_probs = a->grad_probs;
  p.routing_map = use_map ? static_cast<const uint8_t*>(a->routing_map) : nullptr;
  p.map_format = use_map ? static_cast<MapFormat>(a->map_format) : MapFormat::kNone;
  p.saved = a->saved;
  p.logits = a->saved ? nullptr : a->logits;
  p.grad_logits = a->grad_logits;
  p.spec_kernels = spec_kernels();
  p.pdl = (a->launch_flags & BITEP_LAUNCH_PDL) != 0;
  if (backend == bitepBackendHost) {
    host::router_backward(p);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  BITEP_CUDA_CHECK(kernels::launch_router_backward(p, reinterpret_cast<cudaStream_t>(stream)));
#else
  (void)stream;
#endif
  return bitepSuccess;
}

bitepResult_t aux_loss(bitepBackend_t backend, const bitepAuxLossArgs_t* a, bitepStream_t stream, bool fwd) {
  BITEP_CHECK(check_backend(backend));
  BITEP_CHECK_STRUCT(a, "args", bitepAuxLossArgs_t, BITEP_AUX_LOSS_ARGS_MAGIC, "BITEP_AUX_LOSS_ARGS_INIT");
  BITEP_ARG_CHECK(a->num_experts >= 1, "args->num_experts is %d, must be >= 1", a->num_experts);
  BITEP_ARG_CHECK(a->topk >= 1 && a->topk <= a->num_experts, "args->topk is %d, must be in [1, num_experts = %d]",
                  a->topk, a->num_experts);
  BITEP_CHECK(check_tokens(a->num_tokens, a->num_experts, "args->num_experts"));
  BITEP_CHECK(check_launch_flags(a->launch_flags));
  BITEP_ARG_CHECK(a->total_num_tokens >= 1, "args->total_num_tokens is %lld, must be >= 1",
                  static_cast<long long>(a->total_num_tokens));
  BITEP_ARG_CHECK(std::isfinite(a->coeff), "args->coeff is %g, must be finite", static_cast<double>(a->coeff));
  BITEP_ARG_CHECK(a->tokens_per_expert != nullptr, "args->tokens_per_expert is NULL");
  if (fwd) {
    BITEP_ARG_CHECK(a->loss != nullptr, "args->loss is NULL");
    BITEP_ARG_CHECK(a->num_tokens == 0 || a->probs != nullptr, "args->probs is NULL");
  } else {
    BITEP_ARG_CHECK(a->grad_loss != nullptr, "args->grad_loss is NULL");
    BITEP_ARG_CHECK(a->num_tokens == 0 || a->grad_probs != nullptr, "args->grad_probs is NULL");
  }
  const uint64_t TE = static_cast<uint64_t>(a->num_tokens) * a->num_experts;
  BITEP_CHECK(check_buffers(backend,
                            {{"args->probs", fwd ? a->probs : nullptr, TE * 4, false},
                             {"args->tokens_per_expert", a->tokens_per_expert, uint64_t(a->num_experts) * 4, false},
                             {"args->loss", fwd ? a->loss : nullptr, 4, true},
                             {"args->grad_loss", fwd ? nullptr : a->grad_loss, 4, false},
                             {"args->grad_probs", fwd ? nullptr : a->grad_probs, TE * 4, true}},
                            {4, 4, 4, 4, 4}));
  if (!fwd && a->num_tokens == 0) return bitepSuccess;
  kernels::AuxLossParams p;
  p.num_tokens = a->num_tokens;
  p.num_experts = a->num_experts;
  p.topk = a->topk;
  p.total_num_tokens = a->total_num_tokens;
  p.coeff = a->coeff;
  p.probs = a->probs;
  p.tokens_per_expert = a->tokens_per_expert;
  p.loss = a->loss;
  p.grad_loss = a->grad_loss;
  p.grad_probs = a->grad_probs;
  p.pdl = (a->launch_flags & BITEP_LAUNCH_PDL) != 0;
  if (backend == bitepBackendHost) {
    fwd ? host::aux_loss_forward(p) : host::aux_loss_backward(p);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  auto s = reinterpret_cast<cudaStream_t>(stream);
  BITEP_CUDA_CHECK(fwd ? kernels::launch_aux_loss_forward(p, s) : kernels::launch_aux_loss_backward(p, s));
#else
  (void)stream;
#endif
  return bitepSuccess;
}

// cuda: the call's own runtime queries (the arguments' pointer checks, the launchers' attribute queries) run with
// the thread's capture mode relaxed, so that a router call captured into a CUDA graph (global mode) keeps the
// capture valid (src/capture.h). The host backend makes no CUDA call.
template <class F>
bitepResult_t relaxed_for_cuda(bitepBackend_t backend, F&& body) {
  if (backend != bitepBackendCuda) return body();
  RelaxedCaptureMode relaxed;
  return body();
}

}  // namespace
}  // namespace bitep

extern "C" {

bitepResult_t bitepRouterForward(bitepBackend_t backend,
                                 const bitepRouterConfig_t* config,
                                 const bitepRouterForwardArgs_t* args,
                                 bitepStream_t stream) {
  return bitep::guard("bitepRouterForward", [&] {
    return bitep::relaxed_for_cuda(
        backend, [&] { return bitep::forward(backend, config, args, stream, bitep::kernels::RouterMode::kTopk); });
  });
}

bitepResult_t bitepRouterBackward(bitepBackend_t backend,
                                  const bitepRouterConfig_t* config,
                                  const bitepRouterBackwardArgs_t* args,
                                  bitepStream_t stream) {
  return bitep::guard("bitepRouterBackward", [&] {
    return bitep::relaxed_for_cuda(
        backend, [&] { return bitep::backward(backend, config, args, stream, bitep::kernels::RouterMode::kTopk); });
  });
}

bitepResult_t bitepAuxScoresForward(bitepBackend_t backend,
                                    const bitepRouterConfig_t* config,
                                    const bitepRouterForwardArgs_t* args,
                                    bitepStream_t stream) {
  return bitep::guard("bitepAuxScoresForward", [&] {
    return bitep::relaxed_for_cuda(
        backend, [&] { return bitep::forward(backend, config, args, stream, bitep::kernels::RouterMode::kAuxScores); });
  });
}

bitepResult_t bitepAuxScoresBackward(bitepBackend_t backend,
                                     const bitepRouterConfig_t* config,
                                     const bitepRouterBackwardArgs_t* args,
                                     bitepStream_t stream) {
  return bitep::guard("bitepAuxScoresBackward", [&] {
    return bitep::relaxed_for_cuda(backend, [&] {
      return bitep::backward(backend, config, args, stream, bitep::kernels::RouterMode::kAuxScores);
    });
  });
}

bitepResult_t bitepAuxLossForward(bitepBackend_t backend, const bitepAuxLossArgs_t* args, bitepStream_t stream) {
  return bitep::guard("bitepAuxLossForward", [&] {
    return bitep::relaxed_for_cuda(backend, [&] { return bitep::aux_loss(backend, args, stream, true); });
  });
}

bitepResult_t bitepAuxLossBackward(bitepBackend_t backend, const bitepAuxLossArgs_t* args, bitepStream_t stream) {
  return bitep::guard("bitepAuxLossBackward", [&] {
    return bitep::relaxed_for_cuda(backend, [&] { return bitep::aux_loss(backend, args, stream, false); });
  });
}

}  // extern "C"
