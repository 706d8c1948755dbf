// SPDX-License-Identifier: Apache-2.0
// One MoE layer across the ranks of MPI_COMM_WORLD:
//   mpirun -np N ./build/examples/moe_layer [--tokens T --hidden H --experts E --topk k --ffn F
//                                            --iters I --backend host|cuda [--low-latency | --graph]]
// Each rank routes its random logits with the bitep router (bitmap + compact weights), dispatches its
// tokens, runs a small GELU FFN per local expert, and combines. Rank 0 then gathers every rank's inputs
// and outputs, computes the same layer alone, and reports time per stage, tokens/s and the max error.
// --low-latency (cuda): the decode path, bitepDispatchLowLatency; --graph (cuda): that step captured once into a
// CUDA graph (router, dispatch, experts, combine) and launched once per iteration, as a serving stack runs it; every
// launch but the last on other inputs, so the checked output is the last launch's.
// Exit status: 0 correct (or cuda skipped), 1 wrong or failed.
#include "moe_layer.h"

#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bitep/bitep_mpi.h"

namespace {

uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [-1, 1), a function of (seed, stream, index).
float uniform(uint64_t seed, uint64_t stream, uint64_t i) {
  return static_cast<float>(mix(mix(seed ^ (stream << 56)) ^ i) >> 40) / static_cast<float>(1 << 23) - 1.0f;
}

bool parse(int argc, char** argv, Options* o, int rank) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        if (rank == 0) std::fprintf(stderr, "moe_layer: %s needs a value\n", name);
        return nullptr;
      }
      return argv[++i];
    };
    const char* v = nullptr;
    if (a == "--tokens" && (v = value("--tokens")))
      o->tokens = std::atoll(v);
    else if (a == "--hidden" && (v = value("--hidden")))
      o->hidden = std::atoi(v);
    else if (a == "--experts" && (v = value("--experts")))
      o->experts = std::atoi(v);
    else if (a == "--topk" && (v = value("--topk")))
      o->topk = std::atoi(v);
    else if (a == "--ffn" && (v = value("--ffn")))
      o->ffn = std::atoi(v);
    else if (a == "--iters" && (v = value("--iters")))
      o->iters = std::atoi(v);
    else if (a == "--backend" && (v = value("--backend")))
      o->backend = v;
    else if (a == "--seed" && (v = value("--seed")))
      o->seed = std::strtoull(v, nullptr, 10);
    else if (a == "--low-latency")
      o->low_latency = true;
    else if (a == "--graph")
      o->graph = o->low_latency = true;
    else {
      if (rank == 0)
        std::fprintf(stderr,
                     "usage: moe_layer [--tokens T] [--hidden H] [--experts E] [--topk k] [--ffn F] "
                     "[--iters I] [--backend host|cuda] [--seed S] [--low-latency | --graph]\n");
      return false;
    }
  }
  return true;
}

Problem make_problem(const Options& o, int rank, int nranks) {
  Problem p;
  p.rank = rank;
  p.nranks = nranks;
  p.T = o.tokens;
  p.E = o.experts > 0 ? o.experts : 2 * nranks;
  p.k = o.topk;
  p.H = o.hidden;
  p.F = o.ffn > 0 ? o.ffn : 2 * o.hidden;
  p.logits.resize(p.T * p.E);
  for (size_t i = 0; i < p.logits.size(); ++i) p.logits[i] = 2.0f * uniform(o.seed, 1 + rank, i);
  p.x.resize(p.T * p.H);
  for (size_t i = 0; i < p.x.size(); ++i) p.x[i] = float_to_bf16(uniform(o.seed, 100 + rank, i));
  p.w1.resize(static_cast<size_t>(p.E) * p.F * p.H);
  p.w2.resize(static_cast<size_t>(p.E) * p.H * p.F);
  const float s1 = 1.0f / std::sqrt(static_cast<float>(p.H)), s2 = 1.0f / std::sqrt(static_cast<float>(p.F));
  for (size_t i = 0; i < p.w1.size(); ++i) p.w1[i] = bf16_to_float(float_to_bf16(s1 * uniform(o.seed, 200, i)));
  for (size_t i = 0; i < p.w2.size(); ++i) p.w2[i] = bf16_to_float(float_to_bf16(s2 * uniform(o.seed, 201, i)));
  return p;
}

// Rank 0: the whole layer on one rank (router by bitep's host reference, experts in fp32, weighted sum in
// fp64) against the gathered outputs. Returns the max error over the allowed error (<= 1 is correct).
double check(const Problem& p, const std::vector<uint16_t>& out, double* max_abs) {
  std::vector<int> counts(p.nranks), displs(p.nranks);
  int T = static_cast<int>(p.T);
  MPI_Gather(&T, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  int64_t total = 0;
  for (int r = 0; r < p.nranks; ++r) total += counts[r];
  MPI_Bcast(&total, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
  auto gather = [&](const void* mine, int per_token, MPI_Datatype type, size_t elem, std::vector<char>* all) {
    std::vector<int> c(p.nranks), d(p.nranks);
    for (int r = 0, off = 0; r < p.nranks; ++r) {
      c[r] = counts[r] * per_token;
      d[r] = off;
      off += c[r];
    }
    all->resize(total * per_token * elem);
    MPI_Gatherv(mine, T * per_token, type, all->data(), c.data(), d.data(), type, 0, MPI_COMM_WORLD);
  };
  std::vector<char> logits, x, got;
  gather(p.logits.data(), p.E, MPI_FLOAT, 4, &logits);
  gather(p.x.data(), p.H, MPI_UINT16_T, 2, &x);
  gather(out.data(), p.H, MPI_UINT16_T, 2, &got);
  double worst = 0;
  *max_abs = 0;
  if (p.rank != 0) return 0;
  bitepRouterConfig_t rc = BITEP_ROUTER_CONFIG_INIT;
  rc.num_experts = p.E;
  rc.topk = p.k;
  std::vector<int32_t> idx(total * p.k);
  std::vector<float> w(total * p.k);
  bitepRouterForwardArgs_t ra = BITEP_ROUTER_FWD_ARGS_INIT;
  ra.num_tokens = total;
  ra.logits = logits.data();
  ra.topk_indices = idx.data();
  ra.topk_weights = w.data();
  if (bitepRouterForward(bitepBackendHost, &rc, &ra, nullptr) != bitepSuccess) {
    std::fprintf(stderr, "reference router failed: %s\n", bitepGetLastError());
    return 1e30;
  }
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data());
  const uint16_t* gs = reinterpret_cast<const uint16_t*>(got.data());
  std::vector<float> y(p.H);
  std::vector<double> ref(p.H), scale(p.H);
  for (int64_t t = 0; t < total; ++t) {
    std::fill(ref.begin(), ref.end(), 0.0);
    std::fill(scale.begin(), scale.end(), 0.0);
    for (int j = 0; j < p.k; ++j) {
      expert_ffn(p, idx[t * p.k + j], xs + t * p.H, y.data());
      for (int i = 0; i < p.H; ++i) {
        const double term = static_cast<double>(w[t * p.k + j]) * bf16_to_float(float_to_bf16(y[i]));
        ref[i] += term;
        scale[i] += std::fabs(term);
      }
    }
    for (int i = 0; i < p.H; ++i) {
      const double err = std::fabs(bf16_to_float(gs[t * p.H + i]) - ref[i]);
      *max_abs = std::max(*max_abs, err);
      worst = std::max(worst, err / (std::ldexp(scale[i], -6) + 1e-4));  // a few bf16 roundings
    }
  }
  return worst;
}

void report(const Options& o, const Problem& p, const Timings& t, double worst, double max_abs) {
  const double mine[5] = {t.router, t.dispatch, t.experts, t.combine,
                          o.graph ? t.step : t.router + t.dispatch + t.experts + t.combine};
  double mn[5], mx[5], sum[5];
  MPI_Reduce(mine, mn, 5, MPI_DOUBLE, MPI_MIN, 0, MPI_COMM_WORLD);
  MPI_Reduce(mine, mx, 5, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  MPI_Reduce(mine, sum, 5, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  struct {
    double v;
    int r;
  } in{mine[4], p.rank}, slow{};
  MPI_Reduce(&in, &slow, 1, MPI_DOUBLE_INT, MPI_MAXLOC, 0, MPI_COMM_WORLD);
  int64_t total = 0;
  MPI_Reduce(&p.T, &total, 1, MPI_INT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  if (p.rank != 0) return;
  const char* mode = o.graph         ? "low-latency dispatch, the step in one CUDA graph"
                     : o.low_latency ? "low-latency dispatch"
                                     : "bitepDispatch";
  std::printf(
      "bitep moe_layer: backend %s (%s), %d ranks, %lld tokens/rank, hidden %d, %d experts (%d per rank), "
      "top-%d, ffn %d, %d iterations\n",
      o.backend.c_str(), mode, p.nranks, static_cast<long long>(p.T), p.H, p.E, p.E / p.nranks, p.k, p.F, o.iters);
  std::printf("%-10s %10s %10s %10s\n", "stage", "min(ms)", "avg(ms)", "max(ms)");
  const char* names[5] = {"router", "dispatch", "experts", "combine", o.graph ? "step" : "total"};
  for (int i = o.graph ? 4 : 0; i < 5; ++i)
    std::printf("%-10s %10.3f %10.3f %10.3f\n", names[i], 1e3 * mn[i], 1e3 * sum[i] / p.nranks, 1e3 * mx[i]);
  std::printf("slowest rank: %d; throughput: %.0f tokens/s (all ranks, one layer forward)\n", slow.r,
              mx[4] > 0 ? static_cast<double>(total) / mx[4] : 0.0);
  std::printf("max error: %.3g (%.2f of the allowed bf16 error): %s\n", max_abs, worst, worst <= 1.0 ? "OK" : "WRONG");
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, nranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);
  Options o;
  if (!parse(argc, argv, &o, rank)) {
    MPI_Finalize();
    return 1;
  }
  // The options checked before any buffer is sized from them.
  const int64_t E = o.experts > 0 ? o.experts : 2 * static_cast<int64_t>(nranks);
  const int64_t F = o.ffn > 0 ? o.ffn : 2 * static_cast<int64_t>(o.hidden);
  std::string bad;
  if (o.experts < 0 || o.ffn < 0 || E % nranks != 0 || o.topk < 1 || o.topk > E || o.tokens < 0 || o.hidden < 1 ||
      o.iters < 1 || (o.backend != "host" && o.backend != "cuda"))
    bad = "need experts % ranks == 0 (experts " + std::to_string(E) + ", ranks " + std::to_string(nranks) +
          "), 1 <= topk <= experts (topk " + std::to_string(o.topk) + "), tokens >= 0 (" + std::to_string(o.tokens) +
          "), hidden >= 1 (" + std::to_string(o.hidden) + "), ffn >= 0 (" + std::to_string(o.ffn) + "), iters >= 1 (" +
          std::to_string(o.iters) + "), backend host|cuda (" + o.backend + ")";
  else if (o.low_latency && o.backend != "cuda")
    bad = "--low-latency and --graph need --backend cuda (the host backend has no decode path to show)";
  else if (o.low_latency && o.tokens > 65536)
    bad = "--low-latency and --graph take at most 65536 tokens a rank (tokens " + std::to_string(o.tokens) + ")";
  else if (o.low_latency && 4 * (o.hidden + F) > 48 * 1024)
    bad =
        "--low-latency and --graph run the experts as one kernel with a row in shared memory: need 4 * (hidden + "
        "ffn) <= 48 KiB (hidden " +
        std::to_string(o.hidden) + ", ffn " + std::to_string(F) + ")";
  if (!bad.empty()) {
    if (rank == 0) std::fprintf(stderr, "moe_layer: %s\n", bad.c_str());
    MPI_Finalize();
    return 1;
  }
  const Problem p = make_problem(o, rank, nranks);
  std::vector<uint16_t> out;
  Timings t;
  int rc = o.backend == "host" ? run_host(o, p, &out, &t) : run_cuda(o, p, &out, &t);
  int worst_rc = 0;
  MPI_Allreduce(&rc, &worst_rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (worst_rc != 0) {
    MPI_Finalize();
    return worst_rc == 2 ? 77 : 1;  // 2: the cuda path skipped (said so): 77, a run that tested nothing
  }
  double max_abs = 0;
  const double worst = check(p, out, &max_abs);
  report(o, p, t, worst, max_abs);
  int ok = worst <= 1.0 ? 0 : 1;
  MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return ok;
}
