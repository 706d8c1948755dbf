// SPDX-License-Identifier: Apache-2.0
// Host reference of the expert-parallel primitives (kernels/ep_params.h): plain C++ on host memory,
// bit-identical to the CUDA kernels for layouts, slots, rows and maps.
#pragma once

#include "kernels/ep_params.h"

namespace bitep::host {

void ep_layout(const kernels::LayoutParams& p);
void ep_pack_counts(const kernels::PackCountsParams& p);
void ep_permute(const kernels::PermuteParams& p);
void ep_expert_major(const kernels::ExpertMajorParams& p);
void ep_copy_batch(const kernels::CopyBatchParams& p);
void ep_expert_sources(const kernels::ExpertSourcesParams& p);
void ep_reduce(const kernels::ReduceParams& p);
void ep_final_sum(const kernels::FinalSumParams& p);
void ep_weight_grad(const kernels::WeightGradParams& p);

}  // namespace bitep::host
