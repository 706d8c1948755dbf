// SPDX-License-Identifier: Apache-2.0
// CUDA launchers of the expert-parallel primitives (kernels/ep_params.h): raw pointers + stream,
// no handles, no allocation; zero rows return cudaSuccess at once.
#pragma once

#include <cuda_runtime.h>

#include "kernels/ep_params.h"

namespace bitep::kernels {

cudaError_t launch_ep_layout(const LayoutParams& p, cudaStream_t stream);
cudaError_t launch_ep_pack_counts(const PackCountsParams& p, cudaStream_t stream);
cudaError_t launch_ep_permute(const PermuteParams& p, cudaStream_t stream);
// Whether launch_ep_permute moves p's rows by bulk copies (PermuteParams::bulk; self_expert_rows needs it).
cudaError_t permute_takes_bulk(const PermuteParams& p, bool* out);
cudaError_t launch_ep_expert_major(const ExpertMajorParams& p, cudaStream_t stream);
// Whether launch_ep_expert_major copies p's rows by bulk copies (ExpertMajorParams::bulk), which neither
// fill nor read expert_src: a later call with src_given that does not take them needs a filled table.
cudaError_t expert_major_takes_bulk(const ExpertMajorParams& p, bool* out);
cudaError_t launch_ep_copy_batch(const CopyBatchParams& p, cudaStream_t stream);
cudaError_t launch_ep_expert_sources(const ExpertSourcesParams& p, cudaStream_t stream);
cudaError_t launch_ep_reduce(const ReduceParams& p, cudaStream_t stream);
cudaError_t launch_ep_final_sum(const FinalSumParams& p, cudaStream_t stream);
cudaError_t launch_ep_weight_grad(const WeightGradParams& p, cudaStream_t stream);
cudaError_t launch_ep_low_latency_send(const LowLatencySendParams& p, cudaStream_t stream);
cudaError_t launch_ep_low_latency_receive(const LowLatencyReceiveParams& p, cudaStream_t stream);
// Whether launch_ep_low_latency_receive takes a group's shape on the current device: low_latency_receive_fits,
// and its shared memory within what the device grants the kernel beside its static shared memory (the kernel
// is opted in to it here, once per device). The receive runs after the send and the barrier: a shape it
// cannot take must go another way before them.
cudaError_t low_latency_receive_supported(int num_ranks, int num_local_experts, int64_t capacity, bool* out);
// In order on `stream`: for each chunk, a wait until its `wait` flag's low word is at least `value`
// (cuStreamWaitValue32, when given), the copy by cudaMemcpyAsync (the copy engine; no SM is taken), then the
// low word of its flag set to `value` by cuStreamWriteValue32, whose default memory barrier orders the copy's
// stores before the flag (as __threadfence_system() would): a kernel that acquires the flag (system scope)
// then reads the chunk's rows. cudaErrorNotSupported where the driver has no stream memory operations
// (ce_chunks_available() says so first).
cudaError_t launch_ce_chunks(const CeChunk* chunks, int n, uint32_t value, cudaStream_t stream);
bool ce_chunks_available();
// Loads (cudaFuncGetAttributes) the kernels that run while other kernels wait on them: the permute's (the window's
// rows pass) and the bulk copies'. Under lazy module loading (CUDA's default) a kernel's first launch loads it and
// waits for the device's running work; launched while copies spin waiting for the peers' rows passes, which wait
// the same way, the first large window dispatch would stall until the waits time out. Called at group creation.
cudaError_t load_ep_kernels();
cudaError_t load_permute_kernels();  // the permute's part (kernels/permute.cu)

}  // namespace bitep::kernels
