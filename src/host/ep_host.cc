// SPDX-License-Identifier: Apache-2.0
// Host reference of the expert-parallel primitives: the exact semantics written in kernels/ep_params.h,
// in plain loops (ascending token, rank and expert order; fp32 with fmaf; one rounding per output).
#include "src/host/ep_host.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "src/host/dtype_host.h"

namespace bitep::host {
namespace {

using kernels::DType;
using kernels::RoutingFormat;
using kernels::RoutingInput;
using kernels::WeightFormat;

// Decodes one token's routed experts (ep_params.h "Routed experts"): ascending expert order, each with
// its compact position (the index of its weight in a [T, k] compact row).
class RowDecoder {
 public:
  RowDecoder(const RoutingInput& in, int num_experts, int topk)
      : in_(in), E_(num_experts), k_(topk), seen_(in.format == RoutingFormat::kTopkIndices ? num_experts : 0, 0) {}

  // Fills experts[0..n) and compact[0..n), returns n <= k.
  int decode(int64_t t, int* experts, int* compact) {
    int n = 0;
    if (in_.format == RoutingFormat::kBitmap) {
      const int nb = kernels::bitmap_bytes(E_);
      const uint8_t* row = static_cast<const uint8_t*>(in_.map) + t * nb;
      for (int b = 0; b < nb && n < k_; ++b) {
        unsigned v = row[b];
        while (v != 0 && n < k_) {
          const int bit = __builtin_ctz(v);
          v &= v - 1;
          const int e = b * 8 + bit;
          if (e >= E_) break;
          experts[n] = e;
          compact[n] = n;
          ++n;
        }
      }
    } else if (in_.format == RoutingFormat::kBytemap) {
      const uint8_t* row = static_cast<const uint8_t*>(in_.map) + t * E_;
      for (int e = 0; e < E_ && n < k_; ++e) {
        if (row[e] != 0) {
          experts[n] = e;
          compact[n] = n;
          ++n;
        }
      }
    } else {
      const int32_t* row = static_cast<const int32_t*>(in_.map) + t * k_;
      for (int j = 0; j < k_; ++j) {
        const int32_t e = row[j];
        if (e < 0 || e >= E_ || seen_[e]) continue;
        seen_[e] = 1;
        // insertion into ascending expert order
        int p = n++;
        while (p > 0 && experts[p - 1] > e) {
          experts[p] = experts[p - 1];
          compact[p] = compact[p - 1];
          --p;
        }
        experts[p] = e;
        compact[p] = j;
      }
      for (int i = 0; i < n; ++i) seen_[experts[i]] = 0;
    }
    return n;
  }

  float weight(int64_t t, int expert, int compact) const {
    switch (in_.weight_format) {
      case WeightFormat::kDense:
        return in_.weights[t * E_ + expert];
      case WeightFormat::kCompact:
        return in_.weights[t * k_ + compact];
      default:
        return 0.0f;
    }
  }

 private:
  const RoutingInput& in_;
  int E_, k_;
  std::vector<uint8_t> seen_;
};

inline int map_bit(const uint8_t* row, int l) { return (row[l >> 3] >> (l & 7)) & 1; }

}  // namespace

void ep_layout(const kernels::LayoutParams& p) {
  if (p.num_tokens <= 0) return;
  if (p.map_copy != nullptr)
    std::memcpy(p.map_copy, p.routing.map,
                kernels::routing_map_bytes(p.routing.format, p.num_tokens, p.num_experts, p.topk));
  const int W = p.num_ranks, L = p.num_experts / p.num_ranks;
  std::fill(p.counts, p.counts + static_cast<int64_t>(W) * (L + 1), 0);
  RowDecoder dec(p.routing, p.num_experts, p.topk);
  std::vector<int> experts(p.topk), compact(p.topk);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int n = dec.decode(t, experts.data(), compact.data());
    int32_t* slot = p.token_slot + t * W;
    std::fill(slot, slot + W, -1);
    for (int i = 0; i < n; ++i) {
      const int r = experts[i] / L, l = experts[i] % L;
      int32_t* c = p.counts + static_cast<int64_t>(r) * (L + 1);
      if (slot[r] < 0) slot[r] = c[0]++;
      ++c[1 + l];
    }
  }
  if (p.pack_out != nullptr) ep_pack_counts(kernels::layout_pack(p));
}

void ep_pack_counts(const kernels::PackCountsParams& p) {
  const int W = p.num_ranks, L = p.local_experts;
  for (int peer = 0; peer < W; ++peer) {
    int32_t* row = p.out + static_cast<int64_t>(peer) * p.row;
    for (int c = 0; c <= L; ++c) row[c] = p.counts[static_cast<int64_t>(peer) * (L + 1) + c];
    row[L + 1] = p.flags;
    for (int r = 0; r < W; ++r) row[L + 2 + r] = p.counts[static_cast<int64_t>(r) * (L + 1)];
  }
}

void ep_permute(const kernels::PermuteParams& p) {
  if (p.num_tokens <= 0) return;
  const int W = p.num_ranks, L = p.num_experts / p.num_ranks;
  const int MB = kernels::local_map_bytes(L), KL = kernels::max_row_experts(p.topk, L);
  const size_t row_bytes = static_cast<size_t>(p.hidden) * dtype_bytes(p.dtype);
  const bool weights = p.routing.weight_format != WeightFormat::kNone;
  const bool need_routing = p.send_map || p.recv_map || (weights && (p.send_weights || p.recv_weights));
  RowDecoder dec(p.routing, p.num_experts, p.topk);
  std::vector<int> experts(p.topk), compact(p.topk);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int n = need_routing ? dec.decode(t, experts.data(), compact.data()) : 0;
    const int32_t* slot = p.token_slot + t * W;
    int i = 0;  // first expert of rank r in experts[]
    for (int r = 0; r < W; ++r) {
      const int begin = i;
      while (i < n && experts[i] / L == r) ++i;
      if (slot[r] < 0) continue;
      const bool self = r == p.self_rank;
      if (self && p.self_tokens != nullptr) p.self_tokens[slot[r]] = static_cast<int32_t>(t);
      const bool dest = !self && p.peer_dest != nullptr;
      const int64_t q = self ? p.self_recv_offset + slot[r] : dest ? slot[r] : p.send_offsets[r] + slot[r];
      void* x_dst = self ? p.recv_x : dest ? p.peer_dest[r] : p.send_x;
      if (x_dst != nullptr && row_bytes > 0)
        std::memcpy(static_cast<char*>(x_dst) + q * row_bytes, static_cast<const char*>(p.x) + t * row_bytes,
                    row_bytes);
      uint8_t* map = self ? p.recv_map : dest ? static_cast<uint8_t*>(p.peer_dest[W + r]) : p.send_map;
      if (map != nullptr) {
        uint8_t* m = map + q * MB;
        std::memset(m, 0, MB);
        for (int j = begin; j < i; ++j) {
          const int l = experts[j] - r * L;
          m[l >> 3] = static_cast<uint8_t>(m[l >> 3] | (1u << (l & 7)));
        }
      }
      float* wrow = self ? p.recv_weights : dest ? static_cast<float*>(p.peer_dest[2 * W + r]) : p.send_weights;
      if (weights && wrow != nullptr) {
        float* w = wrow + q * KL;
        int j = 0;
        for (int e = begin; e < i && j < KL; ++e, ++j) w[j] = dec.weight(t, experts[e], compact[e]);
        for (; j < KL; ++j) w[j] = 0.0f;
      }
    }
  }
}

void ep_expert_major(const kernels::ExpertMajorParams& p) {
  const int L = p.num_local_experts, KL = p.max_row_experts, MB = kernels::local_map_bytes(L);
  const size_t elem = dtype_bytes(p.dtype), row_bytes = static_cast<size_t>(p.hidden) * elem;
  const bool move = p.recv_x != nullptr && (p.expert_x != nullptr || p.recv_copy != nullptr);
  std::vector<int64_t> next(L);
  for (int l = 0; l < L; ++l) next[l] = p.expert_offsets[l];
  for (int64_t i = 0; i < p.num_recv_rows; ++i) {
    int32_t* rows = p.recv_expert_rows + i * KL;
    if (!p.positions_given) {
      const uint8_t* m = p.recv_map + i * MB;
      int j = 0;
      for (int l = 0; l < L && j < KL; ++l) {
        if (!map_bit(m, l)) continue;
        const int64_t end = static_cast<int64_t>(p.expert_offsets[l]) + p.expert_counts[l];
        const int64_t pos = next[l]++;
        rows[j++] = pos < end ? static_cast<int32_t>(pos) : -1;
      }
      for (; j < KL; ++j) rows[j] = -1;
    }
    if (!move) continue;
    const int64_t copy_end = p.copy_end < 0 ? p.num_recv_rows : p.copy_end;
    if ((i >= p.copy_begin && i < copy_end) == p.copy_outside) continue;
    const int64_t srow = p.src_index != nullptr ? p.src_index[i - p.copy_begin] : i;
    const char* src = static_cast<const char*>(p.recv_x) + srow * row_bytes;
    if (p.recv_copy != nullptr) std::memcpy(static_cast<char*>(p.recv_copy) + i * row_bytes, src, row_bytes);
    for (int j = 0; p.expert_x != nullptr && j < KL; ++j) {  // null: the rank-major copy alone
      const int64_t pos = rows[j];
      if (pos < 0 || pos >= p.num_expert_rows) continue;
      char* dst = static_cast<char*>(p.expert_x) + pos * row_bytes;
      if (p.recv_weights == nullptr) {
        std::memcpy(dst, src, row_bytes);
      } else {
        const float w = p.recv_weights[i * KL + j];
        for (int64_t h = 0; h < p.hidden; ++h) store_from_float(dst, p.dtype, h, w * load_as_float(src, p.dtype, h));
      }
    }
  }
  if (p.expert_x == nullptr || !p.zero_pads) return;
  for (int l = 0; l < L; ++l) {
    const int64_t begin = static_cast<int64_t>(p.expert_offsets[l]) + p.expert_counts[l], end = p.expert_offsets[l + 1];
    if (end > begin) std::memset(static_cast<char*>(p.expert_x) + begin * row_bytes, 0, (end - begin) * row_bytes);
  }
}

void ep_expert_sources(const kernels::ExpertSourcesParams& p) {
  for (int64_t r = 0; r < p.num_expert_rows; ++r) p.sources[r] = -1;
  const int KL = p.max_row_experts;
  for (int64_t e = 0; e < p.num_recv_rows * KL; ++e) {
    const int64_t pos = p.recv_expert_rows[e];
    if (pos >= 0 && pos < p.num_expert_rows) p.sources[pos] = static_cast<int32_t>(e / KL);
  }
}

void ep_copy_batch(const kernels::CopyBatchParams& p) {
  for (int q = 0; q < p.count; ++q)
    if (p.bytes[q] > 0) std::memcpy(p.dst[q], p.src[q], static_cast<size_t>(p.bytes[q]));
}

void ep_reduce(const kernels::ReduceParams& p) {
  const int KL = p.max_row_experts;
  const int64_t H = p.hidden;
  std::vector<float> acc(H);
  int s = 0;  // the source of row i (num_sources > 0)
  void* const* outs = p.outs + static_cast<int64_t>(kernels::host_slot_parity(p.outs_parity)) * p.num_sources;
  for (int64_t i = 0; i < p.num_recv_rows; ++i) {
    const int32_t* rows = p.recv_expert_rows + i * KL;
    void* out = p.out;
    int64_t o = i;
    if (p.num_sources > 0) {
      while (s + 1 < p.num_sources && p.row_offsets[s + 1] <= i) ++s;
      out = outs[s];
      o = i - p.row_offsets[s];
    }
    if (out != nullptr && !(p.skip_empty_rows && (KL < 1 || rows[0] < 0))) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int j = 0; j < KL; ++j) {
        const int32_t pos = rows[j];
        if (pos < 0) continue;
        const float w = p.recv_weights ? p.recv_weights[i * KL + j] : 1.0f;
        for (int64_t h = 0; h < H; ++h) acc[h] = std::fmaf(w, load_as_float(p.y, p.dtype, pos * H + h), acc[h]);
      }
      for (int64_t h = 0; h < H; ++h) store_from_float(out, p.dtype, o * H + h, acc[h]);
    }
    if (p.grad_weights != nullptr && p.grad_rows != nullptr) {
      for (int j = 0; j < KL; ++j) {
        const int32_t pos = rows[j];
        float d = 0.0f;
        if (pos >= 0)
          for (int64_t h = 0; h < H; ++h)
            d = std::fmaf(load_as_float(p.y, p.dtype, pos * H + h), load_as_float(p.grad_rows, p.dtype, i * H + h), d);
        p.grad_weights[i * KL + j] = d;
      }
    }
  }
}

void ep_final_sum(const kernels::FinalSumParams& p) {
  const int W = p.num_ranks;
  const int64_t H = p.hidden;
  std::vector<float> acc(H);
  const int64_t shift = kernels::host_slot_parity(p.ret_parity) * p.ret_parity_bytes;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int32_t* slot = p.token_slot + t * W;
    for (int r = 0; r < W; ++r) {
      if (slot[r] < 0) continue;
      const bool self = r == p.self_rank;
      const void* src = static_cast<const char*>(self ? p.self_ret : p.ret) + shift;
      const int64_t q = (self ? p.self_ret_offset : p.send_offsets[r]) + slot[r];
      for (int64_t h = 0; h < H; ++h) acc[h] = acc[h] + load_as_float(src, p.dtype, q * H + h);
    }
    for (int64_t h = 0; h < H; ++h) store_from_float(p.out, p.dtype, t * H + h, acc[h]);
  }
}

void ep_weight_grad(const kernels::WeightGradParams& p) {
  if (p.num_tokens <= 0) return;
  const int W = p.num_ranks, E = p.num_experts, k = p.topk, L = E / W, KL = kernels::max_row_experts(k, L);
  const bool dense = p.routing.weight_format == WeightFormat::kDense && p.grad_dense != nullptr;
  const bool compact_out = p.routing.weight_format == WeightFormat::kCompact && p.grad_compact != nullptr;
  if (!dense && !compact_out) return;
  RowDecoder dec(p.routing, E, k);
  std::vector<int> experts(k), compact(k);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    if (dense) std::fill(p.grad_dense + t * E, p.grad_dense + (t + 1) * E, 0.0f);
    if (compact_out) std::fill(p.grad_compact + t * k, p.grad_compact + (t + 1) * k, 0.0f);
    const int n = dec.decode(t, experts.data(), compact.data());
    const int32_t* slot = p.token_slot + t * W;
    int i = 0;
    for (int r = 0; r < W; ++r) {
      const int begin = i;
      while (i < n && experts[i] / L == r) ++i;
      if (slot[r] < 0) continue;
      const bool self = r == p.self_rank;
      const float* q =
          self ? p.self_grad_w + (p.self_offset + slot[r]) * KL : p.ret_grad_w + (p.send_offsets[r] + slot[r]) * KL;
      for (int j = begin, jj = 0; j < i && jj < KL; ++j, ++jj) {
        if (dense) p.grad_dense[t * E + experts[j]] = q[jj];
        if (compact_out) p.grad_compact[t * k + compact[j]] = q[jj];
      }
    }
  }
}

}  // namespace bitep::host
