// SPDX-License-Identifier: Apache-2.0
// Random router calls through the C API on the host backend, each one twice. First as built, valid: it must succeed,
// write inside each output's bounds (guard bytes around every buffer) and give each token exactly k distinct experts,
// the same in the map, the compact outputs and the rank epilogue. Then with one field broken: it must fail with
// bitepInvalidArgument naming that field, and write nothing. Where the forward wrote a map, the backward the same way:
// from the saved tensor or the logits, within grad_logits' bounds, then with one field broken. The aux-loss scores
// the same way. The draws cover shapes and option combinations that the one-rule-a-test cases (router_args_test.cc)
// do not. scripts/test.sh runs them under ASan and UBSan too.
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bitep/bitep.h"

namespace {

constexpr size_t kGuard = 64;
constexpr uint8_t kPoison = 0xA5;

// `bytes` bytes between guard bytes, every byte kPoison at first (a 16-byte aligned start).
class Guarded {
 public:
  explicit Guarded(size_t bytes) : raw_(kGuard + bytes + kGuard, kPoison), bytes_(bytes) {}
  uint8_t* data() { return raw_.data() + kGuard; }
  const uint8_t* data() const { return raw_.data() + kGuard; }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (raw_[i] != kPoison || raw_[kGuard + bytes_ + i] != kPoison) return false;
    return true;
  }
  bool untouched() const {
    for (size_t i = 0; i < bytes_; ++i)
      if (data()[i] != kPoison) return false;
    return true;
  }

 private:
  std::vector<uint8_t> raw_;
  size_t bytes_;
};

int map_bytes(int E) { return (E + 7) / 8; }

// A call's shape and options, valid by construction.
struct Draw {
  bitepRouterConfig_t cfg;
  int64_t T;
  bool bias, probs, weights, indices, saved, rank_mask, rank_counts;
  bitepMapFormat_t map;
  int W;
  uint64_t seed;
  int launch_flags;  // 0 or BITEP_LAUNCH_PDL (the host backend takes and ignores it)
};

template <class R>
int pick(R& rng, int lo, int hi) {  // uniform in [lo, hi]
  return std::uniform_int_distribution<int>(lo, hi)(rng);
}

Draw draw_valid(std::mt19937_64& rng) {
  static const int kExperts[] = {1, 2, 3, 5, 7, 8, 9, 16, 20, 24, 33, 40, 64, 96, 100, 128, 130, 160, 256};
  Draw d{};
  d.cfg = BITEP_ROUTER_CONFIG_INIT;
  const int E = kExperts[pick(rng, 0, sizeof(kExperts) / sizeof(kExperts[0]) - 1)];
  d.cfg.num_experts = E;
  d.cfg.score_function = static_cast<bitepScoreFunction_t>(pick(rng, 0, 2));
  d.cfg.use_pre_softmax = d.cfg.score_function == bitepScoreSoftmax ? pick(rng, 0, 1) : 0;
  d.cfg.logits_dtype = static_cast<bitepDataType_t>(pick(rng, 0, 2));
  d.cfg.scaling_factor = std::uniform_real_distribution<float>(0.25f, 3.0f)(rng);
  std::vector<int> divisors;
  for (int g = 2; g <= E; ++g)
    if (E % g == 0) divisors.push_back(g);
  if (!divisors.empty() && pick(rng, 0, 2) == 0) {  // groups: k and group_topk within the config's rules
    const int ng = divisors[pick(rng, 0, static_cast<int>(divisors.size()) - 1)], gsz = E / ng;
    d.cfg.num_groups = ng;
    d.cfg.group_topk = pick(rng, 1, std::min(ng, 12));  // k of 12 at most, and group_topk <= k
    d.cfg.topk = pick(rng, d.cfg.group_topk, std::min(d.cfg.group_topk * gsz, 12));
  } else {
    d.cfg.topk = pick(rng, 1, std::min(E, 12));
    if (pick(rng, 0, 7) == 0) d.cfg.topk = E;
  }
  d.T = pick(rng, 0, 9);
  d.bias = d.cfg.score_function != bitepScoreSoftmax && pick(rng, 0, 1);
  d.probs = pick(rng, 0, 1);
  d.weights = pick(rng, 0, 1);
  d.indices = pick(rng, 0, 1);
  d.saved = pick(rng, 0, 1);
  d.map = static_cast<bitepMapFormat_t>(pick(rng, 0, 2));
  d.W = 0;
  std::vector<int> ranks;
  for (int w = 1; w <= E; ++w)
    if (E % w == 0) ranks.push_back(w);
  if (pick(rng, 0, 2) == 0) {
    d.W = ranks[pick(rng, 0, static_cast<int>(ranks.size()) - 1)];
    d.rank_mask = pick(rng, 0, 1);
    d.rank_counts = pick(rng, 0, 1);
  }
  d.seed = rng();
  d.launch_flags = pick(rng, 0, 1) ? BITEP_LAUNCH_PDL : 0;
  return d;
}

// Each logits dtype's bits (by bitepDataType_t): -inf, a quiet NaN, and the fields of a normal number.
struct Encoding {
  uint32_t ninf, nan;
  int sign_bit, bias, mant_bits, bytes;
};
constexpr Encoding kEncodings[] = {
    {0xff800000u, 0x7fc00000u, 31, 127, 23, 4},  // fp32
    {0xff80u, 0x7fc0u, 15, 127, 7, 2},           // bf16
    {0xfc00u, 0x7e00u, 15, 15, 10, 2},           // fp16
};

// The buffers of one call: outputs poisoned, logits from the draw's seed (every dtype's encoding of a value in
// (-4, 4), some rows degenerate: all -inf, or a NaN among them).
struct Call {
  explicit Call(const Draw& d)
      : E(d.cfg.num_experts),
        k(d.cfg.topk),
        T(d.T),
        logits(static_cast<size_t>(T * E) * (d.cfg.logits_dtype == bitepFloat32 ? 4 : 2)),
        bias(d.bias ? E * 4 : 0),
        probs(d.probs ? T * E * 4 : 0),
        saved(d.saved ? T * E * 4 : 0),
        map(d.map == bitepMapBitmapU8  ? T * map_bytes(E)
            : d.map == bitepMapBytemap ? T * E
                                       : 0),
        weights(d.weights ? T * k * 4 : 0),
        indices(d.indices ? T * k * 4 : 0),
        rank_mask(d.W > 0 && d.rank_mask ? T * map_bytes(d.W) : 0),
        rank_counts(d.W > 0 && d.rank_counts ? d.W * 4 : 0) {
    std::mt19937_64 rng(d.seed);
    for (int64_t t = 0; t < T; ++t) {
      const int kind = pick(rng, 0, 19);  // 0: all -inf, 1: one NaN, else finite
      finite_row.push_back(kind >= 2);
      const int nan_at = pick(rng, 0, E - 1);
      for (int e = 0; e < E; ++e) {
        const size_t i = static_cast<size_t>(t * E + e);
        const uint32_t sign = static_cast<uint32_t>(pick(rng, 0, 1));
        const int exp = pick(rng, -6, 1);  // |x| in [2^-6, 4)
        const uint32_t mant = static_cast<uint32_t>(rng());
        const bool ninf = kind == 0, nan = kind == 1 && e == nan_at;
        const Encoding& f = kEncodings[d.cfg.logits_dtype];
        const uint32_t b = ninf  ? f.ninf
                           : nan ? f.nan
                                 : sign << f.sign_bit | static_cast<uint32_t>(exp + f.bias) << f.mant_bits |
                                       (mant & ((1u << f.mant_bits) - 1u));
        if (f.bytes == 4) {
          std::memcpy(logits.data() + 4 * i, &b, 4);
        } else {
          const uint16_t h = static_cast<uint16_t>(b);
          std::memcpy(logits.data() + 2 * i, &h, 2);
        }
      }
    }
    for (int e = 0; e < (d.bias ? E : 0); ++e) {
      const float b = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
      std::memcpy(bias.data() + 4 * e, &b, 4);
    }
    args = BITEP_ROUTER_FWD_ARGS_INIT;
    args.num_tokens = T;
    args.logits = logits.data();
    args.expert_bias = d.bias ? reinterpret_cast<const float*>(bias.data()) : nullptr;
    args.probs = d.probs ? reinterpret_cast<float*>(probs.data()) : nullptr;
    args.saved = d.saved ? reinterpret_cast<float*>(saved.data()) : nullptr;
    args.routing_map = d.map != bitepMapNone ? map.data() : nullptr;
    args.map_format = d.map;
    args.topk_weights = d.weights ? reinterpret_cast<float*>(weights.data()) : nullptr;
    args.topk_indices = d.indices ? reinterpret_cast<int32_t*>(indices.data()) : nullptr;
    args.num_ranks = d.W;
    args.rank_mask = d.W > 0 && d.rank_mask ? rank_mask.data() : nullptr;
    args.rank_counts = d.W > 0 && d.rank_counts ? reinterpret_cast<int32_t*>(rank_counts.data()) : nullptr;
    args.launch_flags = d.launch_flags;
  }

  std::vector<const Guarded*> outputs() const {
    return {&probs, &saved, &map, &weights, &indices, &rank_mask, &rank_counts};
  }

  int E, k;
  int64_t T;
  std::vector<bool> finite_row;  // [T]: the row's logits all finite
  Guarded logits, bias, probs, saved, map, weights, indices, rank_mask, rank_counts;
  bitepRouterForwardArgs_t args;
};

std::string describe(const Draw& d) {
  const bitepRouterConfig_t& c = d.cfg;
  return "E=" + std::to_string(c.num_experts) + " k=" + std::to_string(c.topk) +
         " score=" + std::to_string(c.score_function) + " pre=" + std::to_string(c.use_pre_softmax) +
         " groups=" + std::to_string(c.num_groups) + "/" + std::to_string(c.group_topk) +
         " dtype=" + std::to_string(c.logits_dtype) + " T=" + std::to_string(d.T) + " map=" + std::to_string(d.map) +
         " W=" + std::to_string(d.W) + " bias=" + std::to_string(d.bias);
}

// A valid call's outputs: each token's k experts, one set in every output that holds it.
void check_outputs(const Draw& d, const Call& c) {
  const int E = c.E, k = c.k, W = d.W;
  std::vector<int32_t> counts(W, 0);
  for (int64_t t = 0; t < c.T; ++t) {
    std::vector<int> experts;  // ascending, from the map when there is one, else from the indices
    if (d.map == bitepMapBitmapU8) {
      const uint8_t* row = c.map.data() + t * map_bytes(E);
      for (int e = 0; e < E; ++e)
        if ((row[e / 8] >> (e % 8)) & 1) experts.push_back(e);
      if (E % 8 != 0) ASSERT_EQ(row[E / 8] >> (E % 8), 0) << "token " << t << ": a pad bit set";
    } else if (d.map == bitepMapBytemap) {
      const uint8_t* row = c.map.data() + t * E;
      for (int e = 0; e < E; ++e) {
        ASSERT_LE(row[e], 1) << "token " << t;
        if (row[e]) experts.push_back(e);
      }
    }
    if (d.map != bitepMapNone) ASSERT_EQ(static_cast<int>(experts.size()), k) << "token " << t;
    if (d.indices) {
      const int32_t* idx = reinterpret_cast<const int32_t*>(c.indices.data()) + t * k;
      for (int j = 0; j < k; ++j) {
        ASSERT_GE(idx[j], 0) << "token " << t;
        ASSERT_LT(idx[j], E) << "token " << t;
        if (j > 0) ASSERT_LT(idx[j - 1], idx[j]) << "token " << t << ": indices not ascending and distinct";
        if (d.map != bitepMapNone) ASSERT_EQ(idx[j], experts[j]) << "token " << t << ": indices and map differ";
      }
      if (d.map == bitepMapNone) experts.assign(idx, idx + k);
    }
    if (d.probs && !experts.empty()) {  // the routed weights where the map is, 0 elsewhere
      const float* p = reinterpret_cast<const float*>(c.probs.data()) + t * E;
      size_t j = 0;
      for (int e = 0; e < E; ++e) {
        const bool routed = j < experts.size() && experts[j] == e;
        if (routed) ++j;
        if (!routed) ASSERT_EQ(p[e], 0.0f) << "token " << t << " expert " << e;
      }
      if (d.weights) {
        const float* w = reinterpret_cast<const float*>(c.weights.data()) + t * k;
        for (int i = 0; i < k; ++i)
          ASSERT_EQ(std::memcmp(&w[i], &p[experts[i]], 4), 0) << "token " << t << ": weight and probs differ";
      }
    }
    if (W > 0 && !experts.empty()) {
      const int L = E / W;
      std::vector<bool> to(W, false);
      for (int e : experts) to[e / L] = true;
      for (int r = 0; r < W; ++r) counts[r] += to[r] ? 1 : 0;
      if (d.rank_mask) {
        const uint8_t* row = c.rank_mask.data() + t * map_bytes(W);
        for (int r = 0; r < W; ++r) ASSERT_EQ(((row[r / 8] >> (r % 8)) & 1) != 0, to[r]) << "token " << t;
        if (W % 8 != 0) ASSERT_EQ(row[W / 8] >> (W % 8), 0) << "token " << t << ": a pad bit of the rank mask";
      }
    }
  }
  const bool experts_known = d.map != bitepMapNone || d.indices;
  if (W > 0 && d.rank_counts && experts_known) {
    const int32_t* got = reinterpret_cast<const int32_t*>(c.rank_counts.data());
    for (int r = 0; r < W; ++r) ASSERT_EQ(got[r], counts[r]) << "rank " << r;
  }
}

// A refused call: bitepInvalidArgument, its message led by the API's name and naming `field`, no output written.
void expect_refused(bitepResult_t r, const char* api, const char* field, const std::vector<const Guarded*>& outputs) {
  ASSERT_EQ(r, bitepInvalidArgument) << api << ", broken: " << field << ": " << bitepGetErrorString(r);
  const std::string msg = bitepGetLastError();
  ASSERT_EQ(msg.rfind(std::string(api) + ": ", 0), 0u) << msg;
  ASSERT_NE(msg.find(field), std::string::npos) << msg;
  for (const Guarded* g : outputs) {
    ASSERT_TRUE(g->guards_intact()) << "a write past an output's bounds on a rejected call";
    ASSERT_TRUE(g->untouched()) << "a rejected call wrote an output";
  }
}

// One field broken on a valid draw: the field the error must name, or nullptr where no mutation fits the draw.
const char* break_one(std::mt19937_64& rng, Draw* d, Call* c) {
  bitepRouterConfig_t& cfg = d->cfg;
  bitepRouterForwardArgs_t& a = c->args;
  for (int tries = 0; tries < 32; ++tries) {
    switch (pick(rng, 0, 14)) {
      case 0:
        cfg.num_experts = -pick(rng, 0, 3);
        return "config->num_experts";
      case 1:
        cfg.topk = pick(rng, 0, 1) ? 0 : cfg.num_experts + 1;
        return "config->topk";
      case 2:
        cfg.score_function = static_cast<bitepScoreFunction_t>(pick(rng, 0, 1) ? -1 : 3 + pick(rng, 0, 1000));
        return "config->score_function";
      case 3:
        cfg.logits_dtype = static_cast<bitepDataType_t>(pick(rng, 0, 1) ? -7 : 3);
        return "config->logits_dtype";
      case 4:
        cfg.use_pre_softmax = pick(rng, 0, 1) ? 2 : -1;
        return "config->use_pre_softmax";
      case 5:
        cfg.scaling_factor = pick(rng, 0, 1) ? NAN : -INFINITY;
        return "config->scaling_factor";
      case 6:
        cfg.num_groups = -1;
        return "config->num_groups";
      case 7:
        cfg.group_topk = cfg.num_groups == 0 ? 1 : cfg.num_groups + 1;
        return "config->group_topk";
      case 8:
        a.map_format = static_cast<bitepMapFormat_t>(pick(rng, 0, 1) ? -2 : 4 + pick(rng, 0, 9));
        return "args->map_format";
      case 9:
        a.num_tokens = -1 - pick(rng, 0, 5);
        return "args->num_tokens";
      case 10:
        a.num_ranks = -1;
        return "args->num_ranks";
      case 11:
        if (c->T == 0) break;  // T = 0 returns before the pointers are looked at
        a.logits = nullptr;
        return "args->logits";
      case 12:
        if (c->T == 0 || a.probs == nullptr) break;
        a.probs = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(a.probs) + 2);  // inside the guard's room
        return "args->probs";
      case 13:
        if (cfg.score_function != bitepScoreSoftmax || d->T == 0) break;
        a.expert_bias = reinterpret_cast<const float*>(c->logits.data());
        return "args->expert_bias";
      case 14:
        a.launch_flags |= pick(rng, 0, 1) ? 0x2 : INT_MIN;  // checked before a call without tokens returns
        return "args->launch_flags";
    }
  }
  return nullptr;
}

// The backward of a valid forward (its map, and its saved tensor where it wrote one, else the logits), then the same
// call with one field broken. Returns the broken calls made (0 or 1).
int check_backward(std::mt19937_64& rng, const Draw& d, Call& c) {
  const int64_t TE = c.T * c.E;
  const size_t ds = d.cfg.logits_dtype == bitepFloat32 ? 4 : 2;
  Guarded grad_probs(static_cast<size_t>(TE) * 4);
  for (int64_t i = 0; i < TE; ++i) {
    const float g = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
    std::memcpy(grad_probs.data() + 4 * i, &g, 4);
  }
  auto make_args = [&](Guarded& grad_logits) {
    bitepRouterBackwardArgs_t b = BITEP_ROUTER_BWD_ARGS_INIT;
    b.num_tokens = c.T;
    b.grad_probs = reinterpret_cast<const float*>(grad_probs.data());
    b.routing_map = c.args.routing_map;
    b.map_format = d.map;
    b.saved = c.args.saved;
    b.logits = c.args.saved != nullptr ? nullptr : c.args.logits;
    b.grad_logits = grad_logits.data();
    b.launch_flags = d.launch_flags;
    return b;
  };
  {
    Guarded grad_logits(static_cast<size_t>(TE) * ds);
    const bitepRouterBackwardArgs_t b = make_args(grad_logits);
    const bitepResult_t r = bitepRouterBackward(bitepBackendHost, &d.cfg, &b, nullptr);
    EXPECT_EQ(r, bitepSuccess) << "backward: " << bitepGetLastError();
    EXPECT_TRUE(grad_logits.guards_intact()) << "the backward wrote past grad_logits";
    EXPECT_TRUE(c.T == 0 || !grad_logits.untouched()) << "the backward wrote no gradient";
  }
  Guarded grad_logits(static_cast<size_t>(TE) * ds);
  bitepRouterBackwardArgs_t b = make_args(grad_logits);
  const char* field = nullptr;
  switch (pick(rng, 0, c.T == 0 ? 2 : 6)) {  // the first three are checked before a call without tokens returns
    case 0:
      b.map_format = bitepMapNone, b.routing_map = nullptr, field = "args->map_format";
      break;
    case 1:
      b.num_tokens = -1, field = "args->num_tokens";
      break;
    case 2:
      b.launch_flags |= 0x4, field = "args->launch_flags";
      break;
    case 3:
      b.grad_probs = nullptr, field = "args->grad_probs";
      break;
    case 4:
      b.grad_logits = nullptr, field = "args->grad_logits";
      break;
    case 5:
      b.saved = nullptr, b.logits = nullptr, field = "args->saved";
      break;
    default:
      b.grad_logits = grad_logits.data() + 1, field = "args->grad_logits";  // misaligned, inside the guard's room
      break;
  }
  expect_refused(bitepRouterBackward(bitepBackendHost, &d.cfg, &b, nullptr), "bitepRouterBackward", field,
                 {&grad_logits});
  return 1;
}

TEST(RouterArgsRandom, ValidCallsSucceedAndBrokenFieldsAreNamed) {
  std::mt19937_64 rng(20261204);
  int valid = 0, broken = 0, backward = 0;
  for (int n = 0; n < 1500; ++n) {
    Draw d = draw_valid(rng);
    SCOPED_TRACE("draw " + std::to_string(n) + ": " + describe(d));
    {
      Call c(d);
      const bitepResult_t r = bitepRouterForward(bitepBackendHost, &d.cfg, &c.args, nullptr);
      ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
      for (const Guarded* g : c.outputs()) ASSERT_TRUE(g->guards_intact()) << "a write past an output's bounds";
      if (d.T == 0) {
        for (const Guarded* g : c.outputs())
          if (g != &c.rank_counts) ASSERT_TRUE(g->untouched()) << "T = 0 wrote an output";
        for (int r = 0; r < (d.rank_counts && d.W > 0 ? d.W : 0); ++r)
          ASSERT_EQ(reinterpret_cast<const int32_t*>(c.rank_counts.data())[r], 0);
      }
      check_outputs(d, c);
      if (HasFatalFailure()) return;
      ++valid;
      if (d.map != bitepMapNone) backward += check_backward(rng, d, c);
      if (HasFailure()) return;
    }
    Call c(d);
    Draw bad = d;
    const char* field = break_one(rng, &bad, &c);
    if (field == nullptr) continue;
    SCOPED_TRACE(std::string("broken: ") + field);
    expect_refused(bitepRouterForward(bitepBackendHost, &bad.cfg, &c.args, nullptr), "bitepRouterForward", field,
                   c.outputs());
    if (HasFatalFailure()) return;
    ++broken;
  }
  EXPECT_EQ(valid, 1500);
  EXPECT_GT(broken, 1300);   // nearly every draw has a field to break
  EXPECT_GT(backward, 800);  // two draws in three write a map
}

// The aux-loss scores (bitepAuxScoresForward) on the same draws: the scores over all E written whole (each finite row
// a distribution where the scores are normalised: softmax, or k > 1), the map's k experts a token, nothing past a
// buffer; then one field broken, named and nothing written.
TEST(RouterArgsRandom, AuxScoresValidCallsSucceedAndBrokenFieldsAreNamed) {
  std::mt19937_64 rng(20261205);
  int valid = 0, broken = 0;
  for (int n = 0; n < 600; ++n) {
    Draw d = draw_valid(rng);
    d.probs = true;  // the scores: required
    d.weights = d.indices = d.bias = false;
    d.W = 0;
    SCOPED_TRACE("draw " + std::to_string(n) + ": " + describe(d));
    const bool normalised = d.cfg.score_function == bitepScoreSoftmax || d.cfg.topk > 1;
    {
      Call c(d);
      const bitepResult_t r = bitepAuxScoresForward(bitepBackendHost, &d.cfg, &c.args, nullptr);
      ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
      for (const Guarded* g : c.outputs()) ASSERT_TRUE(g->guards_intact()) << "a write past an output's bounds";
      for (int64_t t = 0; t < c.T; ++t) {
        const float* p = reinterpret_cast<const float*>(c.probs.data()) + t * c.E;
        double sum = 0.0;
        for (int e = 0; e < c.E; ++e) sum += p[e];
        if (c.finite_row[t] && normalised) ASSERT_NEAR(sum, 1.0, 1e-5) << "token " << t;
        if (d.map == bitepMapBitmapU8) {
          const uint8_t* row = c.map.data() + t * map_bytes(c.E);
          int bits = 0;
          for (int b = 0; b < map_bytes(c.E); ++b) bits += __builtin_popcount(row[b]);
          ASSERT_EQ(bits, c.k) << "token " << t;
          if (c.E % 8 != 0) ASSERT_EQ(row[c.E / 8] >> (c.E % 8), 0) << "token " << t << ": a pad bit set";
        } else if (d.map == bitepMapBytemap) {
          int set = 0;
          for (int e = 0; e < c.E; ++e) set += c.map.data()[t * c.E + e];
          ASSERT_EQ(set, c.k) << "token " << t;
        }
      }
      ++valid;
    }
    Call c(d);
    Draw bad = d;
    const char* field = nullptr;
    switch (pick(rng, 0, c.T == 0 ? 2 : 5)) {
      case 0:
        c.args.topk_weights = reinterpret_cast<float*>(c.weights.data()), field = "args->topk_weights";
        break;
      case 1:
        c.args.num_ranks = 1, field = "args->num_ranks";
        break;
      case 2:
        c.args.probs = nullptr, field = "args->probs";
        break;
      case 3:
        c.args.logits = nullptr, field = "args->logits";
        break;
      case 4:
        bad.cfg.score_function = static_cast<bitepScoreFunction_t>(-1), field = "config->score_function";
        break;
      default:
        c.args.expert_bias = reinterpret_cast<const float*>(c.logits.data()), field = "args->expert_bias";
        break;
    }
    SCOPED_TRACE(std::string("broken: ") + field);
    expect_refused(bitepAuxScoresForward(bitepBackendHost, &bad.cfg, &c.args, nullptr), "bitepAuxScoresForward", field,
                   c.outputs());
    if (HasFatalFailure()) return;
    ++broken;
  }
  EXPECT_EQ(valid, 600);
  EXPECT_EQ(broken, 600);
}

}  // namespace
