// SPDX-License-Identifier: Apache-2.0
// Fused router forward, one bucket's launch (router_topk_launch.h): of the warp-per-token kernel
// (router_topk_kernel.cuh), the instance the launch's shape, score path, dtype and outputs pick (router_topk_spec.cuh).
// Included by the kernels/router_topk_g<G>x<NS>.cu files alone, each for its bucket's entry (an anonymous namespace:
// each its own copy of the device code, and each instance compiled in one of them).
#pragma once

#include "kernels/router_topk_kernel.cuh"
#include "kernels/router_topk_launch.h"

namespace bitep::kernels {
namespace {

using namespace router_detail;

// Where the pre-top-k softmax's staged instances (E = 64 and 256) store their saved row from the stage
// (FwdLayout::saved_late): right after the softmax, or at the tile's end beside probs, as the post-top-k kernels store
// both. Their TE-compatible rows are bound by how the rows reach memory, not by compute (bench/NOTES.md, the pre-top-k
// probes), and the better order depends on the dtype and the grid. H100, 3 interleaved runs, TE-compatible rows, the
// saved row at the end against after the softmax (bench/NOTES.md, "Router v79" and "v80"): fp32 0.96-1.00x at T 8192 to
// 65536, 0.99x at 131072; bf16 0.97-0.98x at 1.9 waves of resident blocks (T = 16384 E = 256, T = 65536 E = 64), even
// at 3.9 (0.99-1.01x), 1.01-1.07x slower at one wave or less (every warp's stores at the end leave the memory idle
// through its selection) and 1.007x at 7.8 waves; with the compact outputs' stage 1.02-1.03x slower. DeepSeek-V3's
// staged instance keeps its saved row right after the sigmoid (at the end 1.01-1.06x slower at T 16384 to 131072).
inline bool saved_row_late(bool f32, bool compact, int64_t grid, int64_t resident) {
  if (BITEP_ROUTER_FWD_SAVED_LATE >= 0) return BITEP_ROUTER_FWD_SAVED_LATE != 0;
  if (f32) return true;
  return !compact && grid > resident && grid <= 4 * resident;
}

template <int G,
          int NS,
          bool kF32,
          FwdSpec kSpec,
          bool kWideRows,
          int kK,
          bool kManyWins = false,
          bool kAnyWidthGroups = false,
          bool kOctets = false>
cudaError_t launch_kernel(const RouterForwardParams& p, FwdLayout lay, cudaStream_t stream) {
  static std::atomic<int> occupancy{0};
  constexpr int kTokensPerWarp = kWarpSize / G;
  constexpr int kWarps = kBucketThreads / kWarpSize;
  auto kernel = router_forward_bucket<G, NS, kF32, kSpec, kWideRows, kK, kManyWins, kAnyWidthGroups, kOctets>;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), kBucketThreads, &occupancy);
  lay.num_tiles = (p.num_tokens + kTokensPerWarp - 1) / kTokensPerWarp;
  lay.full_tiles = p.num_tokens / kTokensPerWarp;
  size_t smem = p.num_ranks > 0
                    ? sizeof(uint32_t) * (p.num_ranks + static_cast<size_t>(kWarps) * kTokensPerWarp * lay.rank_words)
                    : 0;
  lay.compact_at = -1;
  if (compact_stage_kernel<kSpec>() && (p.topk_indices != nullptr || p.topk_weights != nullptr)) {
    const size_t at = (smem / sizeof(uint32_t) + 1) & ~size_t{1};  // 8-byte aligned
    lay.compact_at = static_cast<int>(at);
    smem = sizeof(uint32_t) * at + sizeof(uint2) * kWarps * kTokensPerWarp * static_cast<size_t>(p.topk);
  }
  // The dynamic part past what a launch gets without opting in, beside the staging's static part.
  if (smem + sizeof(float4) * staged_float4s<G, NS, kF32, kWideRows>() > 48 * 1024) {
    err = raise_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    if (err != cudaSuccess) return err;
  }
  // The spec kernels take one tile a warp, in a grid the block scheduler balances: H200, T = 16384 bf16,
  // E = 512 33.2 -> 29.3 us, E = 128 14.2 -> 13.1, E = 64 and 256 within 2% of the persistent grid, which
  // the any-path kernels keep (their prefetch of the next tile needs it).
  const unsigned grid = kSpec != FwdSpec::kAny ? static_cast<unsigned>((lay.num_tiles + kWarps - 1) / kWarps)
                                               : persistent_grid(lay.num_tiles, kWarps, sms, per_sm);
  if constexpr (kSpec == FwdSpec::kPreSoftmax && staged_float4s<G, NS, kF32, kWideRows>() > 1)  // else 0 (lay{})
    lay.saved_late = saved_row_late(kF32, lay.compact_at >= 0, grid, static_cast<int64_t>(per_sm) * sms);
  t_forward_record.kernel = static_cast<int>(kSpec);
  t_forward_record.topk = kK;
  t_forward_record.lanes = G;
  t_forward_record.cache = fwd_cache_size<G, NS, kSpec, kManyWins>();
  t_forward_record.whole_octets = kOctets;
  t_forward_record.staged = staged_float4s<G, NS, kF32, kWideRows>() > 1;
  t_forward_record.saved_late = lay.saved_late != 0;
  return launch_maybe_dependent(p.pdl, kernel, dim3(grid), dim3(kBucketThreads), smem, stream, p, lay);
}

// The instance for whole octets below the bucket's width where whole_octets_kernel has one and the launch's E takes it
// (whole_octets), else its twin.
template <int G, int NS, bool kF32, FwdSpec kSpec, bool kWideRows, int kK, bool kAnyWidthGroups = false>
cudaError_t launch_octets_or_twin(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  if constexpr (whole_octets_kernel<NS, kF32, kSpec, kWideRows>()) {
    if (whole_octets<G, NS>(p))
      return launch_kernel<G, NS, kF32, kSpec, kWideRows, kK, false, kAnyWidthGroups, true>(p, lay, stream);
  }
  return launch_kernel<G, NS, kF32, kSpec, kWideRows, kK, false, kAnyWidthGroups>(p, lay, stream);
}

template <int G, int NS, bool kF32, FwdSpec kSpec, bool kWideRows>
cudaError_t launch_k(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  if constexpr (kSpec == FwdSpec::kSigmoidNormV3) {
    return launch_kernel<G, NS, kF32, kSpec, kWideRows, kV3K>(p, lay, stream);
  } else {
    constexpr int kK = kconst_kernel<G, NS, kSpec>();
    if constexpr (kK > 0) {
      const bool dense = p.probs != nullptr || p.saved != nullptr;
      if (p.topk == kK && !(kconst_compact_only<G, NS, kF32, kSpec>() && dense))
        return launch_octets_or_twin<G, NS, kF32, kSpec, kWideRows, kK>(p, lay, stream);
    }
    if constexpr (kSpec == FwdSpec::kPostSoftmax && G == 32) {
      if (many_wins_post(p)) return launch_kernel<G, NS, kF32, kSpec, kWideRows, 0, true>(p, lay, stream);
    }
    return launch_octets_or_twin<G, NS, kF32, kSpec, kWideRows, 0>(p, lay, stream);
  }
}

// two_octet_post's kernel (k = 8 alone) at G lanes a token: at 8 lanes (bf16 logits) the wide-stores instance where
// probs or saved are written (E = 128, both 16-byte aligned: the rule's condition), the other for the compact outputs;
// at 16 (E 129-256, compact outputs alone) the instance of the logits' dtype.
template <int G>
cudaError_t launch_two_octet(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  if constexpr (G == 8) {
    if (p.probs != nullptr || p.saved != nullptr)
      return launch_kernel<8, 2, false, FwdSpec::kPostSoftmax, true, 8>(p, lay, stream);
  } else {
    if (p.logits_dtype == DType::kF32)
      return launch_kernel<G, 2, true, FwdSpec::kPostSoftmax, false, 8>(p, lay, stream);
  }
  return launch_kernel<G, 2, false, FwdSpec::kPostSoftmax, false, 8>(p, lay, stream);
}

template <int G, int NS, bool kF32, FwdSpec kSpec>
cudaError_t launch_bucket_t(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  if constexpr (wide_rows_kernel<G, NS, kF32, kSpec>()) {
    if (p.num_experts == 8 * G * NS && (p.probs != nullptr || p.saved != nullptr) && aligned16(p.probs) &&
        aligned16(p.saved) &&
        (!dense_only_kernel<kSpec>() || (p.topk_indices == nullptr && p.topk_weights == nullptr && p.num_ranks == 0)))
      return launch_k<G, NS, kF32, kSpec, true>(p, lay, stream);
  }
  return launch_k<G, NS, kF32, kSpec, false>(p, lay, stream);
}

// The instance for groups that are not whole octets (kAnyWidthGroups; FwdLayout::group_size), runtime k.
template <int G, int NS, FwdSpec kSpec>
cudaError_t launch_any_width_groups(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  if constexpr (NS == 1) {
    return p.logits_dtype == DType::kF32 ? launch_octets_or_twin<G, NS, true, kSpec, false, 0, true>(p, lay, stream)
                                         : launch_octets_or_twin<G, NS, false, kSpec, false, 0, true>(p, lay, stream);
  } else {
    return cudaErrorInvalidValue;  // not launched: the launch takes such groups at one octet a lane alone
  }
}

template <int G, int NS, FwdSpec kSpec>
cudaError_t launch_dtype(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  return p.logits_dtype == DType::kF32 ? launch_bucket_t<G, NS, true, kSpec>(p, lay, stream)
                                       : launch_bucket_t<G, NS, false, kSpec>(p, lay, stream);
}

// Kernels of their own (fp32 or bf16 logits, 32-bit offsets: (T + 256) * E < 2^31, one tile a warp, so no
// offset past T + 36 tokens is formed): the post-top-k softmax without groups from 8 lanes a token to 8
// octets a lane (E from 33 to 2048), k up to the lanes of a token (the holders); the pre-top-k softmax and
// the normalised sigmoid (k > 1), groups and bias as the parameters say, from 8 lanes a token to 2 octets a
// lane (E from 33 to 512).
template <int G, int NS>
cudaError_t launch_bucket(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  if constexpr (G >= 8 && NS <= 8) {
    if (p.spec_kernels && p.mode == RouterMode::kTopk && p.logits_dtype != DType::kF16 &&
        (p.num_tokens + 256) * p.num_experts < (int64_t{1} << 31)) {
      const ScorePath path = score_path(p);
      if (path.post && lay.group_octets == 0 && lay.group_size == 0 && (!kHolderSoftmax || p.topk <= G)) {
        if constexpr ((G == 16 || G == 32) && NS == 1) {
          int sms = 0;
          const cudaError_t err = sm_count(&sms);
          if (err != cudaSuccess) return err;
          if (two_octet_post(p, sms)) return launch_two_octet<G / 2>(p, lay, stream);
        }
        return launch_dtype<G, NS, FwdSpec::kPostSoftmax>(p, lay, stream);
      }
      if constexpr (NS <= 2) {
        if (path.pre) {
          if (lay.group_size > 0) return launch_any_width_groups<G, NS, FwdSpec::kPreSoftmax>(p, lay, stream);
          return launch_dtype<G, NS, FwdSpec::kPreSoftmax>(p, lay, stream);
        }
        if (p.score_fn == ScoreFn::kSigmoid && path.norm) {
          if (lay.group_size > 0) return launch_any_width_groups<G, NS, FwdSpec::kSigmoidNorm>(p, lay, stream);
          if constexpr (G == 32 && NS == 1) {
            if (BITEP_ROUTER_FWD_V3 != 0 && p.topk == kV3K && lay.group_octets == kV3Shape.group_octets &&
                lay.per_group == kV3Shape.per_group && p.group_topk == kV3Shape.group_topk &&
                p.expert_bias != nullptr && aligned16(p.expert_bias))
              return launch_dtype<G, NS, FwdSpec::kSigmoidNormV3>(p, lay, stream);
          }
          return launch_dtype<G, NS, FwdSpec::kSigmoidNorm>(p, lay, stream);
        }
      }
    }
  }
  // Groups that are not whole octets have no any-path instance: the generic kernel.
  if (lay.group_size > 0) return launch_router_forward_generic(p, stream);
  return launch_dtype<G, NS, FwdSpec::kAny>(p, lay, stream);
}

// The bucket's entry: the per-launch constants (FwdLayout), then the instance.
template <int G, int NS>
cudaError_t launch_forward_bucket(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream) {
  const bool groups = p.mode == RouterMode::kTopk && p.num_groups > 0;
  FwdLayout lay{};
  lay.rank_words = p.num_ranks > 0 ? (p.num_ranks + 31) / 32 : 0;
  lay.mask_bytes = p.num_ranks > 0 ? map_bytes_of(p.num_ranks) : 0;
  lay.experts_per_rank = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 1;
  lay.group_octets = group_octets;
  lay.group_size = group_size;
  lay.per_group = groups ? p.topk / p.group_topk : 0;
  return launch_bucket<G, NS>(p, lay, stream);
}

}  // namespace
}  // namespace bitep::kernels
