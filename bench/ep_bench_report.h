// SPDX-License-Identifier: Apache-2.0
// ep_bench's results: statistics over ranks, the nccl-tests style table (rank 0) and the JSON file.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

namespace {

// A per-rank value over all ranks; `max` is the slowest (for bytes: the largest) rank's, and the one the table
// shows; `slowest` is that rank.
struct Stat {
  double min = 0, avg = 0, max = 0;
  int slowest = 0;
};

struct Record {
  int64_t T = 0;
  int H = 0, E = 0, k = 0;
  std::string routing;
  // This rank's bytes (finish() turns cross_bytes / size_bytes / rows into averages over ranks).
  int64_t cross_bytes = 0, size_bytes = 0, rows = 0, combine_bytes = 0, baseline_cross_bytes = 0;
  Stat dispatch, combine, e2e, nccl_a2a, nccl_a2a_combine, baseline_dispatch, baseline_combine, baseline_e2e;
  Stat dispatch_rank_major;  // the same dispatch with args.rank_major_only, timed in the same run
  bool rank_major = false;
  Stat ll_dispatch, ll_combine;  // bitepDispatchLowLatency and its combine (T <= the group's low-latency capacity)
  bool ll = false;
  Stat ll_graph_dispatch, ll_graph_combine;  // the same captured into CUDA graphs, per launch
  bool ll_graph = false;
  Stat ll_graph_step_time;  // a decode step in one CUDA graph: router + low-latency dispatch + combine, per launch
  bool ll_graph_step = false;
  Stat cross, combine_cross, baseline_cross;
  int64_t wrong = 0;
  // Memory per rank, over the ranks (max: the largest rank): the group's bytes (bitepGroupMemoryBytes),
  // caller-owned receive buffers (--caller-buffers), and the group's bytes over (rows sent, own included, + rows
  // received) x H x 2, the budget being 2.
  Stat group_bytes, caller_bytes, memory_ratio;
  bool expert_major_only = false;  // --expert-major-only: the timed dispatches keep no rank-major rows
  bool rank_major_only = false;    // --rank-major-only: the timed dispatches write no expert-major rows
};

class Report {
 public:
  Report(int W, int rank) : W_(W), rank_(rank) {}
  std::string card, p2p_method;
  double p2p_gbps = 0;
  bool l2_flush = false;  // the L2 written over before each timed call that starts from the inputs

  Stat over_ranks(double v) const {
    std::vector<double> all(W_);
    MPI_Allgather(&v, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
    Stat s;
    s.min = *std::min_element(all.begin(), all.end());
    s.max = *std::max_element(all.begin(), all.end());
    s.slowest = static_cast<int>(std::max_element(all.begin(), all.end()) - all.begin());
    for (double x : all) s.avg += x / W_;
    return s;
  }

  void table_header(int H, int E, int k) const {
    if (rank_ != 0) return;
    std::printf("#\n# H=%d E=%d k=%d W=%d bf16 | p2p ceiling %.1f GB/s (%s) | %s\n", H, E, k, W_, p2p_gbps,
                p2p_method.c_str(),
                l2_flush ? "L2 flushed before each timed call (2x L2 written)" : "L2 not flushed (--no-l2-flush)");
    std::printf(
        "# time = slowest rank's median (us); size = bytes a rank's dispatch moves (avg); "
        "algbw = size / time; busbw = algbw * (W-1)/W\n");
    std::printf("# %6s %8s %12s %9s %5s | %9s %7s %7s | %9s %7s %7s | %9s %7s | %9s %9s | %9s %9s | %6s\n", "T",
                "routing", "size(B)", "count", "type", "disp(us)", "algbw", "busbw", "comb(us)", "algbw", "busbw",
                "a2a(us)", "busbw", "base_d", "base_c", "e2e", "base_e2e", "#wrong");
  }

  // traffic_bytes: (rows sent, own included, + rows received) x H x element size on this rank.
  void finish(Record* r, int64_t wrong, int64_t group_bytes, int64_t caller_bytes, int64_t traffic_bytes) const {
    const double ratio =
        traffic_bytes > 0 ? static_cast<double>(group_bytes) / static_cast<double>(traffic_bytes) : 0.0;
    r->group_bytes = over_ranks(static_cast<double>(group_bytes));
    r->caller_bytes = over_ranks(static_cast<double>(caller_bytes));
    r->memory_ratio = over_ranks(ratio);
    r->cross = over_ranks(static_cast<double>(r->cross_bytes));
    r->combine_cross = over_ranks(static_cast<double>(r->combine_bytes));
    r->baseline_cross = over_ranks(static_cast<double>(r->baseline_cross_bytes));
    const Stat size = over_ranks(static_cast<double>(r->size_bytes)), rows = over_ranks(static_cast<double>(r->rows));
    r->size_bytes = static_cast<int64_t>(size.avg);
    r->rows = static_cast<int64_t>(rows.avg);
    MPI_Allreduce(&wrong, &r->wrong, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (rank_ != 0) return;
    const double f = W_ > 1 ? double(W_ - 1) / W_ : 0.0;
    auto gbps = [](double bytes, double us) { return us > 0 ? bytes / (us * 1e3) : 0.0; };
    const double sz = static_cast<double>(r->size_bytes);
    const double comb_sz = sz * (2.0 * r->H) / (2.0 * r->H + (r->E / W_ + 7) / 8 + 4.0 * std::min(r->k, r->E / W_));
    std::printf(
        "  %6lld %8s %12lld %9lld %5s | %9.1f %7.1f %7.1f | %9.1f %7.1f %7.1f | %9.1f %7.1f | %9.1f %9.1f | "
        "%9.1f %9.1f | %6lld\n",
        static_cast<long long>(r->T), r->routing.c_str(), static_cast<long long>(r->size_bytes),
        static_cast<long long>(r->rows), "bf16", r->dispatch.max, gbps(sz, r->dispatch.max),
        gbps(sz, r->dispatch.max) * f, r->combine.max, gbps(comb_sz, r->combine.max), gbps(comb_sz, r->combine.max) * f,
        r->nccl_a2a.max, gbps(sz, r->nccl_a2a.max) * f, r->baseline_dispatch.max, r->baseline_combine.max, r->e2e.max,
        r->baseline_e2e.max, static_cast<long long>(r->wrong));
    std::printf(
        "  %6s   dispatch min/avg/max %.1f/%.1f/%.1f (slowest rank %d), combine %.1f/%.1f/%.1f (rank %d), "
        "cross GB/s %.1f / %.1f, bytes/rank %.0f..%.0f\n",
        "", r->dispatch.min, r->dispatch.avg, r->dispatch.max, r->dispatch.slowest, r->combine.min, r->combine.avg,
        r->combine.max, r->combine.slowest, gbps(r->cross.avg, r->dispatch.max),
        gbps(r->combine_cross.avg, r->combine.max), r->cross.min, r->cross.max);
    std::printf(
        "  %6s   memory min/avg/max: group %.3f/%.3f/%.3f GB (largest rank %d), %.2f/%.2f/%.2fx (rows sent + "
        "received) x H x 2; caller buffers %.3f/%.3f/%.3f GB%s\n",
        "", r->group_bytes.min / 1e9, r->group_bytes.avg / 1e9, r->group_bytes.max / 1e9, r->group_bytes.slowest,
        r->memory_ratio.min, r->memory_ratio.avg, r->memory_ratio.max, r->caller_bytes.min / 1e9,
        r->caller_bytes.avg / 1e9, r->caller_bytes.max / 1e9,
        r->expert_major_only ? "; expert-major only"
        : r->rank_major_only ? "; rank-major only"
                             : "");
    if (r->rank_major) {
      std::printf(
          "  %6s   rank-major only (args.rank_major_only): dispatch min/avg/max %.1f/%.1f/%.1f (slowest rank %d)", "",
          r->dispatch_rank_major.min, r->dispatch_rank_major.avg, r->dispatch_rank_major.max,
          r->dispatch_rank_major.slowest);
      if (r->nccl_a2a.max > 0 && W_ > 1)  // at W = 1 the all-to-all moves nothing
        std::printf(", %.2fx the NCCL all-to-all (both views: %.2fx)", r->dispatch_rank_major.max / r->nccl_a2a.max,
                    r->dispatch.max / r->nccl_a2a.max);
      std::printf("\n");
    }
    if (r->ll)
      std::printf(
          "  %6s   low latency: dispatch min/avg/max %.1f/%.1f/%.1f (slowest rank %d), combine %.1f/%.1f/%.1f (rank "
          "%d)\n",
          "", r->ll_dispatch.min, r->ll_dispatch.avg, r->ll_dispatch.max, r->ll_dispatch.slowest, r->ll_combine.min,
          r->ll_combine.avg, r->ll_combine.max, r->ll_combine.slowest);
    if (r->ll_graph)
      std::printf(
          "  %6s   low latency in CUDA graphs: dispatch min/avg/max %.1f/%.1f/%.1f (slowest rank %d), combine "
          "%.1f/%.1f/%.1f (rank %d)\n",
          "", r->ll_graph_dispatch.min, r->ll_graph_dispatch.avg, r->ll_graph_dispatch.max,
          r->ll_graph_dispatch.slowest, r->ll_graph_combine.min, r->ll_graph_combine.avg, r->ll_graph_combine.max,
          r->ll_graph_combine.slowest);
    if (r->ll_graph_step)
      std::printf(
          "  %6s   decode step in one CUDA graph (router + low-latency dispatch + combine): min/avg/max "
          "%.1f/%.1f/%.1f (slowest rank %d)\n",
          "", r->ll_graph_step_time.min, r->ll_graph_step_time.avg, r->ll_graph_step_time.max,
          r->ll_graph_step_time.slowest);
    std::fflush(stdout);
  }

  void add(const Record& r) { records_.push_back(r); }

  int64_t total_wrong() const {
    int64_t n = 0;
    for (const Record& r : records_) n += r.wrong;
    if (rank_ == 0) std::printf("# %s: %lld wrong\n", n == 0 ? "PASSED" : "FAILED", static_cast<long long>(n));
    return n;
  }

  void write_json(const std::string& path) const {
    if (rank_ != 0) return;
    FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "ep_bench: cannot write %s\n", path.c_str());
      return;
    }
    char date[64];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    std::fprintf(f,
                 "{\"card\": \"%s\", \"date\": \"%s\", \"commit\": \"%s\", \"W\": %d, \"p2p_GBps\": %.3f, "
                 "\"l2_flush\": %s, ",
                 card.c_str(), date, commit().c_str(), W_, p2p_gbps, l2_flush ? "true" : "false");
    std::fprintf(f, "\"p2p_method\": \"%s\",\n \"records\": [", p2p_method.c_str());
    for (size_t i = 0; i < records_.size(); ++i) {
      const Record& r = records_[i];
      std::fprintf(f, "%s\n  {\"T\": %lld, \"H\": %d, \"E\": %d, \"k\": %d, \"routing\": \"%s\"", i ? "," : "",
                   static_cast<long long>(r.T), r.H, r.E, r.k, r.routing.c_str());
      std::fprintf(f, ", \"cross_bytes\": %.0f, \"size_bytes\": %lld, \"rows\": %lld, \"combine_cross_bytes\": %.0f",
                   r.cross.avg, static_cast<long long>(r.size_bytes), static_cast<long long>(r.rows),
                   r.combine_cross.avg);
      std::fprintf(f, ", \"baseline_cross_bytes\": %.0f, \"wrong\": %lld", r.baseline_cross.avg,
                   static_cast<long long>(r.wrong));
      stat(f, "group_bytes", r.group_bytes, 0);
      stat(f, "caller_bytes", r.caller_bytes, 0);
      stat(f, "memory_ratio", r.memory_ratio);
      std::fprintf(f, ", \"expert_major_only\": %d, \"rank_major_only\": %d", r.expert_major_only ? 1 : 0,
                   r.rank_major_only ? 1 : 0);
      stat(f, "dispatch_us", r.dispatch);
      if (r.rank_major) stat(f, "dispatch_rank_major_us", r.dispatch_rank_major);
      stat(f, "combine_us", r.combine);
      stat(f, "e2e_us", r.e2e);
      stat(f, "nccl_a2a_us", r.nccl_a2a);
      stat(f, "nccl_a2a_combine_us", r.nccl_a2a_combine);
      stat(f, "baseline_dispatch_us", r.baseline_dispatch);
      stat(f, "baseline_combine_us", r.baseline_combine);
      stat(f, "baseline_e2e_us", r.baseline_e2e);
      stat(f, "cross_bytes_rank", r.cross);
      if (r.ll) {
        stat(f, "ll_dispatch_us", r.ll_dispatch);
        stat(f, "ll_combine_us", r.ll_combine);
      }
      if (r.ll_graph) {
        stat(f, "ll_graph_dispatch_us", r.ll_graph_dispatch);
        stat(f, "ll_graph_combine_us", r.ll_graph_combine);
      }
      if (r.ll_graph_step) stat(f, "ll_graph_step_us", r.ll_graph_step_time);
      std::fprintf(f, ", \"slowest_rank\": %d}", r.dispatch.slowest);
    }
    std::fprintf(f, "\n ]\n}\n");
    std::fclose(f);
    std::printf("# wrote %s\n", path.c_str());
  }

 private:
  // name = the largest rank's value, then name_min / _avg / _max / _slowest_rank (the largest's rank); digits after
  // the point (bytes: 0).
  static void stat(FILE* f, const char* name, const Stat& s, int digits = 3) {
    std::fprintf(f, ", \"%s\": %.*f, \"%s_min\": %.*f, \"%s_avg\": %.*f, \"%s_max\": %.*f, \"%s_slowest_rank\": %d",
                 name, digits, s.max, name, digits, s.min, name, digits, s.avg, name, digits, s.max, name, s.slowest);
  }
  // BITEP_COMMIT, else `git rev-parse --short HEAD` in the working directory, else "unknown".
  static std::string commit() {
    if (const char* c = std::getenv("BITEP_COMMIT")) return c;
    std::string out;
    if (FILE* p = popen("git rev-parse --short HEAD 2>/dev/null", "r")) {
      char buf[64] = {0};
      if (std::fgets(buf, sizeof(buf), p)) out = buf;
      pclose(p);
    }
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return out.empty() ? "unknown" : out;
  }

  int W_, rank_;
  std::vector<Record> records_;
};

}  // namespace
