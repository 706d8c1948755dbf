// SPDX-License-Identifier: Apache-2.0
// The host backend: router, dispatch and combine by bitep on host memory; experts as plain loops over the
// expert-major rows.
#include <mpi.h>

#include <cmath>
#include <cstdio>

#include "bitep/bitep.hpp"
#include "bitep/bitep_mpi.hpp"
#include "moe_layer.h"

float gelu(float v) { return 0.5f * v * (1.0f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v))); }

void expert_ffn(const Problem& p, int e, const uint16_t* x, float* y) {
  std::vector<float> a(p.F);
  const float* w1 = p.w1.data() + static_cast<size_t>(e) * p.F * p.H;
  const float* w2 = p.w2.data() + static_cast<size_t>(e) * p.H * p.F;
  for (int f = 0; f < p.F; ++f) {
    float acc = 0.0f;
    for (int j = 0; j < p.H; ++j) acc += w1[f * p.H + j] * bf16_to_float(x[j]);
    a[f] = bf16_to_float(float_to_bf16(gelu(acc)));  // a bf16 activation, as the cuda path's second GEMM reads
  }
  for (int i = 0; i < p.H; ++i) {
    float acc = 0.0f;
    for (int f = 0; f < p.F; ++f) acc += w2[i * p.F + f] * a[f];
    y[i] = acc;
  }
}

// Through bitep's C++ layer (bitep.hpp, bitep_mpi.hpp): the group and each handle are destroyed on every path, and a
// failure arrives as bitep::Error with the C API's detail.
int run_host(const Options& opts, const Problem& p, std::vector<uint16_t>* out, Timings* t) try {
  const int L = p.E / p.nranks;
  bitepGroupConfig_t gc = BITEP_GROUP_CONFIG_INIT;
  gc.backend = bitepBackendHost;
  gc.num_experts = p.E;
  gc.topk = p.k;
  gc.hidden = p.H;
  gc.dtype = bitepBfloat16;
  gc.expert_alignment = 8;
  gc.timeout_s = 120;
  bitep::Group group = bitep::group_from_mpi(MPI_COMM_WORLD, gc);

  bitepRouterConfig_t rc = BITEP_ROUTER_CONFIG_INIT;
  rc.num_experts = p.E;
  rc.topk = p.k;
  rc.score_function = bitepScoreSoftmax;
  std::vector<uint8_t> bitmap(p.T * ((p.E + 7) / 8));
  std::vector<float> weights(p.T * p.k);
  out->assign(p.T * p.H, 0);
  std::vector<float> yrow(p.H);
  for (int it = 0; it < opts.iters; ++it) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    bitepRouterForwardArgs_t ra = BITEP_ROUTER_FWD_ARGS_INIT;
    ra.num_tokens = p.T;
    ra.logits = p.logits.data();
    ra.routing_map = bitmap.data();
    ra.map_format = bitepMapBitmapU8;
    ra.topk_weights = weights.data();
    bitep::router_forward(bitepBackendHost, rc, ra);
    double t1 = MPI_Wtime();
    bitepDispatchArgs_t da = BITEP_DISPATCH_ARGS_INIT;
    da.num_tokens = p.T;
    da.x = p.x.data();
    da.routing_map = bitmap.data();
    da.map_format = bitepMapBitmapU8;
    da.topk_weights = weights.data();
    bitep::Handle handle = group.dispatch(da);
    const bitepDispatchLayout_t lo = handle.layout();
    double t2 = MPI_Wtime();
    // The experts: one FFN per local expert over its block of the expert-major view.
    std::vector<uint16_t> y(lo.num_expert_rows * p.H, 0);
    const uint16_t* ex = static_cast<const uint16_t*>(lo.expert_x);
    for (int l = 0; l < L; ++l)
      for (int64_t row = lo.expert_offsets[l]; row < lo.expert_offsets[l] + lo.expert_counts[l]; ++row) {
        expert_ffn(p, p.rank * L + l, ex + row * p.H, yrow.data());
        for (int i = 0; i < p.H; ++i) y[row * p.H + i] = float_to_bf16(yrow[i]);
      }
    double t3 = MPI_Wtime();
    bitepCombineArgs_t ca = BITEP_COMBINE_ARGS_INIT;
    ca.y = y.data();
    ca.weighted = 1;
    ca.out = out->data();
    group.combine(handle, ca);
    double t4 = MPI_Wtime();
    handle.destroy();
    t->router += (t1 - t0) / opts.iters;
    t->dispatch += (t2 - t1) / opts.iters;
    t->experts += (t3 - t2) / opts.iters;
    t->combine += (t4 - t3) / opts.iters;
  }
  group.reset();
  return 0;
} catch (const bitep::Error& e) {
  std::fprintf(stderr, "[rank %d] %s\n", p.rank, e.what());
  return 1;
}

#ifndef MOE_LAYER_HAVE_CUDA
int run_cuda(const Options&, const Problem& p, std::vector<uint16_t>*, Timings*) {
  if (p.rank == 0)
    std::printf(
        "moe_layer: SKIPPED --backend cuda: this build has no CUDA + cuBLAS path (needs the CUDA toolkit "
        "with cuBLAS at configure time)\n");
  return 2;  // skipped
}
#endif
