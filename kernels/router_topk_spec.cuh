// SPDX-License-Identifier: Apache-2.0
// The forward kernel's instances (kernels/router_topk_kernel.cuh): the score paths compiled in (FwdSpec) and their
// constants, and the compile-time rules that give each instance its blocks an SM, its keys, its k = 8 twin and its
// wide stores, each with the measurement that chose it. Included by router_topk_kernel.cuh
// alone (for router_topk_bucket.cuh); in an anonymous namespace.
#pragma once

#include "kernels/router.h"
#include "kernels/router_common.cuh"
#include "kernels/router_topk_select.cuh"

namespace bitep::kernels {
namespace {

using namespace router_detail;

// The spec kernels' post-top-k softmax from the rounds ("holders"): lane r of the segment keeps round r's
// key and expert (k <= G), takes one exp, and the sum is a butterfly over the first pow2(k) lanes in round
// order; the owners store their octets as 0 / -inf and the holders store the k weights over them (and the
// compact outputs at their ascending positions). No exp per element slot, no select per output element,
// and the row's values die with the keys. The sum's order differs from the any-path kernels' (lane-local
// in element order, then over the lanes): the weights agree within a few ulps, not bit for bit.
// BITEP_ROUTER_FWD_HOLDERS=0 (a tuning build) compiles the spec kernels without it.
#ifndef BITEP_ROUTER_FWD_HOLDERS
#define BITEP_ROUTER_FWD_HOLDERS 1
#endif
constexpr bool kHolderSoftmax = BITEP_ROUTER_FWD_HOLDERS != 0;

// The holders' unselected octets by whole-sector stores (wide_unselected in the kernel).
// BITEP_ROUTER_FWD_WIDE_STORES=0 (a tuning build) stores each lane's own octet instead.
#ifndef BITEP_ROUTER_FWD_WIDE_STORES
#define BITEP_ROUTER_FWD_WIDE_STORES 1
#endif
constexpr bool kWideStores = BITEP_ROUTER_FWD_WIDE_STORES != 0;

// The wide-stores instances at 8 lanes a token (E 33-64, and bf16 E = 128 at two octets a lane: two_octet_post), at 32
// lanes of one octet (E 129-256, both dtypes: v58 and v61 below) and, for bf16 logits, at 32 lanes of two octets (E
// 257-512) stage their dense rows in shared memory (kStaged in the kernel): each lane writes its whole-sector slots
// there as unselected, the holders write their weights over them, and the lanes store the rows from there, so each
// sector of probs and saved is written once, whole (the holders' stores were k partial sectors a token and array over
// the sectors the wide stores had written). H200, min of two repeats: bf16 TE-compatible E = 64 T = 65536 0.94-0.95x, T
// = 16384 0.98-1.01x (two calls); at 16 lanes a token (E = 128 then) 1.01-1.03x slower, and with every post-top-k
// kernel wide and staged up to 1.14x slower (fp32 E = 128, bf16 E = 256 1.12x) (bench/NOTES.md, "Router v15"; E = 128
// at 8 lanes: "Router v31"). E = 512, even in v15 (bf16 0.99-1.03x, fp32 0.99-1.00x), since the staged rows' stores
// from one address (v39) and whole tiles (v40): bf16 0.96-0.97x (T = 16384 26.82 -> 25.82 us), of which whole tiles
// 0.98-0.99x; fp32 (its loop kept, no whole tiles) 0.985-1.00x at T >= 16384 but 1.02-1.04x slower at T = 4096, so it
// stays unstaged ("Router v42"). fp32 at 8 lanes measured 1.03-1.05x slower at E = 64 and, at four tokens a warp at E =
// 128, 1.03-1.06x slower at T = 16384 for 0.98x at 65536 (H200, "Router v41"): bf16 alone at E = 128. E 33-64 fp32
// since v63b (H100, with the instance for k = 6: T = 65536 TE-compatible 0.93x, T = 16384 0.92x; "Router v63"). E
// 129-256, H100, TE-compatible T = 16384 / 65536: bf16 0.86-0.93x (v58), fp32 0.96-0.98x (v61; "Router v58-v61").
// fp32 at 16 lanes of one octet (E 65-128) since v84 (H100, E = 128 TE-compatible: T = 4096 0.95-0.96x, 16384
// 0.90-0.94x, 65536 0.97-0.99x; "Router v84").
// BITEP_ROUTER_FWD_STAGED=0 (a tuning build) stores as the other shapes do.
#ifndef BITEP_ROUTER_FWD_STAGED
#define BITEP_ROUTER_FWD_STAGED 1
#endif
constexpr bool kStageRows = BITEP_ROUTER_FWD_STAGED != 0;

// The staged rows of two octets a lane (bf16 logits: E = 128 at 8 lanes a token, E 257-512 at 32) leave the stage by
// one bulk (TMA) store a warp and array, with an evict-first L2 policy, where the lanes' streaming stores took 4 shared
// loads and 4 stores a lane and array: H100, 3 interleaved runs against the lanes' stores, TE-compatible E = 128 T =
// 65536 0.986-0.987x, T = 16384 0.993-1.000x, E = 512 T = 16384 0.992-0.993x, T = 65536 0.995-0.996x (v76c; applied to
// every staged kernel, 0.98-0.99x on these rows). At one octet a lane (2 loads and 2 stores) the fence, the sync and
// lane 0's issue and wait cost more than they save: SASS +80-112 instructions a kernel, and E = 64 and 256 1.00-1.04x
// slower at T = 16384 (bench/NOTES.md, "Router v76"). sm_90 and later; BITEP_ROUTER_FWD_BULK_STAGE=0 (a tuning build)
// stores by the lanes everywhere.
#ifndef BITEP_ROUTER_FWD_BULK_STAGE
#define BITEP_ROUTER_FWD_BULK_STAGE 1
#endif
template <int NS>
constexpr bool bulk_stage_kernel() {
  return BITEP_ROUTER_FWD_BULK_STAGE != 0 && NS == 2;
}

// Score paths compiled in: the post-top-k softmax (TE's default), the pre-top-k softmax and the normalised
// sigmoid (DeepSeek-V3) get kernels whose flags are constants; kAny reads them from the parameters. The
// forward is bound by instruction issue (bench/NOTES.md).
enum class FwdSpec : int {
  kAny = 0,
  kPostSoftmax = 1,    // top-k, post-top-k softmax, no groups (no bias: softmax scores never take it)
  kPreSoftmax = 2,     // top-k, softmax over all experts before the top-k, groups as the parameters say
  kSigmoidNorm = 3,    // top-k, sigmoid normalised over the k > 1 selected, bias and groups as the parameters say
  kSigmoidNormV3 = 4,  // the same in DeepSeek-V3's shape (kV3Shape): bias, groups of 4 octets, 2 a group score, 4 kept
};
constexpr bool sigmoid_norm_spec(FwdSpec s) { return s == FwdSpec::kSigmoidNorm || s == FwdSpec::kSigmoidNormV3; }
// The post-top-k softmax kernels with holders (kHolderSoftmax above).
constexpr bool holders_spec(FwdSpec s) { return s == FwdSpec::kPostSoftmax && kHolderSoftmax; }

// Blocks per SM the register budget is cut for. BITEP_ROUTER_FWD_MIN_BLOCKS overrides it for every
// shape: a tuning build (scripts/device-check.sh, PHASES=tune) compares occupancies. The bf16
// post-softmax kernel at one octet a lane and one token a warp (E 129-256) is held to 8 (32 registers, no
// spill; 39 and 6 blocks without the cap): H200, T = 16384, E = 256, 22.75 -> 22.14 us (7 gives the same
// 32 registers; the spec kernels of 8 and 16 lanes a token spill there and were 0-6% slower). Without the
// holders (a tuning build) it is v5e's 5 blocks (45 registers; 8 would spill).
// The pre-top-k softmax's and the normalised sigmoid's own kernels (kPreOrNorm): at one octet a lane and 32 lanes a
// token (E 129-256) they are held to 6 blocks (40 registers): H200, router v13 A/B (every kernel at 6 in one build,
// min of two repeats against v13 at 5), DeepSeek-V3 T = 65536 bf16 TE-compatible 71.7 -> 70.3 us, pre-top-k E = 256
// 59.0 -> 56.6; the post-top-k E = 512 rows were 7-11% slower at 6, so no other kernel takes it.
// kAnyWidthGroups (groups that are not whole octets): at 32 lanes a token 6 (40 registers, no spill; H200,
// DeepSeek-V2's shape: 0.99-1.00x of 5, bench/NOTES.md, "Router v52"), below it 5 (48 registers: at 6 the normalised
// sigmoid's whole-octet instances spill 8-16 bytes).
template <int N, int G, bool kF32, FwdSpec kSpec, bool kWideRows, bool kConstK, bool kAnyWidthGroups = false>
constexpr int min_blocks() {
#ifdef BITEP_ROUTER_FWD_MIN_BLOCKS
  return BITEP_ROUTER_FWD_MIN_BLOCKS;
#else
  constexpr bool kPostSpec = kSpec == FwdSpec::kPostSoftmax;
  constexpr bool kPreOrNorm = kSpec == FwdSpec::kPreSoftmax || sigmoid_norm_spec(kSpec);
  if (kAnyWidthGroups) return G == 32 ? 6 : 5;
  // The pre-top-k softmax, whose keys hold its values (router_topk_kernel.cuh, kKeysHoldValues): at 32 lanes of one
  // octet 8 blocks, 32 registers without a spill (ptxas 13.0; 40 registers, 6 blocks and 4-12 bytes spilled before),
  // the post-top-k kernel's occupancy at E = 256. With its rows staged (wide_rows_kernel) 0.96-0.97x on the
  // TE-compatible rows; unstaged, 8 blocks alone measured even (bench/NOTES.md, "Router v70" and "v71").
  if (kSpec == FwdSpec::kPreSoftmax && G == 32 && N <= 8) return 8;
  // DeepSeek-V3's staged instance (dense_only_kernel, its values in the stage): 8 blocks, 32 registers, no spill (v77).
  if (kSpec == FwdSpec::kSigmoidNormV3 && kWideRows) return 8;
  if (kPreOrNorm && G == 32 && N <= 8) return 6;
  // Their runtime-k kernels below 32 lanes a token, and at two octets a lane, at the occupancy ptxas gave them when
  // nothing held it there (48 registers: 5 blocks; 61-64: 4): with the compact outputs' stage it took 55-56 and 70
  // under the general rule's bounds (4 and 3 blocks), and the E = 64 pre-top-k TE-compatible rows ran 1.03-1.05x
  // slower (H200, bench/NOTES.md, "Router v43").
  if (kPreOrNorm && N <= 16 && !kConstK) return N <= 8 ? 5 : 4;
  // The post-top-k kernels of one octet a lane with the holders' wide stores take 8 blocks (32 registers): the bf16
  // ones keep the occupancy they have without them (ptxas gave them 37-39 registers), and the fp32 staged ones take it
  // too: at 32 lanes (v61) without a spill, at 8 lanes for k = 6 (v63b) with 8 bytes spilled, at 16 lanes (v84) the
  // k = 8 instance with 4.
  if (N <= 8 && kWideRows) return 8;
  // The instances for a fixed k (kconst_kernel) keep the occupancy of their runtime-k twins, which ptxas gives 32
  // registers (post-top-k softmax; fp32 at 8 and 16 lanes a token 40), 44-48 (pre-top-k softmax, sigmoid) and 64
  // (the same at two octets a lane); unrolled, it gave them up to 5 more.
  if (kConstK && N <= 8) return kPostSpec ? (kF32 && G <= 16 ? 6 : 8) : 5;
  // The post-top-k kernels at half the bucket's lanes and two octets a lane (two_octet_post; k = 8 alone): the bf16
  // instances (E 65-256) take 40 registers at 6 blocks, the fp32 one (E 129-256) 48 at 5, no spill (at 4 blocks it
  // took 62 registers and was 0.5-1.5% slower; at 6 it spills).
  if (kPostSpec && G <= 16 && N == 16) return kF32 ? 5 : 6;
  if (kConstK && N <= 16 && !kPostSpec) return 4;
  return N <= 8 ? (!kF32 && kPostSpec && G == 32 ? (kHolderSoftmax ? 8 : 5) : 4) : (N <= 16 ? 3 : (N <= 32 ? 2 : 1));
#endif
}

// The bf16 spec kernels' keys ("packed"): kernels/router_packed_keys.cuh. Made from the logits' bits two at a time
// (packed_keys_bf16x2) in the kernels where that measured faster, else from the widened values (packed_key_lo).
// H200, min of two interleaved repeats (bench/NOTES.md, "Router v14"): compact outputs 0.93-0.97x at E = 64-512,
// TE-compatible 0.97-1.00x at E = 64, 128 and 512, but 1.03-1.09x at E = 129-256 (one octet a lane, 32 lanes a
// token, runtime k: the TE-compatible launch's kernel there), which keeps the widened values; so does E > 512
// (ptxas: the E = 2048 kernel's registers 122 -> 168, a block an SM fewer; not measured). BITEP_ROUTER_FWD_BITS_KEYS=0
// (a tuning build) makes none from the bits.
#ifndef BITEP_ROUTER_FWD_BITS_KEYS
#define BITEP_ROUTER_FWD_BITS_KEYS 1
#endif
template <int G, int NS, int kK>
constexpr bool bits_keys() {
  return BITEP_ROUTER_FWD_BITS_KEYS != 0 && NS <= 2 && !(G == 32 && NS == 1 && kK == 0);
}

// DeepSeek-V3's routing (256 experts, 8 groups of 32, the best 2 of a group summed, 4 groups kept, k = 8, expert bias)
// at one octet a lane: kSigmoidNormV3 compiles its group shape in (the pair butterfly and the group rounds unrolled)
// and loads the lane's bias octet once, before the tile, from a 16-byte aligned bias (the launch's condition).
struct GroupShape {
  int group_octets, per_group, group_topk;
};
constexpr GroupShape kV3Shape{4, 2, 4};
constexpr int kV3K = 8;
// BITEP_ROUTER_FWD_V3=0 (a tuning build) launches the normalised sigmoid's general kernel for that shape too.
#ifndef BITEP_ROUTER_FWD_V3
#define BITEP_ROUTER_FWD_V3 1
#endif

// A kernel's score path: its spec's constants, or the parameters' (kAny). By `if constexpr`, so the
// any-path kernels compile to the PTX they had before the specs (compared): conditional expressions in
// their place (kKnown ? constant : parameter) changed ptxas's register allocation at 8 octets a lane
// (245 -> 215 registers) and made the E = 2048 rows 5-9% slower.
template <FwdSpec kSpec>
__device__ __forceinline__ ScoreFn spec_fn(const RouterForwardParams& p) {
  if constexpr (kSpec == FwdSpec::kAny) return p.score_fn;
  return sigmoid_norm_spec(kSpec) ? ScoreFn::kSigmoid : ScoreFn::kSoftmax;
}
template <FwdSpec kSpec>
__device__ __forceinline__ ScorePath spec_path(const RouterForwardParams& p) {
  // {aux, softmax, pre, post, norm}
  if constexpr (kSpec == FwdSpec::kAny) return score_path(p);
  if constexpr (kSpec == FwdSpec::kPostSoftmax) return kPostSoftmaxPath;
  if constexpr (kSpec == FwdSpec::kPreSoftmax) return ScorePath{false, true, true, false, false};
  return ScorePath{false, false, false, false, true};
}
template <FwdSpec kSpec>
__device__ __forceinline__ bool spec_bias(const RouterForwardParams& p) {
  if constexpr (kSpec == FwdSpec::kAny) return selection_bias(p);
  if constexpr (kSpec == FwdSpec::kSigmoidNorm) return p.expert_bias != nullptr;
  if constexpr (kSpec == FwdSpec::kSigmoidNormV3) return true;
  return false;
}

#ifndef BITEP_ROUTER_FWD_V3_STAGED
#define BITEP_ROUTER_FWD_V3_STAGED 1
#endif
// BITEP_ROUTER_FWD_SAVED_LATE (a tuning build): -1 the launch's rule (router_topk_bucket.cuh saved_row_late, passed as
// FwdLayout::saved_late), 0 the pre-top-k softmax's staged saved row always right after the softmax (compiled in, no
// flag), 1 always at the tile's end. DeepSeek-V3's staged instance stores it right after its sigmoid in every build.
#ifndef BITEP_ROUTER_FWD_SAVED_LATE
#define BITEP_ROUTER_FWD_SAVED_LATE -1
#endif

// The shapes whose post-top-k softmax kernel has a wide-stores instance (the kernel's wide_unselected), for
// launches that write probs or saved: where it measured faster (H200: bf16 logits at E = 64 and 128, the stores
// before the row's work, 4-10%; E = 512 in both dtypes, after it, bf16 5%, fp32 1.4-1.9%). fp32 logits at E = 64-256
// (0.6-2.8% slower), bf16 at E = 256 and E = 2048 measured even or slower, E = 1024 was not measured; a launch
// without probs and saved (compact outputs) takes the other instance, whose code is the kernel without the stores
// (the wide one measured 4% slower there at E = 512). bench/NOTES.md, "Router v11" and "v12". E 129-256 in both dtypes
// and fp32 at E 33-128, where their rows are staged (kStageRows above, with the figures: v58, v61, v63b and v84).
template <int G, int NS, bool kF32, FwdSpec kSpec>
constexpr bool wide_rows_kernel() {
  // The pre-top-k softmax's own rows (saved after the softmax, probs after the selection), at 8 lanes a token and 32
  // lanes of one octet (E = 64 and 256 exactly), with 8 blocks an SM (min_blocks): H100, 3 interleaved runs,
  // TE-compatible T = 16384 E = 256 0.964-0.970x, T = 65536 E = 64 0.963-0.975x; on those rows staged at 6 blocks
  // 0.99-1.02x, and 8 blocks unstaged 1.01x at E = 256. The normalised sigmoid's rows staged measured even at 6 blocks
  // (0.995-1.003x) and slower at 8, where they spill (1.02-1.04x); at 8 with DeepSeek-V3's values held in the stage and
  // its bias loaded late, still 20 bytes spilled (bf16) and even (0.985-1.019x) (bench/NOTES.md, "Router v71", "v72"
  // and "v75"). DeepSeek-V3's staged instance is the dense rows' and the map's alone (dense_only_kernel): without the
  // compact outputs' code it fits 8 blocks without a spill (v77): H100, 3 interleaved runs, TE-compatible T = 16384
  // bf16 0.98-0.99x, fp32 1.00-1.01x slower (bitmap 23.17 -> 23.46 us), T = 65536 even; so bf16 alone.
  // BITEP_ROUTER_FWD_V3_STAGED=0 (a tuning build) keeps it unstaged.
  if (kSpec == FwdSpec::kPreSoftmax) return kStageRows && NS == 1 && (G == 8 || G == 32);
  if (kSpec == FwdSpec::kSigmoidNormV3) return kStageRows && !kF32 && BITEP_ROUTER_FWD_V3_STAGED != 0;
  if (!holders_spec(kSpec) || !kWideStores) return false;
  if (G == 32) return NS == 2 || (NS == 1 && kStageRows);
  if (kF32)
    return (G == 8 || G == 16) && NS == 1 && kStageRows;  // below 32 lanes, fp32 where its rows are staged alone
  return NS == 1 || (G == 8 && NS == 2);
}

// The wide-rows instances for launches that write the dense rows (probs, saved) and the map alone, TE's outputs: no
// compact outputs and no dispatch-layout epilogue compiled in (kDenseOnly in the kernel; the launch's condition in
// router_topk_bucket.cuh launch_bucket_t). DeepSeek-V3's staged instance: ptxas (sm_90, nvcc 13.0) spilled 20 bytes
// at 8 blocks' 32 registers with its values in the stage (v75), 4 without the compact outputs' code (bf16), none
// without the epilogue's too.
template <FwdSpec kSpec>
constexpr bool dense_only_kernel() {
  return kSpec == FwdSpec::kSigmoidNormV3;
}

// The kernels whose compact outputs (ascending expert order) go through a stage in the dynamic shared memory, a uint2
// (expert, weight) a place: [warps][tokens of the warp][k], at FwdLayout::compact_at. Not the post-top-k softmax's
// holders, which store their own weight at its place.
template <FwdSpec kSpec>
constexpr bool compact_stage_kernel() {
  return !holders_spec(kSpec);
}

// float4s of shared memory the kernel stages its dense rows in (kStaged in the kernel: the wide-stores instances at 8
// lanes a token, fp32's at 16 lanes of one octet, those at 32 lanes of one octet, and bf16's at 32 lanes of two):
// [warps][probs, saved][tokens of the warp x E floats]; 1 where it stages nothing.
template <int G, int NS, bool kF32, bool kWideRows>
constexpr int staged_float4s() {
  return kWideRows && kStageRows &&
                 (G == 8 || (G == 16 && NS == 1 && kF32) || (G == 32 && (NS == 1 || (NS == 2 && !kF32))))
             ? kBucketThreads / kWarpSize * 2 * 64 * NS
             : 1;
}

// The spec kernels with an instance for a fixed k (the rounds unrolled: no loop counter, branch or refill test in the
// last round): k = 8 at one octet a lane at 16 and 32 lanes a token and two at 32 (E 65-128, 129-256, 257-512), where
// k = 8 is the common case (the benchmark's E = 128, 256, DeepSeek-V3 and 512 rows), and k = 6 at 8 lanes a token
// (E 33-64, the issue's E = 64 rows; router v63 on the H100: 0.86-0.93x on the T = 65536 compact rows, the
// TE-compatible ones even). BITEP_ROUTER_FWD_KCONST=0 (a tuning build) compiles none.
#ifndef BITEP_ROUTER_FWD_KCONST
#define BITEP_ROUTER_FWD_KCONST 1
#endif
template <int G, int NS, FwdSpec kSpec>
constexpr int kconst_kernel() {
  if (BITEP_ROUTER_FWD_KCONST == 0 || kSpec == FwdSpec::kAny) return 0;
  if (G == 8 && NS == 1) return 6;
  return (G == 32 && NS <= 2) || (G == 16 && NS == 1) ? 8 : 0;
}

// The post-top-k softmax at E 65-256 (the buckets of one octet a lane at 16 and 32 lanes a token) runs at half the
// lanes and two octets a lane, so a round's reductions and a tile's fixed work serve twice the tokens: four a warp at
// E 65-128 (8 lanes), two at E 129-256 (16). For k = 8 (its instances are compiled for k = 8), where it measured
// faster: the compact outputs (no probs nor saved) of bf16 logits, and of fp32 logits at E 129-256; and, at E = 128
// with bf16 logits and probs and saved 16-byte aligned, the wide-stores instance, whose dense rows are staged in shared
// memory and stored whole. H200, two interleaved runs (bench/NOTES.md, "Router v31", "v32" and "v33"): E = 128 bf16
// T = 65536 TE-compatible bitmap 31.01 -> 28.58 us (0.92x), compact 0.85-0.88x; E = 256 compact bf16 0.83-0.87x at T =
// 65536, 0.91-0.94x at T = 16384, fp32 0.90-0.92x and 0.96-0.97x. Not taken, where it measured slower or even: without
// the wide stores the E = 128 bf16 TE-compatible rows were 1.07-1.10x; at E = 256 with the wide stores (unstaged at 16
// lanes) 0.98-1.02x; fp32 at E = 128 1.00-1.09x (compact and TE-compatible). So the other shapes keep the bucket's
// lanes, and so does k != 8 (the holders need k <= the lanes, and a runtime-k instance took 48 registers; not
// measured). And so do fewer tokens than 2 blocks of 32 an SM (p.two_octet_min_tokens, by default 64 x the SMs: 8448
// on 132): at E = 128 T = 4096 (128 blocks, one an SM at most) the four-token grid was 1.03-1.08x slower, at T = 16384
// (3.9 an SM) 0.95-0.99x (rows between, and E = 256 below T = 16384, not measured). BITEP_ROUTER_FWD_TWO_OCTETS=0 (a
// tuning build) keeps the bucket's lanes everywhere.
#ifndef BITEP_ROUTER_FWD_TWO_OCTETS
#define BITEP_ROUTER_FWD_TWO_OCTETS 1
#endif
inline bool two_octet_post(const RouterForwardParams& p, int sms) {
  if (BITEP_ROUTER_FWD_TWO_OCTETS == 0 || !kHolderSoftmax || p.topk != 8) return false;
  const bool f32 = p.logits_dtype == DType::kF32;
  if (!f32 && p.logits_dtype != DType::kBF16) return false;
  if (p.num_tokens < (p.two_octet_min_tokens >= 0 ? p.two_octet_min_tokens : int64_t{64} * sms)) return false;
  const bool compact = p.probs == nullptr && p.saved == nullptr;
  if (f32) return compact && p.num_experts > 128;
  return compact || (kWideStores && p.num_experts == 128 && aligned16(p.probs) && aligned16(p.saved));
}

// The post-top-k softmax at 32 lanes a token (E 129-2048) takes its many-wins instance (more keys cached a lane:
// cache_size) from many_wins_min_topk(E, fp32 logits) (router_params.h) on: k rounds over 32 lanes of 8 to 64 experts
// each, and the more rounds the more lanes run dry and rescan their keys while the warp waits; below it the longer
// first scan costs more than it saves. p.many_wins_min_topk (>= 0) moves the threshold (tests, tuning). H200, T =
// 65536, on the fp32 and bf16, TE-compatible and compact bitmap rows (bench/NOTES.md, "Router v45" and "v46"):
// - E = 2048, 6 keys over 4: k = 8 1.00-1.29x, 12 1.00-1.20x, 16 0.99-1.08x, 20 0.96-1.02x, 21 0.93-1.00x (fp32
//   compact 0.93x, the others within 0.2%), 22 0.91-1.00x, 23 0.88-1.00x, 24 0.86-1.00x, 32 0.72-1.00x.
// - E = 1024, 4 keys over 3, fp32 rows: k = 8 1.02-1.05x, 16 0.95-0.99x, 20 0.92-0.96x, 22-28 0.86-0.93x, 32
//   0.83-0.84x; bf16 rows: k = 8 1.01-1.21x, 16 1.06-1.11x, 20 1.07x, 22 1.04-1.06x, 24 1.03-1.05x, 26 1.01-1.04x, 28
//   0.99-1.03x, 29 TE-compatible 1.02x and compact 0.98x, 30 1.01x and 0.97x, 31 1.00x and 0.96x, 32 0.95-0.99x.
// - E = 512, 4 keys over 2: k = 8 1.00x (the instance for k = 8 takes most rows), 10 1.00-1.02x, 12 0.95-1.00x, 14
//   0.90-1.00x, 16 0.85-1.00x, 20 0.76-0.95x (bf16 TE-compatible is the row that gains least).
// - E = 256, 4 keys over 2: k = 10 1.04-1.12x (fp32), 1.01x (bf16); 12 fp32 compact 1.07x, the others 0.99-1.00x; 14
//   fp32 compact 1.02x, the others 0.97x; 16 0.93-0.98x; 20 0.88-0.92x.
inline bool many_wins_post(const RouterForwardParams& p) {
  const int from = p.many_wins_min_topk >= 0 ? p.many_wins_min_topk
                                             : many_wins_min_topk(p.num_experts, p.logits_dtype == DType::kF32);
  return p.topk >= from;
}

// The instances for E a multiple of 8 below the bucket's width (kOctets in the kernel): the pre-top-k softmax's and the
// normalised sigmoid's one-pass kernels (one octet a lane, and two for bf16 logits), whose whole tiles then take each
// lane's slots as whole octets or none. Without them such an E ran the general body, whose per-element tests split the
// lanes with an octet from those without (a branch each side of the keys, the loads and the stores): GLM-4.5 and
// DeepSeek-V2 (160 experts, 20 of 32 lanes), Kimi K2 (384, 48 of 64 slots). BITEP_ROUTER_FWD_OCTETS=0 (a tuning
// build) compiles none; BITEP_ROUTER_WHOLE_OCTETS=0 in the environment (RouterForwardParams::whole_octets) launches
// none.
#ifndef BITEP_ROUTER_FWD_OCTETS
#define BITEP_ROUTER_FWD_OCTETS 1
#endif
template <int NS, bool kF32, FwdSpec kSpec, bool kWideRows>
constexpr bool whole_octets_kernel() {
  return BITEP_ROUTER_FWD_OCTETS != 0 && (kSpec == FwdSpec::kPreSoftmax || kSpec == FwdSpec::kSigmoidNorm) &&
         !kWideRows && (NS == 1 || (NS == 2 && !kF32));
}
template <int G, int NS>
inline bool whole_octets(const RouterForwardParams& p) {
  return p.whole_octets && p.num_experts % 8 == 0 && p.num_experts < 8 * G * NS;
}

// The keys a lane of the forward kernel's instance caches (cache_size): the kernel's C, last_router_forward_cache's
// answer.
template <int G, int NS, FwdSpec kSpec, bool kManyWins>
constexpr int fwd_cache_size() {
  return cache_size<8 * NS, G, sigmoid_norm_spec(kSpec), kSpec == FwdSpec::kPostSoftmax, kManyWins>();
}

// The bf16 post-top-k kernel at one octet a lane and 32 lanes a token (E 129-256) takes its k = 8 instance only
// for the compact outputs (below two_octet_post's token count; from it on those take 16 lanes of two octets): with
// probs or saved written it measured 4-8% slower (H200, v13 A/B: T = 65536 TE-compatible 52.2 -> 56.5 us), without them
// 7-10% faster (T = 65536 52.3 -> 47.1).
template <int G, int NS, bool kF32, FwdSpec kSpec>
constexpr bool kconst_compact_only() {
  return !kF32 && kSpec == FwdSpec::kPostSoftmax && G == 32 && NS == 1;
}

}  // namespace
}  // namespace bitep::kernels
