// SPDX-License-Identifier: Apache-2.0
// Fused router forward (kernels/router.h): score function, group-limited top-k, weights, and the routing
// map written straight as BITMAP_U8 (or BYTEMAP), plus the compact [T, k] outputs, the saved tensor and
// the dispatch-layout epilogue, in one pass over the logits. Semantics: src/host/router_host.cc.
//
// Warp-per-token kernel (E <= 2048, k <= 64, groups of a power of two of octets, or of any width at one octet a lane:
// step 3b): the row stays in registers (router_common.cuh, "Lane layout"); top-k is k rounds of a segment arg-max on
// uint32 selection keys
// (value order, ties to the lower expert index, NaN lowest). Each lane keeps its C best remaining keys
// sorted, so a round is one max reduction and one ballot (the lowest tied lane wins), the winner pops its
// cache by predicated selects, and a lane rescans its registers only when it has won C times. The
// post-top-k softmax (E 33-2048, k up to the lanes of a token) has kernels of its own (FwdSpec): the
// weights from the rounds' winners ("holders"), and for bf16 logits keys that carry their expert
// ("packed": a round is one max reduction); so have the pre-top-k softmax and the normalised sigmoid
// (E 33-512: the parameters' tests and 64-bit offsets compiled out). Anything else goes to router_generic.cu.
//
// The kernel (router_forward_bucket) and its per-launch constants (FwdLayout). Its instances and their rules:
// router_topk_spec.cuh; the selection's building blocks: router_topk_select.cuh, and its group-limited routing (steps 3
// and 3b): router_topk_groups.cuh; the launch: router_topk.cu picks the bucket, and router_topk_bucket.cuh, which alone
// includes this file, the instance (an anonymous namespace: each kernels/router_topk_g<G>x<NS>.cu has its own copy of
// the device code and compiles its bucket's instances).
#pragma once

#include <climits>
#include <type_traits>

#include "kernels/router.h"
#include "kernels/router_common.cuh"
#include "kernels/router_keys.h"
#include "kernels/router_packed_keys.cuh"
#include "kernels/router_topk_groups.cuh"
#include "kernels/router_topk_select.cuh"
#include "kernels/router_topk_spec.cuh"

namespace bitep::kernels {
namespace {

using namespace router_detail;

// Per-launch constants derived on the host.
struct FwdLayout {
  int64_t num_tiles;     // warp tiles: ceil(T / tokens per warp)
  int rank_words;        // ceil(W / 32): 32-bit words of one token's rank mask in shared memory
  int mask_bytes;        // ceil(W / 8)
  int experts_per_rank;  // L = E / W
  int group_octets;      // octets per expert group (power of two <= lanes), 0 = no group routing or group_size's
  int per_group;         // k / group_topk: experts summed into a group's score
  int64_t full_tiles;    // tiles with no token past T
  int compact_at;        // the compact outputs' stage (compact_stage_kernel): its first word in the dynamic shared
                         // memory, past the rank words; -1 where it has none
  int group_size;        // experts per group where groups are not whole octets (group_octets 0; kAnyWidthGroups: one
                         // octet a lane, at least 8 experts a group, per_group <= 2), else 0.
  int saved_late;        // the pre-top-k softmax's staged instances: 1 = the saved row leaves the stage at the tile's
                         // end beside probs, 0 = right after the softmax (router_topk_bucket.cuh, saved_row_late).
                         // group_size and saved_late last, so that the other fields keep their offsets (and the
                         // other kernels their PTX).
};

// kWideRows: the launch writes probs or saved (or both), each 16-byte aligned, E = 8 G NS, and the shape is one where
// the holders' wide stores measured faster (wide_rows_kernel). kK: k when the instance is compiled for one (its
// rounds unrolled; kconst_kernel), else 0 (p.topk). kManyWins: the post-top-k softmax at 32 lanes a token (E 129-2048)
// for large k, its lanes' caches longer (cache_size, many_wins_post). kAnyWidthGroups: the pre-top-k softmax and the
// normalised sigmoid at one octet a lane with groups that are not whole octets (step 3b; FwdLayout::group_size), an
// instance of its own so that the others keep their registers (compiled into them, the step's first version made ptxas
// spill 20-52 bytes in the one-octet kernels at their 40 registers). kOctets: the instance for E a multiple of 8 below
// the bucket's width (E < 8 G NS; GLM-4.5's and DeepSeek-V2's 160, Kimi K2's 384), whose whole tiles take each lane's
// slots as whole octets or none (whole_octets_kernel), where the general body's per-element tests made the lanes with
// an octet and those without take both sides of its branches.
template <int G,
          int NS,
          bool kF32,
          FwdSpec kSpec,
          bool kWideRows,
          int kK,
          bool kManyWins = false,
          bool kAnyWidthGroups = false,
          bool kOctets = false>
__global__ void __launch_bounds__(kBucketThreads,
                                  min_blocks<8 * NS, G, kF32, kSpec, kWideRows, (kK > 0), kAnyWidthGroups>())
    router_forward_bucket(const RouterForwardParams p, const FwdLayout lay) {
  dependent_start();  // BITEP_LAUNCH_PDL (a no-op in a plain launch): nothing read or written before it
  constexpr int N = 8 * NS;
  constexpr int kTokensPerWarp = kWarpSize / G;
  constexpr int kWarps = kBucketThreads / kWarpSize;
  using Mask = typename std::conditional<(N > 32), unsigned long long, uint32_t>::type;
  // [W] rank counts of the block, then [warps][tokens per warp][rank words]; then, 8-byte aligned, the compact outputs'
  // stage (compact_stage_kernel)
  extern __shared__ uint32_t smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sl = lane % G, tl = lane / G;
  constexpr bool kKnown = kSpec != FwdSpec::kAny;
  constexpr bool kV3 = kSpec == FwdSpec::kSigmoidNormV3;
  // kDenseOnly: an instance for launches that write the dense rows and the map alone (dense_only_kernel): no compact
  // outputs and no dispatch-layout epilogue compiled in. (W stays the parameter's, which such a launch has at 0: as a
  // constant 0, ptxas spilled 16 bytes in DeepSeek-V3's staged instance.)
  constexpr bool kDenseOnly = kWideRows && dense_only_kernel<kSpec>();
  const int E = p.num_experts, k = kK > 0 ? kK : p.topk, W = p.num_ranks;
  static_assert(!kV3 || (G == 32 && NS == 1 && kK == kV3K), "DeepSeek-V3's shape: one octet a lane, k = 8");
  static_assert(
      !kAnyWidthGroups || (NS == 1 && kK == 0 && (kSpec == FwdSpec::kPreSoftmax || kSpec == FwdSpec::kSigmoidNorm)),
      "groups of any width: the pre-top-k softmax's and the normalised sigmoid's runtime-k kernels, one octet a lane");
  static_assert(!kManyWins || (kSpec == FwdSpec::kPostSoftmax && G == 32 && kK == 0),
                "the many-wins instance: the post-top-k softmax at 32 lanes a token, runtime k");
  static_assert(!kOctets || whole_octets_kernel<NS, kF32, kSpec, kWideRows>(),
                "whole octets below the bucket's width: whole_octets_kernel's instances");
  const DType dt = kKnown && !kF32 ? DType::kBF16 : p.logits_dtype;
  const ScoreFn fn = spec_fn<kSpec>(p);
  const ScorePath path = spec_path<kSpec>(p);
  const bool aux = path.aux, pre = path.pre, post = path.post, norm = path.norm;
  const bool use_bias = spec_bias<kSpec>(p);
  const bool select = !aux || p.routing_map != nullptr;
  const bool bitmap = p.map_format == MapFormat::kBitmap;
  const int map_row = bitmap ? map_bytes_of(E) : E;
  const int esize = dt == DType::kF32 ? 4 : 2;
  const float scale = p.scaling_factor;

  // The spec kernels' grid gives each warp one tile at most. Their loop ends after one pass where that measured faster
  // (a back edge the compiler cannot remove kept an induction counter in local memory, one STL / LDL a warp): one octet
  // a lane, and two for bf16 logits. H200, T = 16384, min of three interleaved runs: E = 128-512 bf16 0.96-0.99x, E =
  // 64 even; fp32 at two octets a lane (E = 512) 1.02-1.06x slower and E = 2048 1.01x, so those keep the loop
  // (bench/NOTES.md, "Router v19").
  constexpr bool kOnePass = kKnown && (NS == 1 || (NS == 2 && !kF32));
  // kStaged: each warp's rows of probs and saved ([tokens of the warp][E] floats each), as float4 (staged_float4s).
  constexpr bool kStaged = staged_float4s<G, NS, kF32, kWideRows>() > 1;
  // kOwnStaged: staged rows that each lane writes its own octets of (the pre-top-k softmax, DeepSeek-V3: stage_octet),
  // where the holders' kernels write them as unselected first and their weights over them.
  constexpr bool kOwnStaged = kStaged && !holders_spec(kSpec);
  // kBulkStage: the holders' staged rows leave the stage by bulk stores (store_staged below).
  constexpr bool kBulkStage = kStaged && !kOwnStaged && bulk_stage_kernel<NS>();
  // kValuesStaged: DeepSeek-V3's staged instance keeps its sigmoid values in the warp's staged saved row through the
  // group steps and the rounds (stage_octet after the sigmoid, read back before step 5), not in 8 registers a lane:
  // its keys carry the bias, so they cannot hold the values as the pre-top-k softmax's do (kKeysHoldValues).
  constexpr bool kValuesStaged = kOwnStaged && kV3;
  __shared__ float4 stage[staged_float4s<G, NS, kF32, kWideRows>()];
  static_assert(!kStaged || staged_float4s<G, NS, kF32, kWideRows>() == kWarps * 2 * 64 * NS, "the staging's size");
  // The pre-top-k softmax's staged rows (kOwnStaged, not DeepSeek-V3's): the saved row leaves the stage at the tile's
  // end, beside probs, where the launch says (router_topk_bucket.cuh saved_row_late), else right after the softmax.
  // DeepSeek-V3's (kValuesStaged) right after its sigmoid always, the flag not compiled in: it made ptxas spill 4 bytes
  // there.
  [[maybe_unused]] const bool saved_late =
      kOwnStaged && !kValuesStaged &&
      (BITEP_ROUTER_FWD_SAVED_LATE >= 0 ? BITEP_ROUTER_FWD_SAVED_LATE != 0 : lay.saved_late != 0);
  [[maybe_unused]] float4* const stage_p = stage + (kStaged ? warp * 2 * 64 * NS : 0);
  [[maybe_unused]] float4* const stage_s = stage_p + 64 * NS;

  uint32_t* hist = smem;
  uint32_t* rbits = smem + W + (warp * kTokensPerWarp + tl) * lay.rank_words;
  if (W > 0) {
    for (int i = threadIdx.x; i < W + kWarps * kTokensPerWarp * lay.rank_words; i += blockDim.x) smem[i] = 0u;
    __syncthreads();
  }

  // Offsets in 32 bits in the spec kernels (launched when (T + 256) * E < 2^31: one tile a warp and no
  // prefetch, so no token past T + 36 is addressed), else 64. Rows 16-byte aligned one and all when the
  // base is and the row's bytes a multiple of 16 (the spec kernels test that once, not per row).
  using Idx = typename std::conditional<kKnown, int32_t, int64_t>::type;
  const Idx num_tiles = static_cast<Idx>(lay.num_tiles);
  const bool logits16 = aligned16(p.logits) && E * esize % 16 == 0;
  const bool saved16 = aligned16(p.saved) && E % 4 == 0, probs16 = aligned16(p.probs) && E % 4 == 0;
  auto row_vec = [&](bool all, const void* row_ptr) {
    if constexpr (kKnown) {
      return all || aligned16(row_ptr);
    } else {
      return aligned16(row_ptr);
    }
  };

  // The next tile's logits are loaded while this one is computed (small rows: more bytes in flight); not
  // in the spec kernels, whose warps take one tile each.
  constexpr bool kPrefetch = !kKnown && (NS == 1 || (NS == 2 && !kF32));
  RawOctet ahead[NS];
  auto logits_row = [&](Idx t) -> const void* {  // element offsets: no byte count past 2^31 in 32 bits
    if constexpr (kKnown) {
      if constexpr (kF32) return static_cast<const float*>(p.logits) + t * E;
      return static_cast<const uint16_t*>(p.logits) + t * E;
    } else {
      return static_cast<const char*>(p.logits) + t * E * esize;
    }
  };
  auto fetch = [&](Idx tile, RawOctet* raw) {
    const Idx t = tile * kTokensPerWarp + tl;
    const bool tv = tile < num_tiles && t < p.num_tokens;
    const bool vec = tv && row_vec(logits16, logits_row(t));
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const int e0 = (s * G + sl) * 8;
      load_raw_t<kF32>(p.logits, dt, t * E + e0, tv ? min(max(E - e0, 0), 8) : 0, vec, raw[s]);
    }
  };
  // The holders' unselected octets by whole-sector stores (kWideRows): each slot's run of G octets as two 16-byte
  // stores a lane over consecutive addresses, so each store instruction of the warp covers whole sectors (a
  // lane's own octet is two stores 32 bytes apart: every sector written in two halves by two instructions).
  [[maybe_unused]] auto wide_unselected = [&](Idx row0) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const Idx at = row0 + s * 8 * G + 4 * sl;
      if (p.probs != nullptr) {
        const float4 z = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        *reinterpret_cast<float4*>(p.probs + at) = z;
        *reinterpret_cast<float4*>(p.probs + at + 4 * G) = z;
      }
      if (p.saved != nullptr) {
        const float4 z = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
        *reinterpret_cast<float4*>(p.saved + at) = z;
        *reinterpret_cast<float4*>(p.saved + at + 4 * G) = z;
      }
    }
  };
  // kStaged: a lane's whole-sector slots, as wide_unselected stores them: slot s, half h at float4 (tl E + s 8 G + 4 sl
  // + h 4 G) / 4 of the warp's rows, and at row + the same offset in probs and saved.
  [[maybe_unused]] auto staged_at = [&](int s, int h) { return tl * 2 * G * NS + s * 2 * G + h * G + sl; };
  [[maybe_unused]] auto stage_unselected = [&] {
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int at = staged_at(s, h);
        if (p.probs != nullptr) stage_p[at] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (p.saved != nullptr) stage_s[at] = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      }
  };
  // One array's rows at a time, from one address each side. (Slot by slot under a test per slot and array, the compiler
  // sank each slot's shared address into its own branch and computed it again there: ~8 instructions of each slot's
  // ~10, 138 of a tile's 822 at E = 128, ncu.) Streaming stores (st.global.cs: the rows are not read again in this
  // launch): H100, 3 interleaved runs, T = 16384 E = 512 TE-compatible 0.99x, the other rows 0.99-1.01x ("Router v56").
  [[maybe_unused]] auto staged_rows = [&](const float4* from, float* to, Idx row0) {
    const float4* src = from + staged_at(0, 0);
    float4* dst = reinterpret_cast<float4*>(to + row0 + 4 * sl);
#pragma unroll
    for (int i = 0; i < 2 * NS; ++i) __stcs(dst + i * G, src[i * G]);  // slot i / 2, half i % 2
  };
  // The holders' rows, both arrays after the selection. kBulkStage (bulk_stage_kernel, sm_90): by bulk stores from lane
  // 0 instead. The warp's tokens are consecutive rows and its staged rows lie as they do in memory, so each array is
  // one copy of 1024 NS bytes: the lanes' shared writes made visible to the async proxy, the warp's after them
  // (__syncwarp), then lane 0 issues both copies as one bulk group; bulk_stage_done waits for their reads before the
  // stage is written again or the block's shared memory goes.
  [[maybe_unused]] auto store_staged = [&](Idx row0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kBulkStage) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncwarp();
      if (lane == 0) {
        constexpr uint32_t kBytes = static_cast<uint32_t>(kTokensPerWarp * 2 * G * NS * sizeof(float4));
        uint64_t policy;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        auto copy = [&](const float4* from, float* to) {
          asm volatile(
              "cp.async.bulk.global.shared::cta.bulk_group.L2::cache_hint [%0], [%1], %2, %3;" ::"l"(to + row0),
              "r"(static_cast<uint32_t>(__cvta_generic_to_shared(from))), "r"(kBytes), "l"(policy)
              : "memory");
        };
        if (p.probs != nullptr) copy(stage_p, p.probs);
        if (p.saved != nullptr) copy(stage_s, p.saved);
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
      return;
    }
#endif
    if (p.probs != nullptr) staged_rows(stage_p, p.probs, row0);
    if (p.saved != nullptr) staged_rows(stage_s, p.saved, row0);
  };
  [[maybe_unused]] auto bulk_stage_done = [&] {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    if constexpr (!kOnePass) __syncwarp();  // the next tile writes the stage
#endif
  };
  // kOwnStaged: a lane's own octets into the warp's staged row (slot s at float4 2 (s G + sl) of token tl's), whole;
  // staged_rows then stores the row by whole sectors, probs after the selection and saved either after the softmax or
  // beside probs (lay.saved_late), each behind a __syncwarp (which orders the warp's shared-memory accesses).
  [[maybe_unused]] auto stage_octet = [&](float4* to, int s, const float* v8) {
    float4* at = to + tl * 2 * G * NS + 2 * (s * G + sl);
    at[0] = make_float4(v8[0], v8[1], v8[2], v8[3]);
    at[1] = make_float4(v8[4], v8[5], v8[6], v8[7]);
  };
  [[maybe_unused]] float bias8[kV3 ? 8 : 1];  // kV3: the lane's octet of the bias (0 past E)
  if constexpr (kV3 && !kValuesStaged) {
    float4 b0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b1 = b0;
    if (sl * 8 < E) {
      b0 = __ldg(reinterpret_cast<const float4*>(p.expert_bias + sl * 8));
      b1 = __ldg(reinterpret_cast<const float4*>(p.expert_bias + sl * 8 + 4));
    }
    bias8[0] = b0.x, bias8[1] = b0.y, bias8[2] = b0.z, bias8[3] = b0.w;
    bias8[4] = b1.x, bias8[5] = b1.y, bias8[6] = b1.z, bias8[7] = b1.w;
  }
  const Idx stride = static_cast<Idx>(gridDim.x) * kWarps;
  const Idx first = static_cast<Idx>(blockIdx.x) * kWarps + warp;
  if (kPrefetch) fetch(first, ahead);
  // One tile: tile_body(tile, whole). whole = std::true_type (kWhole) for a whole tile (no token past T, E = 8 G NS;
  // kOctets: E a multiple of 8 below that, each slot a whole octet or none) of
  // 16-byte aligned logits: every slot valid, so the partial tiles' and misaligned rows' tests compile out (a tile of
  // the staged E = 128 kernel 750 -> 655 warp instructions, ncu). In the one-pass kernels, but not where the holders
  // store dense rows from registers (post-top-k softmax with probs or saved written, unstaged: E 129-256 then, before
  // v58 and v61 staged it, and E = 128 at 16 lanes), where it measured 1.02-1.09x slower; elsewhere 0.90-0.99x, fp32
  // post-top-k within 1-2% either way (H200, bench/NOTES.md, "Router v40"); the staged bf16 E = 512 kernel 0.98-0.99x
  // ("Router v42").
  constexpr bool kWholeTiles = kOnePass && (kStaged || !kWideRows);  // unstaged wide instances: dense rows always
  const bool whole_tiles = kStaged || !holders_spec(kSpec) || (p.probs == nullptr && p.saved == nullptr);
  auto tile_body = [&](const Idx tile, auto whole) {
    constexpr bool kWhole = decltype(whole)::value;
    static_assert(!kWhole || kWholeTiles, "whole tiles: the kWholeTiles kernels");
    const Idx t = tile * kTokensPerWarp + tl;
    // kStaged: T in 32 bits (the spec kernels' launch condition). Not in the other kernels, where it measured
    // 1.005-1.01x slower at E = 512 T = 16384 (bench/NOTES.md, "Router v39").
    const bool tv = kWhole || (kStaged ? t < static_cast<Idx>(p.num_tokens) : t < p.num_tokens);
    const Idx row = t * E;
    RawOctet raw[NS];
    if (kPrefetch) {
#pragma unroll
      for (int s = 0; s < NS; ++s) raw[s] = ahead[s];
      fetch(tile + stride, ahead);
    } else if (kWhole) {  // whole aligned rows: an octet one 16-byte load (bf16), or two (fp32)
      // (load_raw_t's 8-element path, by hand: one row base and the octet's index in 16-byte units, where load_raw_t's
      // 64-bit element offset took two more PTX instructions a slot.)
      const uint4* src = static_cast<const uint4*>(logits_row(t));
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        if constexpr (kOctets) {  // a slot past E loads nothing (zeros; its keys are kKeyNone below)
          const uint4 z = make_uint4(0u, 0u, 0u, 0u);
          const bool has = (s * G + sl) * 8 < E;
          raw[s].a = has ? __ldg(src + (kF32 ? 2 : 1) * (s * G + sl)) : z;
          raw[s].b = kF32 && has ? __ldg(src + 2 * (s * G + sl) + 1) : z;
        } else if constexpr (kF32) {
          raw[s].a = __ldg(src + 2 * (s * G + sl));
          raw[s].b = __ldg(src + 2 * (s * G + sl) + 1);
        } else {
          raw[s].a = __ldg(src + s * G + sl);
          raw[s].b = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    } else {
      fetch(tile, raw);
    }
    // The post-top-k softmax's holders (step 5) write the dense rows as unselected (probs 0, saved -inf) and then
    // store the k weights over them. Constants: a warp whose rows are all whole (E = 8 G NS, no token past T) and
    // aligned stores them with whole-sector stores (wide_unselected), here where several tokens share the warp,
    // before the row's registers fill; else step 6 stores a lane's own octet.
    [[maybe_unused]] const bool wide = kWideRows && (kWhole || tile < lay.full_tiles);
    if constexpr (kStaged) {
      if constexpr (!kOwnStaged) {
        if (wide) stage_unselected();
      }
    } else if constexpr (kWideRows && G < 32) {
      if (wide) wide_unselected(row);
    }

    // Experts of each slot's octet in this row (0 for a token past T).
    int nval[NS];
    Mask valid = 0;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const int e0 = (s * G + sl) * 8;
      const int n = kWhole ? (kOctets && e0 >= E ? 0 : 8) : tv ? min(max(E - e0, 0), 8) : 0;
      nval[s] = n;
      valid |= static_cast<Mask>((1u << n) - 1u) << (8 * s);
    }
    // A slot's experts where it has any: 8 in a whole tile (kOctets: the slots with none are skipped by their tests).
    auto octet_n = [&](int s) { return kWhole ? 8 : nval[s]; };

    // 1. logits -> scores, in place.
    float v[N];
#pragma unroll
    for (int s = 0; s < NS; ++s) decode_raw_t<kF32>(dt, raw[s], v + 8 * s);
    const bool svec = p.saved != nullptr && tv && row_vec(saved16, p.saved + row);
    if (p.saved != nullptr && fn == ScoreFn::kSqrtSoftplus) {  // saved = the logits
#pragma unroll
      for (int s = 0; s < NS; ++s)
        if (nval[s] > 0) store_octet_f32(p.saved + row + (s * G + sl) * 8, nval[s], svec, v + 8 * s);
    }
    if (fn == ScoreFn::kSigmoid) {
      sigmoid_n<N>(v);
    } else if (fn == ScoreFn::kSqrtSoftplus) {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = sqrtsoftplus_f(v[i]);
    }
    // kDense: no branch per element (as the backward's recompute; the same bits for the valid ones): at E = 256, 8 of
    // them a lane, the branches with their constants' moves were ~40 instructions of ~700 a token (ncu, H200).
    if (pre) seg_softmax<G, N, true, true>(v, valid);
    if constexpr (kValuesStaged) stage_octet(stage_s, 0, v);  // every tile, saved or not: read back after step 4
    if (kValuesStaged && wide) {
      if (p.saved != nullptr) {
        __syncwarp();
        staged_rows(stage_s, p.saved, row);
      }
    } else if (p.saved != nullptr && (fn == ScoreFn::kSigmoid || pre)) {
      if (kOwnStaged && wide) {
#pragma unroll
        for (int s = 0; s < NS; ++s) stage_octet(stage_s, s, v + 8 * s);
        if (!saved_late) {  // else stored from the stage at the tile's end, beside probs
          __syncwarp();
          staged_rows(stage_s, p.saved, row);
        }
      } else {
#pragma unroll
        for (int s = 0; s < NS; ++s)
          if (nval[s] > 0) store_octet_f32(p.saved + row + (s * G + sl) * 8, octet_n(s), svec, v + 8 * s);
      }
    }
    if (aux && norm) {
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < N; ++i)
        if ((valid >> i) & 1) sum = __fadd_rn(sum, v[i]);
      const float rd = __frcp_rn(__fadd_rn(seg_sum_f32<G>(sum), kNormEpsilon));  // as seg_softmax
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = __fmul_rn(v[i], rd);
    }
    const bool pvec = p.probs != nullptr && tv && row_vec(probs16, p.probs + row);
    if (aux) {
      if (p.probs != nullptr) {
#pragma unroll
        for (int s = 0; s < NS; ++s)
          if (nval[s] > 0) store_octet_f32(p.probs + row + (s * G + sl) * 8, nval[s], pvec, v + 8 * s);
      }
      if (!select) return;
    }

    // 2. selection keys (+ expert_bias, selection only).
    constexpr bool kPacked = holders_spec(kSpec) && !kF32;
    uint32_t key[N];
    // `masked`: slots past E or past T get kKeyNone. The spec kernels build a row whose slots are all valid
    // (every row but a last partial tile when E % 8 == 0: a warp-uniform test) without the per-slot test,
    // which the compiler made a branch around each key (BSSY / BRA / BSYNC: ~5 of ~14 instructions a key).
    // kOctets' whole tiles: a slot past E gets kKeyNone, a select a key (as a pass over the keys after them, ptxas
    // spilled 36 bytes in the bf16 pre-top-k k = 8 instance at its 40 registers). Not the keys from the bits (kPacked),
    // which the post-top-k softmax alone takes.
    [[maybe_unused]] constexpr bool kOctetsHere = kWhole && kOctets;
    static_assert(!kOctets || !kPacked, "whole octets: the keys from the values");
    auto make_keys = [&](auto masked) {
      [[maybe_unused]] const bool bvec = !kV3 && use_bias && aligned16(p.expert_bias);
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        float b8[8];
        if constexpr (kValuesStaged) {  // loaded here: not held through the tile's loads and sigmoid
          float4 b0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b1 = b0;
          if (sl * 8 < E) {
            b0 = __ldg(reinterpret_cast<const float4*>(p.expert_bias + sl * 8));
            b1 = __ldg(reinterpret_cast<const float4*>(p.expert_bias + sl * 8 + 4));
          }
          b8[0] = b0.x, b8[1] = b0.y, b8[2] = b0.z, b8[3] = b0.w, b8[4] = b1.x, b8[5] = b1.y, b8[6] = b1.z,
          b8[7] = b1.w;
        } else if constexpr (kV3) {
#pragma unroll
          for (int b = 0; b < 8; ++b) b8[b] = bias8[b];
        } else if (use_bias) {
          load_octet_f32(p.expert_bias + (s * G + sl) * 8, nval[s], bvec, b8);
        } else {
#pragma unroll
          for (int b = 0; b < 8; ++b) b8[b] = 0.0f;
        }
        // 0xffff - expert: the octet's first expert is a multiple of 8, so its low 3 bits are 111 and
        // subtracting b (< 8) is XOR with b.
        [[maybe_unused]] const uint32_t lo = 0xffffu - static_cast<uint32_t>((s * G + sl) * 8);
        if constexpr (kPacked && bits_keys<G, NS, kK>()) {  // from the logits' bits, two at a time
          const uint32_t w[4] = {raw[s].a.x, raw[s].a.y, raw[s].a.z, raw[s].a.w};
#pragma unroll
          for (int b = 0; b < 8; b += 2) {
            const int i = 8 * s + b;
            uint32_t k0, k1;
            packed_keys_bf16x2(w[b / 2], lo ^ static_cast<uint32_t>(b), lo ^ static_cast<uint32_t>(b + 1), k0, k1);
            if constexpr (decltype(masked)::value) {
              key[i] = ((valid >> i) & 1) ? k0 : kKeyNone;
              key[i + 1] = ((valid >> (i + 1)) & 1) ? k1 : kKeyNone;
            } else {
              key[i] = k0, key[i + 1] = k1;
            }
          }
        } else {
#pragma unroll
          for (int b = 0; b < 8; ++b) {
            const int i = 8 * s + b;
            const float sel = use_bias ? __fadd_rn(v[i], b8[b]) : v[i];
            auto kb = [&] {
              if constexpr (kPacked) return packed_key_lo(sel, lo ^ static_cast<uint32_t>(b));
              // The pre-top-k softmax's scores are +0 at least or NaN (pre_softmax_key), the sigmoid's never -0
              // (select_key_nz), nor with a bias. (At their 40 registers before v70, ptxas 13.0 spilled 4-12 bytes in
              // the E 129-256 pre-top-k instances with pre_softmax_key, measured faster even so, and an earlier ptxas
              // failed there, C7600 "Register allocation failed"; since the keys hold the values, 32 and no spill.)
              if constexpr (kSpec == FwdSpec::kPreSoftmax) return pre_softmax_key(sel);
              if constexpr (sigmoid_norm_spec(kSpec)) return select_key_nz(sel);
              return select_key(sel);
            };
            if constexpr (decltype(masked)::value)
              key[i] = ((valid >> i) & 1) ? kb() : kKeyNone;
            else if constexpr (kOctetsHere)
              key[i] = nval[s] != 0 ? kb() : kKeyNone;
            else
              key[i] = kb();
          }
        }
      }
    };
    // kKeysHoldValues: the pre-top-k softmax's keys are its probabilities' bits with the top one set (pre_softmax_key),
    // so a probability is its key read back (pre_softmax_value), and the row's values die with the keys' making: 8
    // registers a slot fewer through the selection. Slots whose key the group steps cleared (kKeyNone) read 0: never
    // selected.
    constexpr bool kKeysHoldValues = kSpec == FwdSpec::kPreSoftmax;
    [[maybe_unused]] auto sel_value = [&](int i) {
      if constexpr (kKeysHoldValues) return pre_softmax_value(key[i]);
      return v[i];
    };
    [[maybe_unused]] constexpr Mask kAllValid = static_cast<Mask>(~Mask{0} >> (sizeof(Mask) * 8 - N));
    if constexpr (kWhole) {
      make_keys(std::false_type{});
    } else if constexpr (kKnown) {
      if (valid == kAllValid)
        make_keys(std::false_type{});
      else
        make_keys(std::true_type{});
    } else {
      make_keys(std::true_type{});
    }

    // Segment arg-max by ballot: the segment's best key, then the lowest lane holding it. With one slot a
    // lane's octet precedes the next lane's, so the lowest lane is the lowest expert; with several slots
    // lane order is not expert order and an exact tie between lanes (rare) takes a reduction over the
    // expert indices instead.
    const uint32_t seg = segment_lanes<G>(), below = lanemask_lt() & seg;
    auto expert_of = [&](int q) { return ((q >> 3) * G + sl) * 8 + (q & 7); };
    // kHolders: `we` = the winner's expert in every lane of the segment (unspecified where none won).
    constexpr bool kHolders = holders_spec(kSpec);
    auto segment_winner = [&](uint32_t mine, int pos, uint32_t& gm, int& we) {
      gm = seg_max_u32<G>(mine);
      const bool eq = mine == gm && mine != kKeyNone;
      const uint32_t bal = __ballot_sync(kFullMask, eq);
      bool win = eq && (bal & below) == 0u;
      if constexpr (kHolders) we = __shfl_sync(kFullMask, expert_of(pos), __ffs(bal & seg) - 1);
      if constexpr (NS > 1) {
        if (__any_sync(kFullMask, eq && !win)) {
          const int ce = eq ? expert_of(pos) : INT_MAX;
          const int lowest = seg_min_i32<G>(ce);  // every lane: a collective never sits behind a &&
          win = eq && ce == lowest;
          if constexpr (kHolders) we = lowest;
        }
      }
      return win;
    };

    constexpr int C = fwd_cache_size<G, NS, kSpec, kManyWins>();
    [[maybe_unused]] constexpr bool kKeysOnly =
        kKeysOnlyCache && NS == 1 && (kSpec == FwdSpec::kPreSoftmax || sigmoid_norm_spec(kSpec));
    uint32_t ck[C];
    [[maybe_unused]] int cp[C];
    if constexpr (kAnyWidthGroups) {
      // Step 3b fills the cache, from the keys its groups keep. (Filled here too, it was work the step threw away:
      // with the step's integer divisions, 4% of DeepSeek-V2's time, bench/NOTES.md, "Router v52".)
    } else if constexpr (kPacked)
      top_below<N, C>(key, ~0u, ck);
    else if constexpr (kKeysOnly)
      top_keys<N, C>(key, static_cast<Mask>(0), ck);
    else
      top_cached<N, C>(key, static_cast<Mask>(0), ck, cp);

    // 3. group-limited routing (router_topk_groups.cuh): groups of a power of two of octets; 3b, groups of any width.
    if constexpr (kSpec != FwdSpec::kPostSoftmax) {
      if (kV3 || lay.group_octets > 0) {
        keep_groups_of_octets<G, NS, C, kV3, kKeysOnly, Mask>(key, ck, cp, nval, p, lay, lane, sl, seg);
      }
    }
    if constexpr (kAnyWidthGroups) {
      keep_groups_of_any_width<G, C, kKeysOnly>(key, ck, cp, E, tv, p, lay, lane, sl, seg, below);
    }

    // 4. top-k: k rounds of a segment arg-max over each lane's best remaining key; the winner takes it
    // from its cache and rescans its registers (taken ones skipped) when the cache runs dry.
    Mask taken = 0;
    [[maybe_unused]] uint32_t top = kKeyNone;  // the first winner's key: the maximum of the selected
    uint32_t hk = kKeyNone;                    // kHolders: round sl's key and expert
    [[maybe_unused]] int he = 0;
    if constexpr (kPacked) {
      uint32_t last = ~0u;  // the lane's last won key (its wins are its keys from there up)
      for_rounds<kK>(k, [&](int r) {
        const uint32_t gm = seg_max_u32<G>(ck[0]);
        const bool win = ck[0] == gm && gm != kKeyNone;
        hk = sl == r ? gm : hk;
        last = win ? gm : last;
        pop_keys<C>(win, ck);
        if (win && ck[0] == kKeyNone && r + 1 < k) top_below<N, C>(key, last, ck);
      });
      // The won set by a carry chain (keys_at_least) where that measured faster than the compares: H200, bf16
      // (bench/NOTES.md, "Router v39"), compact outputs 0.94-0.99x at E = 64 and 129-512, TE-compatible E = 64
      // 0.95-0.97x; at one octet a lane and 32 lanes a token (E 129-256 with probs or saved) 1.01-1.02x slower, which
      // keeps the compares.
      if constexpr (N <= 32 && !(G == 32 && NS == 1)) {
        taken = keys_at_least<N>(key, last);  // last > 0: a won key, or ~0u where the lane won nothing
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) taken |= key[i] >= last ? static_cast<Mask>(1u) << i : static_cast<Mask>(0);
      }
      top = __shfl_sync(kFullMask, hk, 0, G);
      he = packed_expert(hk);
    } else if constexpr (kKeysOnly) {
      uint32_t last = ~0u;  // the lane's last won key and its number of wins: its won set (won_mask)
      int wins = 0;
      bool exact_rounds = true;  // the rounds with the ballot and the lowest-lane rule
      // The rounds first without the cache's refill: a lane that has won its C cached keys sits the later rounds out
      // (its head is kKeyNone), and checks after them that it lost nothing by it (router_keys::sat_out_lost, in a warp
      // where some lane ran dry); where some lane could have, the rounds run again, exactly, with the refill.
      // - DeepSeek-V3 (keys with the bias: exact ties between lanes are rare): every lane holding the round's maximum
      //   wins it, without the ballot and the lowest-lane rule (at C = 3 a lane wins 3 of the 8 in ~7% of tokens, 4 in
      //   ~0.2%). Each round has a winner, so the wins add up to k exactly when no round had two (and none was won by
      //   kKeyNone); where they do not, the exact rounds run too.
      // - The normalised sigmoid at a compiled k, 16 or 32 lanes a token: the ballot's rounds (one winner each).
      //   GLM-4.5 (E = 160, k = 8) 0.97-0.98x at T = 65536 (H200). Not for the pre-top-k softmax, where the same
      //   rounds measured 1.01-1.02x slower on the compact rows at T = 16384 and even elsewhere (bench/NOTES.md,
      //   "Router v83"). Not at 8 lanes a token (k = 6): ptxas spilled 4 bytes there.
      if constexpr (kV3 || (kSpec == FwdSpec::kSigmoidNorm && kK > 0 && G >= 16)) {
        uint32_t gm_last = kKeyNone;  // the last round's maximum
        for_rounds<kK>(k, [&](int) {  // no refill: the round's index unused
          uint32_t gm;
          bool win;
          if constexpr (kV3) {
            gm = seg_max_u32<G>(ck[0]);
            win = ck[0] == gm;
          } else {
            int we = 0;
            win = segment_winner(ck[0], 0, gm, we);
          }
          last = win ? gm : last;
          wins += win ? 1 : 0;
          gm_last = gm;
          pop_keys<C>(win, ck);
        });
        bool lost = false;
        if (__any_sync(kFullMask, wins == C)) lost = router_keys::sat_out_lost<N>(key, last, wins, C, gm_last);
        if constexpr (kV3) {
          exact_rounds =
              __reduce_add_sync(kFullMask, static_cast<uint32_t>(wins) + (lost ? 64u : 0u)) != static_cast<uint32_t>(k);
        } else {
          exact_rounds = __any_sync(kFullMask, lost);
        }
        if (exact_rounds) {
          last = ~0u, wins = 0;
          top_keys<N, C>(key, static_cast<Mask>(0), ck);
        }
      }
      if (exact_rounds) {
        for_rounds<kK>(k, [&](int r) {
          uint32_t gm;
          int we = 0;
          const bool win = segment_winner(ck[0], 0, gm, we);
          last = win ? gm : last;
          wins += win ? 1 : 0;
          pop_keys<C>(win, ck);
          if (win && ck[0] == kKeyNone && r + 1 < k) top_keys<N, C>(key, won_mask<N, Mask>(key, last, wins), ck);
        });
      }
      taken = won_mask<N, Mask>(key, last, wins);
    } else {
      for_rounds<kK>(k, [&](int r) {
        uint32_t gm;
        int we = 0;
        const bool win = segment_winner(ck[0], cp[0], gm, we);
        if constexpr (kSpec == FwdSpec::kPostSoftmax) top = r == 0 ? gm : top;
        if constexpr (kHolders) {
          hk = sl == r ? gm : hk;
          he = sl == r ? we : he;
        }
        taken |= win ? static_cast<Mask>(1u) << cp[0] : static_cast<Mask>(0);
        pop_cached<C>(win, ck, cp);
        if (win && ck[0] == kKeyNone && r + 1 < k) top_cached<N, C>(key, taken, ck, cp);
      });
    }

    if constexpr (kValuesStaged) {  // the lane's own octet, as stage_octet wrote it (no other lane writes it)
      const float4* at = stage_s + tl * 2 * G * NS + 2 * sl;
      const float4 a = at[0], b = at[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }

    // 5. weights of the selected experts: post-top-k softmax, or the sigmoid/sqrtsoftplus normalisation.
    [[maybe_unused]] float hw = 0.0f;  // kHolders: the weight of round sl's expert (before scaling)
    [[maybe_unused]] const bool holder = kHolders && hk != kKeyNone;
    if constexpr (kHolders) {
      // e = exp(v - max) in the holders, the sum over the rounds by a butterfly over pow2(k) lanes (all
      // of them get the same bits), then e * (1 / sum) as seg_softmax_max. The other lanes take 1 / 1: a lane
      // past pow2(k) holds a sum of 0, whose reciprocal is the compiler's slow path (a call), which every warp of
      // G > pow2(k) lanes a token then ran beside the holders' fast one (ncu, E = 128: once a tile).
      auto value = [](uint32_t key) { return kPacked ? packed_value(key) : key_value(key); };
      const float e = holder ? expf(value(hk) - value(top)) : 0.0f;
      float sum = e;
#pragma unroll
      for (int d = 1; d < G; d <<= 1)
        if (d < k) sum = __fadd_rn(sum, __shfl_xor_sync(kFullMask, sum, d));
      hw = __fmul_rn(e, __frcp_rn(holder ? sum : 1.0f));
    } else if (post) {
      // The spec kernels take the maximum from the first round (its key is the largest selected value's,
      // no bias here; +0 for either zero, NaN only when every selected value is: the same v - m as the
      // fmaxf reduction's, so the same bits) and skip the reduction.
      if constexpr (kSpec == FwdSpec::kPostSoftmax) {
        seg_softmax_max<G, N>(v, taken, key_value(top));
      } else {
        seg_softmax<G, N>(v, taken);
      }
    } else if (!aux && norm) {
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < N; ++i)
        if ((taken >> i) & 1) sum = __fadd_rn(sum, v[i]);
      const float rd = __frcp_rn(__fadd_rn(seg_sum_f32<G>(sum), kNormEpsilon));
#pragma unroll
      for (int i = 0; i < N; ++i)
        if ((taken >> i) & 1) v[i] = __fmul_rn(v[i], rd);
    }

    // 6. outputs.
    // kHolders: the dense rows are first written as unselected (probs 0, saved -inf): by the wide stores (at the
    // tile's start or at the end of this step), or here.
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      // (Written so that the other instances keep the PTX they had before kOctets: the test after the read of n.)
      const int n = kOctets ? octet_n(s) : nval[s];
      if ((kOctets ? nval[s] : n) == 0) continue;
      const int o = s * G + sl, e0 = o * 8;
      const uint32_t byte = static_cast<uint32_t>(taken >> (8 * s)) & 0xffu;
      float o8[8];
      if constexpr (kHolders) {  // the octets as unselected; the holders store the weights below
        if (!wide && p.probs != nullptr) {
#pragma unroll
          for (int b = 0; b < 8; ++b) o8[b] = 0.0f;
          store_octet_f32(p.probs + row + e0, n, pvec, o8);
        }
        if (!wide && p.saved != nullptr) {
#pragma unroll
          for (int b = 0; b < 8; ++b) o8[b] = -INFINITY;
          store_octet_f32(p.saved + row + e0, n, svec, o8);
        }
      } else if (!aux && p.probs != nullptr) {
#pragma unroll
        for (int b = 0; b < 8; ++b) o8[b] = ((byte >> b) & 1) ? __fmul_rn(sel_value(8 * s + b), scale) : 0.0f;
        if (kOwnStaged && wide) {
          stage_octet(stage_p, s, o8);
        } else {
          store_octet_f32(p.probs + row + e0, n, pvec, o8);
        }
      }
      if (!kHolders && post && p.saved != nullptr) {
#pragma unroll
        for (int b = 0; b < 8; ++b) o8[b] = ((byte >> b) & 1) ? v[8 * s + b] : -INFINITY;
        store_octet_f32(p.saved + row + e0, n, svec, o8);
      }
      if (p.routing_map != nullptr) {
        if (bitmap) {
          p.routing_map[t * map_row + o] = static_cast<uint8_t>(byte);
        } else {
          uint8_t* m = p.routing_map + row + e0;
          const uint32_t lo = (byte & 1u) | ((byte & 2u) << 7) | ((byte & 4u) << 14) | ((byte & 8u) << 21);
          const uint32_t hi = ((byte >> 4) & 1u) | ((byte & 32u) << 3) | ((byte & 64u) << 10) | ((byte & 128u) << 17);
          if (n == 8 && (reinterpret_cast<uintptr_t>(m) & 7u) == 0) {
            *reinterpret_cast<uint2*>(m) = make_uint2(lo, hi);
          } else {
#pragma unroll
            for (int b = 0; b < 8; ++b)
              if (b < n) m[b] = static_cast<uint8_t>((byte >> b) & 1u);
          }
        }
      }
    }
    if constexpr (kHolders) {
      if constexpr (kWideRows && G == 32 && !kStaged) {
        if (wide) wide_unselected(row);
      }
      // Over the owners' octets (same lanes: ordered by __syncwarp), and the compact outputs at the
      // holder's ascending position: the selected before its expert, counted from its owner's prefix.
      __syncwarp();
      if constexpr (kStaged) {  // over the warp's staged rows, then the rows whole
        if (wide) {
          if (holder) {
            const int at = tl * 8 * G * NS + he;
            if (p.probs != nullptr) reinterpret_cast<float*>(stage_p)[at] = __fmul_rn(hw, scale);
            if (p.saved != nullptr) reinterpret_cast<float*>(stage_s)[at] = hw;
          }
          __syncwarp();
          store_staged(row);
        }
      }
      if (holder && !(kStaged && wide)) {
        if (p.probs != nullptr) p.probs[row + he] = __fmul_rn(hw, scale);
        if (p.saved != nullptr) p.saved[row + he] = hw;
      }
      if (p.topk_indices != nullptr || p.topk_weights != nullptr) {
        int base = 0, pk[NS];
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          const uint32_t byte = static_cast<uint32_t>(taken >> (8 * s)) & 0xffu;
          const int c = __popc(byte);
          const int inc = seg_scan_i32<G>(c, sl);
          pk[s] = ((base + inc - c) << 8) | static_cast<int>(byte);
          base += __shfl_sync(kFullMask, inc, G - 1, G);
        }
        const int ho = he >> 3, owner = (lane & ~(G - 1)) + ho % G;
        int x = __shfl_sync(kFullMask, pk[0], owner);
#pragma unroll
        for (int s = 1; s < NS; ++s) {
          const int xs = __shfl_sync(kFullMask, pk[s], owner);
          x = ho / G == s ? xs : x;
        }
        if (holder) {
          const int64_t at = t * k + (x >> 8) + __popc(x & ((1 << (he & 7)) - 1));
          if (p.topk_indices != nullptr) p.topk_indices[at] = he;
          if (p.topk_weights != nullptr) p.topk_weights[at] = __fmul_rn(hw, scale);
        }
      }
    } else if (!kDenseOnly && (p.topk_indices != nullptr || p.topk_weights != nullptr)) {
      // Ascending expert order, through the warp's stage (compact_stage_kernel): each lane puts its selected experts
      // and their weights at their places among the token's k, then lane j stores place j of each output. (Stored
      // straight from the lanes, each bit of a lane's octets took a predicated store an output under a branch frame:
      // DeepSeek-V3's compact outputs took longer than its dense rows.)
      // The stage's place from a fresh read of the thread index (warp * tokens per warp + tl = tid / G), so that it is
      // formed here: formed at the kernel's start (the compiler's choice), it held a register through the tile, and
      // DeepSeek-V3's kernel spilled at its 40.
      uint32_t tid;
      asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
      uint2* const cst = reinterpret_cast<uint2*>(smem + lay.compact_at) + static_cast<int>(tid / G) * k;
      if constexpr (!kOnePass) __syncwarp();  // the warp's previous tile has read its stage
      int base = 0;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const uint32_t byte = static_cast<uint32_t>(taken >> (8 * s)) & 0xffu;
        const int c = __popc(byte);
        const int inc = seg_scan_i32<G>(c, sl);
        uint2* at = cst + base + inc - c;
        const uint32_t e0 = static_cast<uint32_t>((s * G + sl) * 8);
        // (A branch a bit: as a predicated store and an add of the bit, ptxas spilled 4-8 bytes in the pre-top-k
        // softmax's k = 8 kernels at their 40 registers.)
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          if ((byte >> b) & 1u) {
            *at = make_uint2(e0 + b, __float_as_uint(sel_value(8 * s + b)));
            ++at;
          }
        }
        base += __shfl_sync(kFullMask, inc, G - 1, G);
      }
      __syncwarp();
      if (kWhole || t < p.num_tokens) {  // tv, formed again: not held through the tile
        const Idx o = t * k;
        for (int j = sl; j < k; j += G) {
          const uint2 x = cst[j];
          if (p.topk_indices != nullptr) p.topk_indices[o + j] = static_cast<int32_t>(x.x);
          if (p.topk_weights != nullptr) p.topk_weights[o + j] = __fmul_rn(__uint_as_float(x.y), scale);
        }
      }
    }
    if constexpr (kOwnStaged) {
      const bool late = saved_late && p.saved != nullptr;
      if (wide && (p.probs != nullptr || late)) {
        __syncwarp();
        if (late) staged_rows(stage_s, p.saved, row);
        if (p.probs != nullptr) staged_rows(stage_p, p.probs, row);
      }
    }
    if constexpr (kBulkStage) {
      if (wide) bulk_stage_done();
    }
    if (!kDenseOnly && W > 0) {  // dispatch layout epilogue: rank mask of the token, rank counts of the block
      const int L = lay.experts_per_rank;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const uint32_t byte = static_cast<uint32_t>(taken >> (8 * s)) & 0xffu;
        if (byte == 0) continue;
        const int e0 = (s * G + sl) * 8;
#pragma unroll
        for (int b = 0; b < 8; ++b)
          if ((byte >> b) & 1) {
            const int r = (e0 + b) / L;
            atomicOr(&rbits[r >> 5], 1u << (r & 31));
          }
      }
      __syncwarp();
      if (tv) {
        if (p.rank_mask != nullptr)
          for (int j = sl; j < lay.mask_bytes; j += G)
            p.rank_mask[t * lay.mask_bytes + j] = static_cast<uint8_t>(rbits[j >> 2] >> ((j & 3) * 8));
        if (p.rank_counts != nullptr)
          for (int w = sl; w < lay.rank_words; w += G)
            for (uint32_t bits = rbits[w]; bits != 0; bits &= bits - 1) atomicAdd(&hist[w * 32 + __ffs(bits) - 1], 1u);
      }
      __syncwarp();
      for (int w = sl; w < lay.rank_words; w += G) rbits[w] = 0u;
      __syncwarp();
    }
  };
  for (Idx tile = first; tile < num_tiles; tile = kOnePass ? num_tiles : tile + stride) {
    if constexpr (kWholeTiles) {
      if (whole_tiles && tile < lay.full_tiles && logits16 && (kOctets ? E % 8 == 0 : E == N * G)) {
        tile_body(tile, std::true_type{});
        continue;
      }
    }
    tile_body(tile, std::false_type{});
  }

  if (W > 0 && p.rank_counts != nullptr) {
    __syncthreads();
    for (int r = threadIdx.x; r < W; r += blockDim.x)
      if (hist[r] != 0) atomicAdd(p.rank_counts + r, static_cast<int>(hist[r]));
  }
}

}  // namespace
}  // namespace bitep::kernels
