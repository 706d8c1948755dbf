/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bitep: Mixture-of-Experts expert parallelism over NCCL, driven by a bitmap routing map.
 *
 * One C API, opaque handles, every call returns bitepResult_t. Formats (all row-major, contiguous):
 *   T = tokens on this rank, E = experts, k = top-k, W = EP ranks, L = E / W, H = hidden size.
 *   logits      [T, E]  fp32 | bf16 | fp16 (all arithmetic is fp32)
 *   probs       [T, E]  fp32, routed weight where routed, 0 elsewhere
 *   topk        [T, k]  fp32 weights / int32 indices, ascending expert order
 *   BYTEMAP     [T, E]  uint8 in {0, 1}
 *   BITMAP_U8   [T, ceil(E/8)] uint8, bit (e % 8) of byte (e / 8), LSB first, pad bits 0
 *               (byte-for-byte TransformerEngine's NVTE_ROUTING_MAP_FORMAT_BITMAP_U8)
 *   rank mask   [T, ceil(W/8)] uint8, BITMAP_U8 over ranks: bit r set iff the token routes to rank r
 * Rank r owns experts [r*L, (r+1)*L).
 *
 * Backends: bitepBackendCuda (pointers are memory of the device the call runs on, managed memory too: the current
 * device for the router, the group's device for a group's calls; work is enqueued on the given stream) and
 * bitepBackendHost (pointers are host memory, work runs synchronously on the calling thread; the
 * stream argument is ignored). Both give the same maps, indices, counts and layouts bit for bit (for a dispatch, from
 * valid routing: see bitepDispatchArgs_t's routing_map).
 *
 * Errors: on failure, bitepGetLastError() returns the thread's detail: the argument, the constraint,
 * the failing call with file:line. The library never exits, never aborts, and never writes outside a
 * buffer it was given.
 * A collective call's failure that every rank learns of (a dispatch's count exchange, a host group's agreement) fails
 * every rank, and the group works on. A failure one rank has alone (a cuda group's combine, backward pass or
 * low-latency dispatch refused by its checks or by a capturing stream; bitepDispatch refused while capturing or failing
 * after its count exchange; on any group, a failure after the agreement, such as a host allocation) leaves the peers
 * inside the call, which this rank's next call would meet out of turn: at
 * W > 1 its group is unusable from then on (each later call returns bitepInvalidUsage naming the failed call), and the
 * peers' groups once they time out in it. Destroy the group on every rank and create a new one. After a call returned
 * bitepTimeout, its transfers may still complete into or out of the buffers it was given (a matched MPI receive cannot
 * be cancelled; a stalled peer's NCCL or window stores may land late): keep them until the group is destroyed.
 *
 * Threads:
 * - The router calls (bitepRouter*, bitepAuxScores*, bitepAuxLoss*) may run on any number of threads at once, each
 *   call on its own buffers. The last-error detail is per thread.
 * - A group takes one call at a time. bitepDispatch, bitepDispatchLowLatency, bitepCombine, bitepDispatchBackward,
 *   bitepCombineBackward, bitepHandleGetExpertSources, bitepGroupMemoryBytes, bitepGroupTrimMemory,
 *   bitepGroupLowLatencyCapturable and bitepGroupDestroy on a group while another thread is inside one of them on
 *   the same group return bitepInvalidUsage, naming the call inside, and change nothing (the call inside goes on).
 *   One after another, from any threads, they are fine. bitepGroupGetRank, bitepHandleGetLayout and
 *   bitepHandleDestroy may be called at any time; a handle must not be destroyed while a call that was given it runs.
 * - Different groups: host backend, any threads at once (MPI permitting, below). cuda backend: the kernels of a
 *   group's calls wait on the GPU for its peers (NCCL's, and the peer window's barriers), so groups over the same GPUs
 *   follow NCCL's rule for communicators: make their calls in the same order on every rank (for instance from one
 *   thread per GPU, in the same program order everywhere; a lock alone does not order them alike across ranks). Calls
 *   of two such groups that overlap in different orders on different ranks can deadlock. Groups over disjoint GPUs
 *   are independent.
 * - cuda backend: each call makes the group's device current for its duration and restores the caller's.
 * - MPI: bitepGroupCreateMpi, and every call of a group whose transport is MPI (host backend;
 *   BITEP_CUDA_TRANSPORT=ipc), make MPI calls on the calling thread. bitep refuses such a call (bitepInvalidUsage,
 *   before any MPI call) from a thread other than MPI's main thread below MPI_THREAD_SERIALIZED, below
 *   MPI_THREAD_MULTIPLE while another thread is inside such a call on another group, and after MPI_Finalize
 *   (bitepGroupDestroy then still frees the group, without MPI). The cuda backend's NCCL groups make MPI calls only
 *   while bitepGroupCreateMpi runs.
 * - A collective call refused this way on one rank, while its peers make it, leaves them inside it: the next call
 *   on that group must be the same call again (the group is then as before). Host groups catch a different call on
 *   the same handle (every rank fails naming both calls); any other order is the caller's error (MPI's rule for
 *   collectives). bitepGroupCreateMpi refused on one rank (or never called there) fails its peers with bitepTimeout
 *   after config->timeout_s, and leaves a duplication of comm in flight until that rank calls it: retry over a fresh
 *   communicator (a second call over comm would start another duplication, which the late rank's call cannot match).
 * - A call that fails with bitepTimeout on a group whose transport is MPI leaves its sends to MPI: a late peer may
 *   still read the buffers they came from (bitep's own are never freed again, but a host group's rank-major combine
 *   sends from the caller's y). Keep such buffers alive after that failure, or end the process.
 */
#ifndef BITEP_BITEP_H_
#define BITEP_BITEP_H_

#include <stddef.h>
#include <stdint.h>

#define BITEP_MAJOR 0
#define BITEP_MINOR 1
#define BITEP_PATCH 0
#define BITEP_VERSION(X, Y, Z) ((X)*10000 + (Y)*100 + (Z))
#define BITEP_VERSION_CODE BITEP_VERSION(BITEP_MAJOR, BITEP_MINOR, BITEP_PATCH)

#if defined(_WIN32)
#define BITEP_API
#else
#define BITEP_API __attribute__((visibility("default")))
#endif

/* The enums hold any int, as C stores them. In C++ their underlying type is fixed to int, so that a value the caller
 * stored outside the enumerators (which bitep refuses with bitepInvalidArgument, naming it) is still a value of the
 * type: without a fixed type, reading one is undefined behaviour in C++ (UBSan: "not a valid value for type"). */
#ifdef __cplusplus
#define BITEP_ENUM_INT : int
#else
#define BITEP_ENUM_INT
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Binary-compatible with cudaStream_t and ncclComm_t, without including their headers. */
struct CUstream_st;
typedef struct CUstream_st* bitepStream_t;
struct ncclComm;

typedef enum BITEP_ENUM_INT {
  bitepSuccess = 0,
  bitepInvalidArgument = 1,  /* an argument breaks a documented constraint (see bitepGetLastError) */
  bitepInvalidUsage = 2,     /* calls in the wrong order, handle of a destroyed group, ... */
  bitepCudaError = 3,        /* a CUDA runtime call failed */
  bitepNcclError = 4,        /* an NCCL call failed, or a peer failed */
  bitepMpiError = 5,         /* an MPI call failed */
  bitepOutOfMemory = 6,      /* an allocation failed */
  bitepCapacityExceeded = 7, /* a caller-provided buffer is smaller than the traffic needs */
  bitepNotSupported = 8,     /* the build or the device lacks what the call needs */
  bitepTimeout = 9,          /* a peer did not answer within the group's timeout */
  bitepRemoteError = 10,     /* another rank failed the same collective call */
  bitepInternalError = 11,   /* a bug in bitep: please report it with bitepGetLastError() */
  bitepNumResults = 12
} bitepResult_t;

typedef enum BITEP_ENUM_INT { bitepFloat32 = 0, bitepBfloat16 = 1, bitepFloat16 = 2 } bitepDataType_t;

typedef enum BITEP_ENUM_INT { bitepBackendHost = 0, bitepBackendCuda = 1 } bitepBackend_t;

typedef enum BITEP_ENUM_INT {
  bitepScoreSoftmax = 0,     /* softmax over all experts (pre top-k) or over the k selected (post) */
  bitepScoreSigmoid = 1,     /* sigmoid; weights normalised over the k selected when k > 1 */
  bitepScoreSqrtSoftplus = 2 /* sqrt(softplus(x)); weights normalised when k > 1 */
} bitepScoreFunction_t;

typedef enum BITEP_ENUM_INT {
  bitepMapNone = 0,       /* no routing map (output not wanted) */
  bitepMapBytemap = 1,    /* uint8 [T, E] in {0, 1} */
  bitepMapBitmapU8 = 2,   /* uint8 [T, ceil(E/8)], LSB first */
  bitepMapTopkIndices = 3 /* int32 [T, k], distinct experts (dispatch input only) */
} bitepMapFormat_t;

/* Returns the name of the code and a hint. Never NULL. */
BITEP_API const char* bitepGetErrorString(bitepResult_t result);

/* Returns the detail of the last failure on the calling thread ("" if none). Never NULL; the text
 * stays valid until the thread's next failing bitep call. */
BITEP_API const char* bitepGetLastError(void);

/* [OUT] version: BITEP_VERSION_CODE of the library. */
BITEP_API bitepResult_t bitepGetVersion(int* version);

/* Whether this build has the cuda backend ([OUT] available = 1) and a CUDA device is visible. */
BITEP_API bitepResult_t bitepCudaAvailable(int* available);

/* ------------------------------------------------------------------------------------------------
 * Router: fused score function + (group-limited) top-k, writing the routing map straight as a
 * bitmap or a bytemap. Feature parity with TransformerEngine's fused router, forward and backward.
 * ---------------------------------------------------------------------------------------------- */

/* Launch flags: the args' launch_flags of the router's and the aux loss's calls, a bitwise OR of these (0: none).
 * BITEP_LAUNCH_PDL (cuda backend, sm_90 and later; ignored below sm_90 and by the host backend): the call's kernels are
 * launched with programmatic stream serialization (programmatic dependent launch), so a kernel may start while the
 * kernel before it on the stream still runs. Each waits (griddepcontrol.wait) for that kernel to complete, its memory
 * visible, before it reads or writes any buffer, and lets the kernel after it launch early (launch_dependents): a
 * kernel that the caller launches after this call with the same attribute must wait in turn before it reads this
 * call's outputs (as every kernel launched so must). Where the kernel before is still running, the launch and the
 * blocks' start overlap its end. With rank_counts set, the forward clears them by a memset first: the kernel then
 * follows that. Any other bit: bitepInvalidArgument. */
#define BITEP_LAUNCH_PDL 0x1

#define BITEP_ROUTER_CONFIG_MAGIC 0xb17e0001u

typedef struct {
  size_t size;     /* sizeof(bitepRouterConfig_t) */
  unsigned magic;  /* BITEP_ROUTER_CONFIG_MAGIC */
  int num_experts; /* E >= 1 */
  int topk;        /* 1 <= k <= E */
  bitepScoreFunction_t score_function;
  int use_pre_softmax;  /* softmax only: 1 = softmax over all E then top-k (exps below FLT_MIN are 0, on both
                           backends: such probabilities tie, the lower experts first); 0 = top-k on logits then
                           softmax */
  int num_groups;       /* 0 = no group-limited routing; else E % num_groups == 0 */
  int group_topk;       /* groups kept, 1 <= group_topk <= num_groups, group_topk <= k (0 when num_groups == 0);
                           group_topk == num_groups (1 of 1 among them) keeps every group: routing without groups */
  float scaling_factor; /* multiplies the routed weights */
  bitepDataType_t logits_dtype;
} bitepRouterConfig_t;

#define BITEP_ROUTER_CONFIG_INIT \
  { sizeof(bitepRouterConfig_t), BITEP_ROUTER_CONFIG_MAGIC, 0, 1, bitepScoreSoftmax, 0, 0, 0, 1.0f, bitepFloat32 }

#define BITEP_ROUTER_FWD_ARGS_MAGIC 0xb17e0002u

typedef struct {
  size_t size;                 /* sizeof(bitepRouterForwardArgs_t) */
  unsigned magic;              /* BITEP_ROUTER_FWD_ARGS_MAGIC */
  int64_t num_tokens;          /* T >= 0; T = 0 returns at once */
  const void* logits;          /* [IN]  [T, E] logits_dtype */
  const float* expert_bias;    /* [IN]  [E] fp32 or NULL; sigmoid/sqrtsoftplus only, added for selection only */
  float* probs;                /* [OUT] [T, E] fp32 or NULL */
  void* routing_map;           /* [OUT] [T, E] BYTEMAP or [T, ceil(E/8)] BITMAP_U8, or NULL */
  bitepMapFormat_t map_format; /* bitepMapBytemap | bitepMapBitmapU8 (bitepMapNone when routing_map is NULL) */
  float* topk_weights;         /* [OUT] [T, k] fp32 or NULL, ascending expert order */
  int32_t* topk_indices;       /* [OUT] [T, k] int32 or NULL, ascending */
  float* saved;                /* [OUT] [T, E] fp32 tensor for the TE-compatible backward, or NULL (recompute mode) */
  /* Dispatch layout epilogue (optional): per-token rank masks and per-rank token counts. */
  int num_ranks;        /* W, 0 = no epilogue; E % W == 0 */
  uint8_t* rank_mask;   /* [OUT] [T, ceil(W/8)] BITMAP_U8 over ranks, or NULL */
  int32_t* rank_counts; /* [OUT] [W] tokens per destination rank (overwritten, not accumulated), or NULL */
  int launch_flags;     /* 0 or BITEP_LAUNCH_PDL */
} bitepRouterForwardArgs_t;

#define BITEP_ROUTER_FWD_ARGS_INIT                                                                                \
  {                                                                                                               \
    sizeof(bitepRouterForwardArgs_t), BITEP_ROUTER_FWD_ARGS_MAGIC, 0, NULL, NULL, NULL, NULL, bitepMapNone, NULL, \
        NULL, NULL, 0, NULL, NULL, 0                                                                              \
  }

/* Router forward. Every row of the map gets exactly k distinct experts whatever the logits: ties go to
 * the lower expert index, NaN ranks lowest. Not collective. cuda backend: asynchronous on stream; all
 * pointers device memory. Output buffers must not overlap each other or the inputs. The router calls may be
 * captured into a CUDA graph (stream capture, any mode): each launch reads the logits its buffers hold then. */
BITEP_API bitepResult_t bitepRouterForward(bitepBackend_t backend,
                                           const bitepRouterConfig_t* config,
                                           const bitepRouterForwardArgs_t* args,
                                           bitepStream_t stream);

#define BITEP_ROUTER_BWD_ARGS_MAGIC 0xb17e0003u

typedef struct {
  size_t size;                 /* sizeof(bitepRouterBackwardArgs_t) */
  unsigned magic;              /* BITEP_ROUTER_BWD_ARGS_MAGIC */
  int64_t num_tokens;          /* T >= 0 */
  const float* grad_probs;     /* [IN]  [T, E] fp32 */
  const void* routing_map;     /* [IN]  the forward's map */
  bitepMapFormat_t map_format; /* bitepMapBytemap | bitepMapBitmapU8 */
  const float* saved;          /* [IN]  [T, E] the forward's saved tensor, or NULL to recompute from logits */
  const void* logits;          /* [IN]  [T, E] logits_dtype; required when saved is NULL, else ignored */
  void* grad_logits;           /* [OUT] [T, E] logits_dtype */
  int launch_flags;            /* 0 or BITEP_LAUNCH_PDL */
} bitepRouterBackwardArgs_t;

#define BITEP_ROUTER_BWD_ARGS_INIT \
  { sizeof(bitepRouterBackwardArgs_t), BITEP_ROUTER_BWD_ARGS_MAGIC, 0, NULL, NULL, bitepMapNone, NULL, NULL, NULL, 0 }

/* Router backward: grad_probs -> grad_logits. Exactly one of saved / logits is used: saved when it is
 * not NULL (TE-compatible), else logits (recompute mode). Not collective; asynchronous on stream. */
BITEP_API bitepResult_t bitepRouterBackward(bitepBackend_t backend,
                                            const bitepRouterConfig_t* config,
                                            const bitepRouterBackwardArgs_t* args,
                                            bitepStream_t stream);

/* Aux-loss scores (TE's fused_compute_score_for_moe_aux_loss): scores over all experts (softmax, or
 * sigmoid/sqrtsoftplus normalised over all E when k > 1) and their top-k routing map. config's
 * use_pre_softmax, groups and scaling are not used. In args: logits, probs (= the scores,
 * required), routing_map/map_format (optional), saved (optional). Other outputs, and expert_bias, must be NULL. */
BITEP_API bitepResult_t bitepAuxScoresForward(bitepBackend_t backend,
                                              const bitepRouterConfig_t* config,
                                              const bitepRouterForwardArgs_t* args,
                                              bitepStream_t stream);

/* Backward of bitepAuxScoresForward: grad_probs (= grad of the scores) -> grad_logits, from saved or
 * (recompute) logits. routing_map is not needed and ignored. */
BITEP_API bitepResult_t bitepAuxScoresBackward(bitepBackend_t backend,
                                               const bitepRouterConfig_t* config,
                                               const bitepRouterBackwardArgs_t* args,
                                               bitepStream_t stream);

#define BITEP_AUX_LOSS_ARGS_MAGIC 0xb17e0004u

typedef struct {
  size_t size;                      /* sizeof(bitepAuxLossArgs_t) */
  unsigned magic;                   /* BITEP_AUX_LOSS_ARGS_MAGIC */
  int64_t num_tokens;               /* rows of probs on this rank, >= 0 */
  int num_experts;                  /* E >= 1 */
  int topk;                         /* 1 <= k <= E */
  int64_t total_num_tokens;         /* tokens over the whole batch (all ranks), >= 1 */
  float coeff;                      /* aux loss coefficient */
  const float* probs;               /* [IN] [T, E] fp32 scores */
  const int32_t* tokens_per_expert; /* [IN] [E] */
  float* loss;                      /* [OUT] [1]   forward */
  const float* grad_loss;           /* [IN]  [1]   backward */
  float* grad_probs;                /* [OUT] [T, E] backward */
  int launch_flags;                 /* 0 or BITEP_LAUNCH_PDL */
} bitepAuxLossArgs_t;

#define BITEP_AUX_LOSS_ARGS_INIT \
  { sizeof(bitepAuxLossArgs_t), BITEP_AUX_LOSS_ARGS_MAGIC, 0, 0, 0, 0, 0.0f, NULL, NULL, NULL, NULL, NULL, 0 }

/* loss = C * sum_e tokens_per_expert[e] * sum_t probs[t, e], C = E * coeff / (k * N * N), N = total_num_tokens.
 * Deterministic: fixed reduction order, no float atomics. Reads probs, tokens_per_expert; writes loss. */
BITEP_API bitepResult_t bitepAuxLossForward(bitepBackend_t backend,
                                            const bitepAuxLossArgs_t* args,
                                            bitepStream_t stream);

/* grad_probs[t, e] = C * tokens_per_expert[e] * grad_loss[0]. */
BITEP_API bitepResult_t bitepAuxLossBackward(bitepBackend_t backend,
                                             const bitepAuxLossArgs_t* args,
                                             bitepStream_t stream);

/* ------------------------------------------------------------------------------------------------
 * Expert parallelism: an EP group of W ranks; dispatch moves each token once to every rank that owns
 * one of its experts, combine brings the expert outputs back weighted by the router.
 * ---------------------------------------------------------------------------------------------- */

typedef struct bitepGroup* bitepGroup_t;
typedef struct bitepHandle* bitepHandle_t;

#define BITEP_GROUP_CONFIG_MAGIC 0xb17e0010u

typedef struct {
  size_t size;            /* sizeof(bitepGroupConfig_t) */
  unsigned magic;         /* BITEP_GROUP_CONFIG_MAGIC */
  bitepBackend_t backend; /* bitepBackendCuda (NCCL) or bitepBackendHost (MPI) */
  int num_experts;        /* E >= 1, E % W == 0 */
  int topk;               /* 1 <= k <= E */
  int hidden;             /* H >= 1 elements per token row */
  bitepDataType_t dtype;  /* token dtype of x, expert rows and out */
  int expert_alignment;   /* each expert's block of the expert-major view is rounded up to this many rows (1 to 2^20) */
  double timeout_s;       /* a failed or stalled peer yields bitepTimeout after this many seconds (> 0) */
  int device;             /* cuda: device ordinal; -1 = local rank on the node (MPI) or the current device */
  /* Low-latency mode (bitepDispatchLowLatency): the most tokens a rank passes to one low-latency dispatch,
   * in [0, 65536], the same on every rank; 0 = no low-latency dispatches. Where the group has a peer window
   * the group reserves a second, fixed symmetric buffer for them at creation, about
   * 2 * W * max_tokens * (2 * H * dtype size + ceil(L / 8) + 8 * min(k, L)) bytes, never grown. */
  int low_latency_max_tokens;
} bitepGroupConfig_t;

#define BITEP_GROUP_CONFIG_INIT \
  { sizeof(bitepGroupConfig_t), BITEP_GROUP_CONFIG_MAGIC, bitepBackendCuda, 0, 1, 0, bitepBfloat16, 1, 300.0, -1, 0 }

#define BITEP_UNIQUE_ID_BYTES 128
typedef struct {
  char internal[BITEP_UNIQUE_ID_BYTES];
} bitepUniqueId;

/* [OUT] id: a new NCCL unique id for bitepGroupCreateFromUniqueId. Call on one rank, distribute. */
BITEP_API bitepResult_t bitepGetUniqueId(bitepUniqueId* id);

/* Creates a cuda-backend group over a new NCCL communicator. Collective over the nranks ranks.
 * Checks collectively that every rank passed the same E, k, H, dtype and W; on a mismatch every rank
 * fails with a message naming the field and the ranks. [OUT] group.
 * The communicators bitep creates (here and in bitepGroupCreateMpi) are non-blocking, every NCCL call
 * polled against timeout_s. Environment BITEP_NCCL_BLOCKING=1 makes them blocking: each call is
 * enqueued on the caller's thread (~15-20 us less host time per call), but NCCL's init, connection
 * setup and ncclCommFinalize (bitepGroupDestroy) then wait for the peers without a timeout.
 * Peer window: when every rank is in one NVLink domain (NCCL's load/store team), the group also
 * registers an NCCL symmetric-memory window per rank (collective, here), and the dispatches' count
 * exchange, rows, maps and weights and the combines' partial rows are stored straight into the peers'
 * windows between flag barriers instead of going through NCCL's collectives. Environment: BITEP_LSA=0
 * turns it off (so does NCCL_P2P_DISABLE=1); BITEP_LSA_EXCHANGE=0 keeps NCCL for the count exchange,
 * BITEP_LSA_DISPATCH=0 the split all-to-all for large dispatches (above BITEP_SPLIT_MIN_BYTES of rows),
 * BITEP_LSA_SMALL=0 NCCL's all-to-all for small dispatches and their combines. A peer that never reaches
 * one of the window's barriers (failed, stalled) ends the wait after timeout_s: that call's received rows
 * are then incomplete and the group's next dispatch or combine fails with bitepTimeout. */
BITEP_API bitepResult_t bitepGroupCreateFromUniqueId(
    const bitepUniqueId* id, int nranks, int rank, const bitepGroupConfig_t* config, bitepGroup_t* group);

/* Creates a cuda-backend group over the caller's communicator, which stays the caller's: bitep never
 * destroys or aborts it. Collective over comm; same checks as above, but for two that fail on the rank alone, before
 * any collective step (its peers then wait in the group's agreement until their timeout): comm NULL, and a current
 * device that is not comm's device. config->device is not used: the group runs on comm's device. No peer window unless
 * BITEP_LSA=1 (then bitepGroupDestroy is collective: it deregisters the window). */
BITEP_API bitepResult_t bitepGroupCreateFromNccl(struct ncclComm* comm,
                                                 const bitepGroupConfig_t* config,
                                                 bitepGroup_t* group);

/* Destroys the group and its buffer pool. Handles of the group become invalid (their later use
 * returns bitepInvalidUsage); they must still be destroyed. NULL is a no-op. Host backend and borrowed
 * NCCL communicators: local, not collective (but collective over a borrowed communicator with a peer
 * window, BITEP_LSA=1: the window is deregistered). A communicator bitep created (MPI or unique-id groups) is
 * finalised with ncclCommFinalize, which waits for the peers to destroy their groups too, up to the
 * group's timeout, after which it is aborted: destroy groups on every rank. cuda: the pool is left allocated (never
 * freed) where work queued on it may still run or be written by a peer: after a transport failure, or a call this
 * rank failed alone after queuing transfers; after one it failed alone before any (refused by its checks, say), the
 * pool is freed if the work earlier calls queued on it has finished, and left allocated otherwise. Blocks that live
 * handles hold put that choice off until the last of those handles is destroyed (bitepHandleDestroy). */
BITEP_API bitepResult_t bitepGroupDestroy(bitepGroup_t group);

/* [OUT] rank, nranks (either may be NULL). */
BITEP_API bitepResult_t bitepGroupGetRank(bitepGroup_t group, int* rank, int* nranks);

/* [OUT] bytes: memory the group holds now (its pool, fixed buffers and peer window) on this rank. */
BITEP_API bitepResult_t bitepGroupMemoryBytes(bitepGroup_t group, size_t* bytes);

/* Frees this rank's idle pool blocks: the buffers earlier calls left cached for reuse (a larger batch's, say),
 * which the pool otherwise keeps until a later miss finds them unused for 256 requests. Blocks that live
 * handles hold, and the fixed buffers (the peer windows, sized by the largest call so far), stay. Local, not
 * collective; cuda: cudaFree waits for the device. Where bitepGroupDestroy would leave the pool allocated (a
 * transport failure, a call failed alone: see there), nothing is freed (a peer may still write into its blocks).
 * [OUT] freed (may be NULL): the bytes released. */
BITEP_API bitepResult_t bitepGroupTrimMemory(bitepGroup_t group, size_t* freed);

#define BITEP_DISPATCH_ARGS_MAGIC 0xb17e0011u

typedef struct {
  size_t size;        /* sizeof(bitepDispatchArgs_t) */
  unsigned magic;     /* BITEP_DISPATCH_ARGS_MAGIC */
  int64_t num_tokens; /* T >= 0 on this rank; may differ per rank, 0 included */
  const void* x;      /* [IN] [T, H] dtype */
  /* [IN] BITMAP_U8 [T, ceil(E/8)], BYTEMAP [T, E] or int32 [T, k] indices. Each row names exactly k distinct experts
   * in [0, E) (k = the group's topk): the host backend checks every row and fails naming it; the cuda backend does not
   * read the map on the host, and takes a row's first k set bits (bitmap), first k nonzero bytes (bytemap) or its
   * distinct indices in [0, E) (indices), so a row with fewer routes to fewer experts. */
  const void* routing_map;
  bitepMapFormat_t map_format; /* bitepMapBitmapU8 | bitepMapBytemap | bitepMapTopkIndices */
  const float* probs;          /* [IN] dense [T, E] weights, or NULL */
  const float*
      topk_weights; /* [IN] compact [T, k]: weight j belongs to the j-th set bit (indices: to index j), or NULL */
  /* Optional caller-owned receive buffers; NULL = from the group's pool. A capacity too small for the
   * traffic is bitepCapacityExceeded on the rank that sees it; nothing is written past a capacity. */
  void* recv_x;              /* [capacity, H] dtype rank-major rows */
  int64_t recv_x_capacity;   /* rows */
  void* expert_x;            /* [capacity, H] dtype expert-major rows */
  int64_t expert_x_capacity; /* rows */
  /* 1: the expert-major view only. The layout then has no rank-major rows (its recv_x is NULL): this rank's own
   * rows go into expert_x straight from x, and no [R, H] buffer outlives the call, so the dispatch writes fewer
   * bytes and the handle holds R x H fewer. recv_x must be NULL. recv_map, recv_weights and recv_expert_rows
   * stay, and combines and backward passes work as with 0. Per rank: ranks may differ.
   * 0 (BITEP_DISPATCH_ARGS_INIT): both views. */
  int expert_major_only;
  /* 1: the rank-major view only, for experts that gather their rows themselves (a grouped GEMM reading recv_x
   * through the gather index of bitepHandleGetExpertSources). No expert-major rows are written: the layout's expert_x
   * is NULL, and each received row is written once, into recv_x (not also to each of its experts' rows). Everything
   * else stays: recv_x, recv_map, recv_weights, and the expert-major numbering (recv_expert_rows, expert_counts,
   * expert_offsets, num_expert_rows), so a combine of an expert-major y placed by that numbering, or of a rank-major y,
   * gives the same bits as after a dispatch with both views; so do the backward passes. expert_x must be NULL (capacity
   * 0) and expert_major_only 0; not for bitepDispatchLowLatency, which builds the expert-major view. Per rank: ranks
   * may differ. 0 (BITEP_DISPATCH_ARGS_INIT): as expert_major_only says. */
  int rank_major_only;
} bitepDispatchArgs_t;

#define BITEP_DISPATCH_ARGS_INIT                                                                                  \
  {                                                                                                               \
    sizeof(bitepDispatchArgs_t), BITEP_DISPATCH_ARGS_MAGIC, 0, NULL, NULL, bitepMapBitmapU8, NULL, NULL, NULL, 0, \
        NULL, 0, 0, 0                                                                                             \
  }

/* Dispatch. Collective over the group. Enqueued on stream; the count exchange inside is its one host
 * synchronisation. At most one of probs / topk_weights may be given; with neither, only unweighted
 * combines are possible. The ranks with tokens give weights, all of them or none (every rank fails otherwise). [OUT]
 * handle: owns the received rows and the layout until bitepHandleDestroy. Large dispatches and combines (environment
 * BITEP_SPLIT_MIN_BYTES, default 8 MiB of rows per rank) run part of their copies on a stream the group owns, beside
 * the all-to-all; that stream waits for `stream` before and `stream` waits for it after, so to the caller all the work
 * is on `stream`. */
BITEP_API bitepResult_t bitepDispatch(bitepGroup_t group,
                                      const bitepDispatchArgs_t* args,
                                      bitepStream_t stream,
                                      bitepHandle_t* handle);

/* Low-latency dispatch, for decode batches: the same arguments, routing semantics and expert-major rows as
 * bitepDispatch, with no host synchronisation. Collective over the group; needs config.low_latency_max_tokens
 * >= 1 and args->num_tokens <= it on this rank; recv_x and expert_x must be NULL (the rows live in the
 * handle). Where the group has a peer window (cuda, every rank in one NVLink domain) it is two kernels and a
 * barrier on `stream`: each token's row, map slice, weights and rank among the sender's tokens of each of its
 * experts stored into fixed slots of the ranks that own its experts (slot = source rank, token: no count
 * exchange), with each sender's per-expert counts; one flag barrier; then each rank builds its expert-major
 * view from the slots in one kernel; no host wait, so the host returns at once. At W = 1 (cuda) the same kernels run
 * over a window of the rank's own memory, without the barrier. Elsewhere (host backend, no peer window, BITEP_LSA=0) it
 * runs bitepDispatch and gives the same layout. The handle's layout: expert-major only. expert_x holds the experts'
 * blocks back to back (aligned as in bitepDispatch, pad rows zero); expert_counts and expert_offsets are on the device
 * only and are the truth: num_expert_rows is the rows expert_x has (the fast path: its fixed capacity W * max_tokens *
 * min(k, L) + L * (alignment - 1); rows past expert_offsets[L] are not written). recv_x, recv_map, recv_weights,
 * recv_expert_rows and the *_host pointers are NULL, num_recv_rows 0. bitepCombine takes the handle (expert-major y of
 * num_expert_rows rows; the same sums, in the same order, as bitepCombine after bitepDispatch), again without a host
 * wait; the backward calls return bitepNotSupported. Any number of low-latency dispatches and combines may be in flight
 * in any order (their slots alternate and every call's barrier orders them). A rank that fails its argument checks
 * returns at once and queues nothing, and its group is unusable (see Errors above): its peers then wait in the
 * barrier for the group's timeout, and their next call reports it. The fast path does not compare the ranks'
 * arguments: a rank with tokens and no weights sends weight 0 for its rows (bitepDispatch would fail every rank), so
 * give weights on every rank or on none.
 * CUDA graphs: where bitepGroupLowLatencyCapturable says so, a low-latency dispatch and the combines of its handles may
 * be captured (stream capture, any capture mode) and the graph launched any number of times: every launch moves the
 * data its input buffers hold then (num_tokens and the buffers are the captured call's), and the slots' parity comes
 * from a count kept on the device, so launches alternate as calls made one by one do. Every rank captures the same
 * calls in the same order and launches its graph as often as the others, in the same order relative to the group's
 * other calls. The caller orders the graph's launches with the group's other calls (one stream, or events): the library
 * does not see the launches. The handle a captured dispatch returns is the graph's: its layout pointers are fixed, its
 * contents are those of the latest launch; bitepHandleDestroy of a handle that a graph used waits for the device
 * (cudaDeviceSynchronize), and the graph must not be launched afterwards. bitepDispatch, the combines of its handles
 * and the backward passes return bitepNotSupported while their stream captures. */
BITEP_API bitepResult_t bitepDispatchLowLatency(bitepGroup_t group,
                                                const bitepDispatchArgs_t* args,
                                                bitepStream_t stream,
                                                bitepHandle_t* handle);

/* [OUT] capturable: 1 when the group's low-latency dispatches and their combines run on the device alone (cuda, every
 * rank in one NVLink domain with the low-latency window open, a shape the receive kernel takes), so that a CUDA
 * graph can capture them; 0 where they run bitepDispatch (host backend, BITEP_LSA=0, no window,
 * low_latency_max_tokens = 0). */
BITEP_API bitepResult_t bitepGroupLowLatencyCapturable(bitepGroup_t group, int* capturable);

typedef struct {
  int num_ranks;             /* W */
  int num_local_experts;     /* L = E / W */
  int max_row_experts;       /* min(k, L): width of recv_weights / recv_expert_rows */
  int64_t num_recv_rows;     /* R: rows received, by ascending source rank, then source token order */
  void* recv_x;              /* [R, H] dtype */
  const uint8_t* recv_map;   /* [R, ceil(L/8)] BITMAP_U8 over the local experts */
  const float* recv_weights; /* [R, max_row_experts] weights of the set bits in bit order, 0-padded; NULL if none */
  const int32_t* recv_expert_rows;   /* [R, max_row_experts] row of the expert-major view per set bit, -1 padded */
  int64_t num_expert_rows;           /* sum over l of expert_counts[l] rounded up to the alignment */
  void* expert_x;                    /* [num_expert_rows, H] dtype, expert-major; pad rows are zero */
  const int32_t* expert_counts;      /* [L] rows of each local expert (backend memory) */
  const int32_t* expert_offsets;     /* [L + 1] first row of each expert block (backend memory) */
  const int64_t* expert_counts_host; /* [L] host copy */
  const int64_t* recv_counts_host;   /* [W] rows received from each source rank, host */
  const int64_t* send_counts_host;   /* [W] rows sent to each destination rank, host */
} bitepDispatchLayout_t;

/* [OUT] layout: views into memory the handle owns; valid until bitepHandleDestroy. */
BITEP_API bitepResult_t bitepHandleGetLayout(bitepHandle_t handle, bitepDispatchLayout_t* layout);

/* The gather index of the handle's expert-major view: [OUT] *sources points to [num_expert_rows] int32 in backend
 * memory, owned by the handle, where sources[r] is the received (rank-major) row that expert-major row r holds, -1
 * for a pad row: the inverse of recv_expert_rows. With it an expert GEMM reads its rows from recv_x itself, which is
 * what a dispatch with args.rank_major_only leaves it to do; it also names the source of every row of expert_x. The
 * first call computes it, enqueued on stream, which must be ordered after the dispatch (its stream, or an event):
 * later calls return the same pointer and queue nothing. Local, not collective; not while the stream captures a
 * CUDA graph (bitepNotSupported). A handle of bitepDispatchLowLatency has no received rows: bitepInvalidUsage. */
BITEP_API bitepResult_t bitepHandleGetExpertSources(bitepGroup_t group,
                                                    bitepHandle_t handle,
                                                    bitepStream_t stream,
                                                    const int32_t** sources);

/* Releases the handle's buffers back to the group's pool. They are handed out again only after the work
 * that bitep queued on them (dispatch, combine, backward, on whichever streams) has finished; the
 * streams may be destroyed before the handle. Work the caller queued on the layout's buffers (an expert
 * GEMM reading expert_x) is not tracked: it must have finished, or be on the stream of the next bitep
 * call on this group, before that call may reuse the memory. A handle a CUDA graph captured a call of waits for the
 * device first (cudaDeviceSynchronize: the graph's launches are not tracked). */
BITEP_API bitepResult_t bitepHandleDestroy(bitepHandle_t handle);

typedef enum BITEP_ENUM_INT { bitepLayoutExpertMajor = 0, bitepLayoutRankMajor = 1 } bitepLayout_t;

#define BITEP_COMBINE_ARGS_MAGIC 0xb17e0012u

typedef struct {
  size_t size;          /* sizeof(bitepCombineArgs_t) */
  unsigned magic;       /* BITEP_COMBINE_ARGS_MAGIC */
  const void* y;        /* [IN] expert-major [num_expert_rows, H] or rank-major [R, H] (one row per received row) */
  bitepLayout_t layout; /* of y */
  int weighted;         /* expert-major only (rank-major y holds rows already summed): 1 = weight each expert row
                           by the router weight */
  void* out;            /* [OUT] [T, H] dtype */
} bitepCombineArgs_t;

#define BITEP_COMBINE_ARGS_INIT \
  { sizeof(bitepCombineArgs_t), BITEP_COMBINE_ARGS_MAGIC, NULL, bitepLayoutExpertMajor, 1, NULL }

/* Combine. Collective. For each received row the (weighted) sum over its local experts in fp32, rounded to
 * the dtype and sent back with the handle's counts (no host synchronisation), then each token sums its partial
 * rows in fp32 in ascending rank order, rounded to the dtype: bit-identical run to run. A token routed nowhere
 * gets a zero row. Every rank gives the handle of the same dispatch (handles in flight are combined in the
 * same order everywhere). Host groups agree on each call's status: a rank's argument error (its handle
 * included) fails it with that error and its peers at once with bitepRemoteError, and a mismatch of
 * dispatches fails every rank. The ranks that pass expert-major y pass the same weighted (each weights the expert rows
 * it sums for the others by its own flag): host groups check it, failing every rank. A cuda group's failing rank
 * returns at once and queues nothing, and its group is unusable (see Errors above): its peers wait in the transfer
 * until the group's timeout. */
BITEP_API bitepResult_t bitepCombine(bitepGroup_t group,
                                     bitepHandle_t handle,
                                     const bitepCombineArgs_t* args,
                                     bitepStream_t stream);

/* Dispatch backward: grad_y (expert-major or rank-major, as in combine) -> grad_x [T, H], an unweighted
 * combine of the gradients. Collective. */
BITEP_API bitepResult_t bitepDispatchBackward(bitepGroup_t group,
                                              bitepHandle_t handle,
                                              const void* grad_y,
                                              bitepLayout_t layout,
                                              void* grad_x,
                                              bitepStream_t stream);

#define BITEP_COMBINE_BWD_ARGS_MAGIC 0xb17e0013u

typedef struct {
  size_t size;              /* sizeof(bitepCombineBackwardArgs_t) */
  unsigned magic;           /* BITEP_COMBINE_BWD_ARGS_MAGIC */
  const void* grad_out;     /* [IN]  [T, H] dtype */
  int weighted;             /* as in the forward combine */
  const void* y;            /* [IN]  expert-major forward expert outputs; needed for weight gradients, else NULL */
  void* grad_y;             /* [OUT] [num_expert_rows, H] dtype expert-major (pad rows zero) */
  float* grad_topk_weights; /* [OUT] [T, k] compact in the dispatch's order, or NULL */
  float* grad_probs;        /* [OUT] [T, E] dense (0 where not routed), or NULL */
} bitepCombineBackwardArgs_t;

#define BITEP_COMBINE_BWD_ARGS_INIT \
  { sizeof(bitepCombineBackwardArgs_t), BITEP_COMBINE_BWD_ARGS_MAGIC, NULL, 1, NULL, NULL, NULL, NULL }

/* Combine backward: grad_out goes along the dispatch's routes (a dispatch with the handle's counts,
 * no host synchronisation) -> grad_y, and, when y is given, the gradient of the router weights
 * (dot(y_row, grad_out_row) in fp32) comes back to the source ranks. Collective: every rank passes the same
 * weighted, and y on every rank or on none (a rank with no expert rows may pass any non-NULL pointer); the
 * host backend checks this agreement (and the dispatch, as in combine), the cuda backend relies on it. */
BITEP_API bitepResult_t bitepCombineBackward(bitepGroup_t group,
                                             bitepHandle_t handle,
                                             const bitepCombineBackwardArgs_t* args,
                                             bitepStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* BITEP_BITEP_H_ */
