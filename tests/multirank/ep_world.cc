// SPDX-License-Identifier: Apache-2.0
#include "tests/multirank/ep_world.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "src/host/dtype_host.h"
#include "tests/reference/inputs.h"

namespace ept {
namespace {

using bitep::ref::mix;

uint64_t hash(uint64_t a, uint64_t b, uint64_t c, uint64_t d = 0, uint64_t e = 0) {
  return mix(mix(mix(mix(mix(a) ^ b) ^ c) ^ d) ^ e);
}

bitep::kernels::DType kd(bitepDataType_t d) {
  return d == bitepBfloat16  ? bitep::kernels::DType::kBF16
         : d == bitepFloat16 ? bitep::kernels::DType::kF16
                             : bitep::kernels::DType::kF32;
}

// k distinct experts of [lo, lo + n), chosen by the hash stream h.
std::vector<int> pick(uint64_t h, int lo, int n, int k) {
  std::vector<int> all(n);
  for (int i = 0; i < n; ++i) all[i] = lo + i;
  for (int i = 0; i < k; ++i) {
    h = mix(h);
    const int j = i + static_cast<int>(h % static_cast<uint64_t>(n - i));
    std::swap(all[i], all[j]);
  }
  all.resize(k);
  return all;
}

}  // namespace

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

size_t dsize(bitepDataType_t d) { return d == bitepFloat32 ? 4 : 2; }
float load(bitepDataType_t d, const void* base, int64_t i) { return bitep::host::load_as_float(base, kd(d), i); }
void store(bitepDataType_t d, void* base, int64_t i, float v) { bitep::host::store_from_float(base, kd(d), i, v); }
float round_to(bitepDataType_t d, float v) {
  uint8_t tmp[4];
  store(d, tmp, 0, v);
  return load(d, tmp, 0);
}

float x_value(const Spec& s, int rank, int64_t t, int h) {
  if (h == 0) return static_cast<float>(rank + 1);
  if (h == 1) return static_cast<float>(t % 251 - 125);
  return static_cast<float>(static_cast<int>(hash(s.seed, 1, rank, t, h) % 255) - 127) / 16.0f;
}

float grad_value(const Spec& s, int rank, int64_t t, int h) {
  return static_cast<float>(static_cast<int>(hash(s.seed, 2, rank, t, h) % 63) - 31) / 8.0f;
}

float toy_a(int e) { return 1.0f + static_cast<float>(e % 5) / 4.0f; }
float toy_b(int e) { return static_cast<float>(e % 7 - 3); }
float toy_y(bitepDataType_t d, int e, float x) { return round_to(d, std::fmaf(toy_a(e), x, toy_b(e))); }

Input make_input(const Spec& s, int W, int rank) {
  Input in;
  const int E = s.E(W), k = s.topk(W), L = s.L;
  in.T = s.tokens(rank, W);
  in.experts.resize(in.T);
  in.w.resize(in.T);
  in.compact.resize(in.T);
  in.x.assign(in.T * s.H * dsize(s.dtype), 0);
  for (int64_t t = 0; t < in.T; ++t) {
    const uint64_t h = hash(s.seed, 3, rank, t);
    std::vector<int> ex;
    if (s.route == Route::kOneRank) {
      ex = pick(h, ((s.target % W) + W) % W * L, L, std::min(k, L));
    } else if (s.route == Route::kHotExpert) {
      const int hot = s.target % E;
      ex = pick(h, 0, E, k);
      if (std::find(ex.begin(), ex.end(), hot) == ex.end()) ex[0] = hot;
    } else {
      ex = pick(h, 0, E, k);
    }
    // Index order: the picking order (not ascending), so indices exercise "weight j <-> index j".
    std::vector<int> order = ex;
    std::sort(ex.begin(), ex.end());
    in.experts[t] = ex;
    for (int e : ex) in.w[t].push_back(static_cast<float>(1 + hash(s.seed, 4, rank, t, e) % 1023) / 1024.0f);
    for (size_t j = 0; j < ex.size(); ++j) {
      if (s.fmt == bitepMapTopkIndices)
        in.compact[t].push_back(static_cast<int>(std::find(order.begin(), order.end(), ex[j]) - order.begin()));
      else
        in.compact[t].push_back(static_cast<int>(j));
    }
    for (int hh = 0; hh < s.H; ++hh) store(s.dtype, in.x.data(), t * s.H + hh, x_value(s, rank, t, hh));
  }
  const int kk = s.route == Route::kOneRank ? std::min(k, L) : k;  // experts per token
  if (s.fmt == bitepMapBitmapU8) {
    const int nb = (E + 7) / 8;
    in.map.assign(in.T * nb, 0);
    for (int64_t t = 0; t < in.T; ++t)
      for (int e : in.experts[t]) in.map[t * nb + e / 8] |= static_cast<uint8_t>(1u << (e % 8));
  } else if (s.fmt == bitepMapBytemap) {
    in.map.assign(in.T * E, 0);
    for (int64_t t = 0; t < in.T; ++t)
      for (int e : in.experts[t]) in.map[t * E + e] = 1;
  } else {
    in.map.assign(in.T * kk * 4, 0);
    int32_t* idx = reinterpret_cast<int32_t*>(in.map.data());
    for (int64_t t = 0; t < in.T; ++t)
      for (size_t j = 0; j < in.experts[t].size(); ++j) idx[t * kk + in.compact[t][j]] = in.experts[t][j];
  }
  if (s.weights == Weights::kDense) {
    in.probs.assign(in.T * E, 0.0f);
    for (int64_t t = 0; t < in.T; ++t)
      for (size_t j = 0; j < in.experts[t].size(); ++j) in.probs[t * E + in.experts[t][j]] = in.w[t][j];
  } else if (s.weights == Weights::kCompact) {
    in.topk.assign(in.T * kk, 0.0f);
    for (int64_t t = 0; t < in.T; ++t)
      for (size_t j = 0; j < in.experts[t].size(); ++j) in.topk[t * kk + in.compact[t][j]] = in.w[t][j];
  }
  return in;
}

std::vector<Input> make_world(const Spec& s, int W) {
  std::vector<Input> all;
  for (int r = 0; r < W; ++r) all.push_back(make_input(s, W, r));
  return all;
}

bitepDispatchArgs_t dispatch_args(const Spec& s, const Input& in) {
  bitepDispatchArgs_t a = BITEP_DISPATCH_ARGS_INIT;
  a.num_tokens = in.T;
  a.x = in.x.empty() ? nullptr : in.x.data();
  a.routing_map = in.map.empty() ? nullptr : in.map.data();
  a.map_format = s.fmt;
  if (s.weights == Weights::kDense) a.probs = in.probs.empty() ? nullptr : in.probs.data();
  if (s.weights == Weights::kCompact) a.topk_weights = in.topk.empty() ? nullptr : in.topk.data();
  return a;
}

GroupGuard::~GroupGuard() {
  if (g != nullptr) bitepGroupDestroy(g);
}

HandleGuard::~HandleGuard() {
  if (h != nullptr) bitepHandleDestroy(h);
}

double test_timeout_s() {
  const char* v = std::getenv("BITEP_TEST_TIMEOUT_S");
  const double t = v != nullptr ? std::atof(v) : 0.0;
  return t > 0 ? t : 30.0;
}

bitepGroupConfig_t group_config(const Spec& s, int W, double timeout_s) {
  bitepGroupConfig_t c = BITEP_GROUP_CONFIG_INIT;
  c.backend = bitepBackendHost;
  c.num_experts = s.E(W);
  c.topk = s.route == Route::kOneRank ? std::min(s.topk(W), s.L) : s.topk(W);
  c.hidden = s.H;
  c.dtype = s.dtype;
  c.expert_alignment = s.align;
  c.timeout_s = timeout_s;
  return c;
}

bitepResult_t make_group(const Spec& s, GroupGuard* out, double timeout_s) {
  const bitepGroupConfig_t c = group_config(s, world_size(), timeout_s);
  return bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &out->g);
}

Expected expected_receive(const Spec& s, int W, int rank, const std::vector<Input>& world) {
  Expected x;
  const int L = s.L;
  x.recv_counts.assign(W, 0);
  x.send_counts.assign(W, 0);
  x.expert_counts.assign(L, 0);
  for (int src = 0; src < W; ++src) {
    const Input& in = world[src];
    for (int64_t t = 0; t < in.T; ++t) {
      std::vector<int> loc;
      std::vector<float> w;
      std::vector<char> to(W, 0);
      for (size_t j = 0; j < in.experts[t].size(); ++j) {
        const int e = in.experts[t][j];
        to[e / L] = 1;
        if (e / L != rank) continue;
        loc.push_back(e % L);
        w.push_back(in.w[t][j]);
      }
      if (src == rank)
        for (int r = 0; r < W; ++r) x.send_counts[r] += to[r];
      if (loc.empty()) continue;
      x.src_rank.push_back(src);
      x.src_token.push_back(t);
      for (int l : loc) ++x.expert_counts[l];
      x.local.push_back(loc);
      x.wrow.push_back(w);
      ++x.recv_counts[src];
    }
  }
  x.R = static_cast<int64_t>(x.src_rank.size());
  x.expert_offsets.assign(L + 1, 0);
  for (int l = 0; l < L; ++l)
    x.expert_offsets[l + 1] = x.expert_offsets[l] + (x.expert_counts[l] + s.align - 1) / s.align * s.align;
  x.N = x.expert_offsets[L];
  return x;
}

std::vector<uint8_t> toy_expert_outputs(const Spec& s, int W, int rank, const bitepDispatchLayout_t& lo) {
  (void)W;
  const int64_t N = lo.num_expert_rows;
  std::vector<uint8_t> y(N * s.H * dsize(s.dtype));
  for (int64_t i = 0; i < N * s.H; ++i) store(s.dtype, y.data(), i, 777.0f);  // poison: pad rows must not be read
  for (int l = 0; l < lo.num_local_experts; ++l) {
    const int e = rank * s.L + l;
    for (int64_t row = lo.expert_offsets[l]; row < lo.expert_offsets[l] + lo.expert_counts[l]; ++row)
      for (int h = 0; h < s.H; ++h)
        store(s.dtype, y.data(), row * s.H + h, toy_y(s.dtype, e, load(s.dtype, lo.expert_x, row * s.H + h)));
  }
  return y;
}

std::vector<float> reference_combine(const Spec& s, int W, int rank, const Input& in, bool weighted) {
  std::vector<float> out(in.T * s.H, 0.0f);
  for (int64_t t = 0; t < in.T; ++t) {
    for (int h = 0; h < s.H; ++h) {
      const float x = x_value(s, rank, t, h);
      float total = 0.0f;
      for (int r = 0; r < W; ++r) {
        float acc = 0.0f;
        bool any = false;
        for (size_t j = 0; j < in.experts[t].size(); ++j) {
          const int e = in.experts[t][j];
          if (e / s.L != r) continue;
          any = true;
          acc = std::fmaf(weighted ? in.w[t][j] : 1.0f, toy_y(s.dtype, e, x), acc);
        }
        if (any) total = total + round_to(s.dtype, acc);
      }
      out[t * s.H + h] = round_to(s.dtype, total);
    }
  }
  return out;
}

std::vector<Spec> spec_grid() {
  std::vector<Spec> v;
  auto add = [&](const char* name, auto&& tweak) {
    Spec s;
    s.name = name;
    tweak(s);
    v.push_back(s);
  };
  add("basic", [](Spec&) {});
  add("zero_tokens_odd_ranks", [](Spec& s) { s.tokens = [](int r, int) { return r % 2 ? int64_t{0} : int64_t{6}; }; });
  add("zero_tokens_everywhere", [](Spec& s) { s.tokens = [](int, int) { return int64_t{0}; }; });
  add("one_token", [](Spec& s) { s.tokens = [](int, int) { return int64_t{1}; }; });
  add("all_to_last_rank", [](Spec& s) {
    s.route = Route::kOneRank;
    s.target = -1;  // W - 1 (mod W below)
    s.tokens = [](int r, int) { return int64_t{4} + r; };
  });
  add("all_to_rank0_k3", [](Spec& s) {
    s.route = Route::kOneRank;
    s.target = 0;
    s.k = 3;
  });
  add("hot_expert", [](Spec& s) {
    s.route = Route::kHotExpert;
    s.target = 1;
    s.k = 3;
  });
  add("L1_E_eq_W", [](Spec& s) {
    s.L = 1;
    s.k = 2;
  });
  add("L5_k3_fp16", [](Spec& s) {
    s.L = 5;
    s.k = 3;
    s.dtype = bitepFloat16;
  });
  add("L9_k4_align4", [](Spec& s) {
    s.L = 9;
    s.k = 4;
    s.align = 4;
  });
  add("k1", [](Spec& s) { s.k = 1; });
  add("k_eq_E_H5", [](Spec& s) {
    s.L = 3;
    s.k = 1 << 20;  // clamped to E
    s.H = 5;
  });
  add("H7_fp32_align8", [](Spec& s) {
    s.H = 7;
    s.dtype = bitepFloat32;
    s.align = 8;
  });
  add("H1", [](Spec& s) { s.H = 1; });
  add("bytemap_dense", [](Spec& s) {
    s.fmt = bitepMapBytemap;
    s.weights = Weights::kDense;
  });
  add("bitmap_dense", [](Spec& s) { s.weights = Weights::kDense; });
  add("bytemap_compact_L10", [](Spec& s) {
    s.fmt = bitepMapBytemap;
    s.L = 10;
    s.k = 3;
  });
  add("indices_compact", [](Spec& s) {
    s.fmt = bitepMapTopkIndices;
    s.k = 3;
  });
  add("indices_dense_fp16", [](Spec& s) {
    s.fmt = bitepMapTopkIndices;
    s.weights = Weights::kDense;
    s.dtype = bitepFloat16;
  });
  add("no_weights", [](Spec& s) { s.weights = Weights::kNone; });
  add("many_tokens", [](Spec& s) {
    s.tokens = [](int r, int) { return int64_t{200} + 37 * r; };
    s.H = 16;
    s.L = 3;
    s.k = 4;
    s.align = 16;
  });
  return v;
}

std::vector<Spec> random_specs(int n, uint64_t seed) {
  static const char* const kDtype[] = {"fp32", "bf16", "fp16"};
  static const bitepMapFormat_t kFmt[] = {bitepMapBitmapU8, bitepMapBytemap, bitepMapTopkIndices};
  static const char* const kFmtName[] = {"bitmap", "bytemap", "indices"};
  static const char* const kWeights[] = {"noweights", "dense", "compact"};
  static const char* const kRoute[] = {"random", "onerank", "hot"};
  std::vector<Spec> v;
  for (int i = 0; i < n; ++i) {
    auto draw = [&](int what, int m) { return static_cast<int>(hash(seed, 9, i, what) % m); };
    Spec s;
    s.seed = seed + i;
    s.L = 1 + draw(0, 12);
    s.k = 1 + draw(1, 9);  // clamped to E
    s.H = 1 + draw(2, 40);
    const int dt = draw(3, 3), fmt = draw(5, 3), wt = draw(6, 3), route = draw(7, 3);
    s.dtype = static_cast<bitepDataType_t>(dt);
    s.align = 1 << draw(4, 5);
    s.fmt = kFmt[fmt];
    s.weights = static_cast<Weights>(wt);
    s.route = static_cast<Route>(route);
    s.target = draw(8, 64);  // the rank (mod W) or the hot expert (mod E)
    const uint64_t ts = hash(seed, 10, i);
    const int most = draw(9, 41);  // tokens a rank, 0 included
    s.tokens = [ts, most](int r, int) { return static_cast<int64_t>(hash(ts, 11, r) % (most + 1)); };
    s.name = "random" + std::to_string(i) + "_L" + std::to_string(s.L) + "_k" + std::to_string(s.k) + "_H" +
             std::to_string(s.H) + "_" + kDtype[dt] + "_align" + std::to_string(s.align) + "_" + kFmtName[fmt] + "_" +
             kWeights[wt] + "_" + kRoute[route];
    v.push_back(s);
  }
  return v;
}

}  // namespace ept
