// SPDX-License-Identifier: Apache-2.0
// Router benchmark: the fused router (bitmap and bytemap) against its HBM floor and against the baseline
// path (the same router emitting [T, k] indices, then a separate indices -> bitmap kernel), forward and
// backward (saved tensor and recompute), fp32 and bf16 logits. Every row is checked against the host
// reference backend on a subset of tokens; a token whose experts differ from the host's passes only as a
// near-tie (its experts a top-k of the fp64 selection scores up to 1e-5, its values those of its own experts in
// fp64: tests/reference); any wrong row makes the exit status non-zero.
//
//   router_bench [--quick] [--json PATH] [--commit SHA] [--iters N] [--tokens T,..] [--experts E,..] [--bf16]
//                [--configs NAME,..] [--fwd | --bwd] [--bitmap-first] [--pdl]      (NAME@E: a config at E experts)
//
// --bitmap-first times each bitmap row before its bytemap twin (by default after it), to see what the order does.
// --pdl launches every timed kernel dependent on the one before it (programmatic dependent launch): the router's calls
// with BITEP_LAUNCH_PDL, the empty, stream and conversion kernels with the same attribute (each waits for the kernel
// before it first, as the router's do), so that every row and its stream copy are timed the same way.
//
// Time: median over N (>= 100) iterations, one CUDA event pair each, queued behind a spin kernel so the
// host's enqueue cost never shows; inputs and outputs rotate among enough buffer sets that the L2 does
// not hold them. Batch time (b-time): the same launches back to back, one event pair around each batch of kBatch
// launches, the median batch's time / kBatch: the time a launch takes inside a stream of work, without the per-launch
// event pair's drain and timestamp (an empty kernel's two times, printed in the header, show that cost).
// Floor: bytes the pass must move / the HBM bandwidth measured in the same run by a large device-to-device cudaMemcpy
// (read + write counted). Stream: the same bytes moved by the best of four plain copy kernels (stream_kernel) on the
// same buffers, timed the same way: what a kernel reaches at this size.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bitep/bitep.h"
#include "kernels/device_info.cuh"
#include "src/host/dtype_host.h"
#include "tests/reference/inputs.h"
#include "tests/reference/router_reference.h"

namespace {

#define CK(cmd)                                                                                 \
  do {                                                                                          \
    cudaError_t e_ = (cmd);                                                                     \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #cmd, cudaGetErrorString(e_)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)
#define BK(cmd)                                                                                     \
  do {                                                                                              \
    bitepResult_t r_ = (cmd);                                                                       \
    if (r_ != bitepSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d %s: %s: %s\n", __FILE__, __LINE__, #cmd, bitepGetErrorString(r_), \
                   bitepGetLastError());                                                            \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

// ---- kernels of the bench ----------------------------------------------------------------------

// Every kernel timed here starts as the library's do (kernels/device_info.cuh dependent_start: waits for the kernel
// before it under --pdl, no-ops in a plain launch).
using bitep::kernels::dependent_start;

// --pdl: the timed kernels launched dependent on the kernel before them (set once, before any timing).
bool g_pdl = false;

// kernel<<<grid, block, 0, s>>>(args...), or dependent on the kernel before it under --pdl.
template <class... KernelArgs, class... Args>
void launch(void (*kernel)(KernelArgs...), unsigned grid, unsigned block, cudaStream_t s, Args&&... args) {
  CK(bitep::kernels::launch_maybe_dependent(g_pdl, kernel, dim3(grid), dim3(block), 0, s, std::forward<Args>(args)...));
}

__global__ void empty_kernel() { dependent_start(); }

__global__ void spin_kernel(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

// Baseline conversion: [T, k] int32 indices -> BITMAP_U8 [T, ceil(E/8)], one warp per token: zero the
// row, then set each index's bit (32-bit atomicOr when rows are whole words, else byte by byte).
__global__ void indices_to_bitmap(const int32_t* __restrict__ idx, int k, int64_t T, int E, uint8_t* __restrict__ map) {
  dependent_start();
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int rb = (E + 7) / 8;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); t < T; t += warps) {
    uint8_t* row = map + t * rb;
    const int32_t* ix = idx + t * k;
    if (rb % 4 == 0) {
      uint32_t* w = reinterpret_cast<uint32_t*>(row);
      for (int i = lane; i < rb / 4; i += 32) w[i] = 0u;
      __syncwarp();
      for (int j = lane; j < k; j += 32) {
        const int e = ix[j];
        atomicOr(w + e / 32, 1u << (e % 32));
      }
      __syncwarp();
    } else {
      for (int j = lane; j < rb; j += 32) {
        uint32_t byte = 0;
        for (int i = 0; i < k; ++i) {
          const int e = ix[i];
          if (e / 8 == j) byte |= 1u << (e % 8);
        }
        row[j] = static_cast<uint8_t>(byte);
      }
    }
  }
}

// The same bytes as a pass, moved by the plainest kernels: every 16-byte unit of up to three inputs read once, every
// unit of up to three outputs written once (values from the reads, so none is dropped). Its time on the same
// buffers, timed the same way (the best of four shapes), is what a kernel moving these bytes reaches at this
// size: the floor plus the launch, the ramp and the tail that a bandwidth figure measured on 1 GiB leaves out.
struct StreamArgs {
  const uint4* in[3];
  size_t n_in[3];  // 16-byte units
  uint4* out[3];
  size_t n_out[3];
};

// Unit i: the inputs' units read (XORed into one value, so no read is dropped), then every output's unit written.
__device__ __forceinline__ uint4 stream_load(const StreamArgs& a, size_t i) {
  uint4 v = make_uint4(static_cast<uint32_t>(i), 0u, 0u, 0u);
#pragma unroll
  for (int j = 0; j < 3; ++j)
    if (i < a.n_in[j]) {
      const uint4 x = __ldg(a.in[j] + i);
      v.x ^= x.x, v.y ^= x.y, v.z ^= x.z, v.w ^= x.w;
    }
  return v;
}
__device__ __forceinline__ void stream_store(const StreamArgs& a, size_t i, uint4 v) {
#pragma unroll
  for (int j = 0; j < 3; ++j)
    if (i < a.n_out[j]) a.out[j][i] = v;
}

// U units a thread, a block's 256 U units contiguous; a thread issues all its loads before its stores.
template <int U>
__global__ void __launch_bounds__(256) stream_kernel(StreamArgs a) {
  dependent_start();
  const size_t base = static_cast<size_t>(blockIdx.x) * 256 * U + threadIdx.x;
  uint4 v[U];
#pragma unroll
  for (int u = 0; u < U; ++u) v[u] = stream_load(a, base + static_cast<size_t>(u) * 256);
#pragma unroll
  for (int u = 0; u < U; ++u) stream_store(a, base + static_cast<size_t>(u) * 256, v[u]);
}

// The same over a capped grid, each thread striding by the grid over units [0, n).
__global__ void __launch_bounds__(256) stream_kernel_strided(StreamArgs a, size_t n) {
  dependent_start();
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    stream_store(a, i, stream_load(a, i));
}

// ---- cases ---------------------------------------------------------------------------------------

struct Config {
  int E, k;
  const char* name;
  bitepScoreFunction_t fn;
  int pre, groups, group_topk;
  bool bias;
  float scaling;
};

const Config kConfigs[] = {
    {64, 6, "softmax", bitepScoreSoftmax, 0, 0, 0, false, 1.0f},
    {128, 8, "softmax", bitepScoreSoftmax, 0, 0, 0, false, 1.0f},
    {256, 8, "deepseek-v3", bitepScoreSigmoid, 0, 8, 4, true, 2.5f},
    {256, 8, "softmax", bitepScoreSoftmax, 0, 0, 0, false, 1.0f},
    {512, 8, "softmax", bitepScoreSoftmax, 0, 0, 0, false, 1.0f},
    {2048, 32, "softmax", bitepScoreSoftmax, 0, 0, 0, false, 1.0f},
    {64, 6, "softmax-pre", bitepScoreSoftmax, 1, 0, 0, false, 1.0f},
    {256, 8, "softmax-pre", bitepScoreSoftmax, 1, 0, 0, false, 1.0f},
};

// Released models' router shapes (their configs' expert count, k, score function, groups, bias and scaling), outside
// the issue's grid: run when --configs names them (or "models", all of them). DeepSeek-V2 scores a group by its best
// expert; here, as in TE, by the sum of its best k / group_topk (2). Its groups of 20 experts (not whole octets) take
// the warp kernels' step 3b (kernels/router_topk_kernel.cuh); num_groups = group_topk = 1 (GLM-4.5, Kimi K2) is routing
// without groups (src/router.cc).
const Config kModelConfigs[] = {
    {8, 2, "mixtral", bitepScoreSoftmax, 0, 0, 0, false, 1.0f},
    {60, 4, "qwen1.5-moe", bitepScoreSoftmax, 1, 0, 0, false, 1.0f},
    {160, 6, "deepseek-v2", bitepScoreSoftmax, 1, 8, 3, false, 16.0f},
    {160, 8, "glm-4.5", bitepScoreSigmoid, 0, 1, 1, true, 2.5f},
    {384, 8, "kimi-k2", bitepScoreSigmoid, 0, 1, 1, true, 2.827f},
    {512, 10, "qwen3-next", bitepScoreSoftmax, 0, 0, 0, false, 1.0f},
};

bitepRouterConfig_t router_config(const Config& c, bitepDataType_t dt) {
  bitepRouterConfig_t r = BITEP_ROUTER_CONFIG_INIT;
  r.num_experts = c.E;
  r.topk = c.k;
  r.score_function = c.fn;
  r.use_pre_softmax = c.pre;
  r.num_groups = c.groups;
  r.group_topk = c.group_topk;
  r.scaling_factor = c.scaling;
  r.logits_dtype = dt;
  return r;
}

struct Record {
  int64_t T;
  int E, k;
  std::string config, dtype, format, pass, mode;
  double median_us, floor_us;
  int64_t wrong;
  double stream_us;        // the same bytes by the best stream kernel
  double batch_us;         // median_us's time of a launch in a batch of kBatch
  double stream_batch_us;  // the best stream kernel's (by stream_us) the same way
};

using bitep::ref::gauss;
using bitep::ref::mix;

// ---- timing --------------------------------------------------------------------------------------

struct Timer {
  std::vector<cudaEvent_t> ev;
  cudaStream_t stream;
  explicit Timer(int iters, cudaStream_t s) : ev(iters + 1), stream(s) {
    for (auto& e : ev) CK(cudaEventCreate(&e));
  }
  ~Timer() {
    for (auto& e : ev) cudaEventDestroy(e);
  }
  // Median GPU time of run(i) in microseconds: of one launch (per = 1), or of a launch in a batch of per back to back
  // (one event pair a batch; N / per batches: at least 10 for per <= kBatch, N being at least 100).
  double median_us(const std::function<void(int)>& run, int per = 1) {
    const int marks = (static_cast<int>(ev.size()) - 1) / per;
    for (int i = 0; i < 3; ++i) run(i);
    CK(cudaStreamSynchronize(stream));
    const auto h0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 4; ++i) run(i);
    const double host_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count() / 4;
    CK(cudaStreamSynchronize(stream));
    const double spin_us = std::min(500000.0, 1.5 * host_us * (marks * per + 2) + 200.0);
    spin_kernel<<<1, 1, 0, stream>>>(static_cast<unsigned long long>(spin_us * 1000.0));
    CK(cudaGetLastError());
    CK(cudaEventRecord(ev[0], stream));
    for (int i = 0; i < marks; ++i) {
      for (int j = 0; j < per; ++j) run(i * per + j);
      CK(cudaEventRecord(ev[i + 1], stream));
    }
    CK(cudaStreamSynchronize(stream));
    std::vector<double> t(marks);
    for (int i = 0; i < marks; ++i) {
      float ms = 0.0f;
      CK(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]));
      t[i] = 1000.0 * ms / per;
    }
    std::nth_element(t.begin(), t.begin() + marks / 2, t.end());
    return t[marks / 2];
  }
};

// Launches a batch time covers (Timer::median_us's per).
constexpr int kBatch = 10;

double hbm_gbps(cudaStream_t s) {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemsetAsync(a, 1, bytes, s));
  Timer tm(20, s);
  const double us = tm.median_us([&](int) { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s)); });
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * bytes / (us * 1e-6) / 1e9;
}

// ---- buffers -------------------------------------------------------------------------------------

struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  Dev() = default;
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  void alloc(size_t n) {
    bytes = n;
    CK(cudaMalloc(&p, n > 0 ? n : 1));
  }
  ~Dev() {
    if (p) cudaFree(p);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// One set of inputs and outputs of a (T, E, dtype) case; the timed loops rotate among several.
struct Set {
  Dev logits, probs, saved, bytemap, bitmap, weights, indices, conv, grad_probs, grad;
};

// ---- correctness (host reference on a subset of tokens) ----------------------------------------

struct Check {
  const Config* cfg;
  bitepRouterConfig_t rc;
  int64_t T;
  int E, k;
  bitepDataType_t dt;
  int ds;
  std::vector<uint8_t> logits;  // full host copy
  std::vector<float> bias, grad_probs;
  std::vector<int64_t> rows;  // first and last tokens: [first, first + n) ranges
  std::vector<std::pair<int64_t, int64_t>> ranges;
};

float to_f(const Check& c, size_t i) {
  uint16_t h;
  if (c.dt == bitepFloat32) {
    float f;
    std::memcpy(&f, c.logits.data() + 4 * i, 4);
    return f;
  }
  std::memcpy(&h, c.logits.data() + 2 * i, 2);
  return c.dt == bitepBfloat16 ? bitep::host::bf16_to_float(h) : bitep::host::half_to_float(h);
}

double rel(const float* want, const float* got, int n) {
  double num = 0.0, den = 0.0;
  for (int i = 0; i < n; ++i) {
    if (std::isinf(want[i]) && want[i] == got[i]) continue;
    const double d = static_cast<double>(got[i]) - want[i];
    num += std::isfinite(d) ? d * d : INFINITY;
    den += std::isfinite(want[i]) ? static_cast<double>(want[i]) * want[i] : 0.0;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

template <class T>
std::vector<T> download(const void* dev, int64_t first, int64_t n, int64_t width) {
  std::vector<T> out(static_cast<size_t>(n * width));
  CK(cudaMemcpy(out.data(), static_cast<const T*>(dev) + first * width, out.size() * sizeof(T),
                cudaMemcpyDeviceToHost));
  return out;
}

bool bit_of(const std::vector<uint8_t>& map, bool bitmap, int64_t t, int E, int e) {
  return bitmap ? (map[t * ((E + 7) / 8) + e / 8] >> (e % 8)) & 1 : map[t * E + e] != 0;
}

// Forward check of set 0's outputs: map (format), and probs/saved/weights when produced. Returns wrong tokens.
int64_t check_forward(const Check& c, const Set& s, bool te, const void* map_dev, bool bitmap) {
  int64_t wrong = 0;
  for (const auto& [first, n] : c.ranges) {
    const size_t rowb = static_cast<size_t>(c.E) * c.ds;
    std::vector<uint8_t> lg(c.logits.begin() + first * rowb, c.logits.begin() + (first + n) * rowb);
    std::vector<float> pr(n * c.E), sv(n * c.E), w(n * c.k);
    std::vector<int32_t> ix(n * c.k);
    std::vector<uint8_t> mp(n * c.E);
    bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
    a.num_tokens = n, a.logits = lg.data(), a.expert_bias = c.bias.empty() ? nullptr : c.bias.data();
    a.probs = pr.data(), a.saved = sv.data(), a.topk_weights = w.data(), a.topk_indices = ix.data();
    a.routing_map = mp.data(), a.map_format = bitepMapBytemap;
    BK(bitepRouterForward(bitepBackendHost, &c.rc, &a, nullptr));
    const auto gmap = download<uint8_t>(map_dev, first, n, bitmap ? (c.E + 7) / 8 : c.E);
    std::vector<float> gpr, gsv, gw;
    if (te)
      gpr = download<float>(s.probs.p, first, n, c.E), gsv = download<float>(s.saved.p, first, n, c.E);
    else
      gw = download<float>(s.weights.p, first, n, c.k);
    std::vector<double> x(c.E);
    for (int64_t t = 0; t < n; ++t) {
      bool same = true;
      for (int e = 0; e < c.E && same; ++e) same = bit_of(gmap, bitmap, t, c.E, e) == (mp[t * c.E + e] != 0);
      if (bitmap && c.E % 8)  // pad bits must be 0
        same = same && (gmap[t * ((c.E + 7) / 8) + c.E / 8] >> (c.E % 8)) == 0;
      if (!same) {
        // Another selection than the host's: wrong unless the map is whole, its experts a top-k of the fp64
        // selection scores up to rounding (a near-tie), and its values those of its own experts in fp64.
        std::vector<int> chosen;
        for (int e = 0; e < c.E; ++e)
          if (bit_of(gmap, bitmap, t, c.E, e)) chosen.push_back(e);
        const bool pad_ok = !bitmap || c.E % 8 == 0 || (gmap[t * ((c.E + 7) / 8) + c.E / 8] >> (c.E % 8)) == 0;
        for (int e = 0; e < c.E; ++e) x[e] = to_f(c, (first + t) * c.E + e);
        const auto v =
            bitep::ref::token_values(c.rc, x.data(), c.bias.empty() ? nullptr : c.bias.data(), chosen, false);
        bool ok = pad_ok && bitep::ref::near_tie_selection(c.rc, v.sel, chosen, false, 1e-5, nullptr);
        auto close = [](const std::vector<double>& want, const float* got) {
          const std::vector<float> w(want.begin(), want.end());
          return rel(w.data(), got, static_cast<int>(w.size())) <= 1e-5;
        };
        if (ok && te) ok = close(v.probs, &gpr[t * c.E]) && close(v.saved, &gsv[t * c.E]);
        if (ok && !te) ok = close(v.weights, &gw[t * c.k]);
        wrong += !ok;
        continue;
      }
      bool ok = true;
      if (te) {
        ok = rel(&pr[t * c.E], &gpr[t * c.E], c.E) <= 1e-5 && rel(&sv[t * c.E], &gsv[t * c.E], c.E) <= 1e-5;
      } else {
        ok = rel(&w[t * c.k], &gw[t * c.k], c.k) <= 1e-5;
      }
      wrong += !ok;
    }
  }
  return wrong;
}

// Magnitude of a backward row without cancellation (fp64): M_e >= |grad_e|, and rounding of any summation
// order is O(eps * ||M||); a plain relative error is unbounded where act * (g - dot) cancels.
std::vector<double> grad_scale(const Check& c, const float* x, const std::vector<char>& routed, const float* gp) {
  const int E = c.E;
  std::vector<double> m(E, 0.0), g(E);
  for (int e = 0; e < E; ++e) g[e] = routed[e] ? std::fabs(static_cast<double>(gp[e]) * c.rc.scaling_factor) : 0.0;
  if (c.rc.score_function == bitepScoreSoftmax) {
    const bool pre = c.rc.use_pre_softmax;
    double mx = -INFINITY, s = 0.0, S = 0.0;
    std::vector<double> a(E, 0.0);
    for (int e = 0; e < E; ++e)
      if (pre || routed[e]) mx = std::max(mx, static_cast<double>(x[e]));
    for (int e = 0; e < E; ++e)
      if (pre || routed[e]) s += (a[e] = std::exp(x[e] - mx));
    for (int e = 0; e < E; ++e) a[e] /= s, S += g[e] * a[e];
    for (int e = 0; e < E; ++e) m[e] = (pre || routed[e]) ? a[e] * (g[e] + S) : 0.0;
    return m;
  }
  std::vector<double> y(E), dv(E);
  for (int e = 0; e < E; ++e) {
    const double sg = 1.0 / (1.0 + std::exp(-static_cast<double>(x[e])));
    if (c.rc.score_function == bitepScoreSigmoid) {
      y[e] = sg, dv[e] = sg * (1.0 - sg);
    } else {
      y[e] = std::sqrt(x[e] > 20.0f ? x[e] : std::log1p(std::exp(static_cast<double>(x[e]))));
      dv[e] = sg / (2.0 * y[e]);
    }
  }
  double d = 1e-20, S = 0.0;
  for (int e = 0; e < E; ++e)
    if (routed[e]) d += y[e];
  for (int e = 0; e < E; ++e)
    if (routed[e]) S += g[e] * y[e] / d;
  for (int e = 0; e < E; ++e) m[e] = routed[e] ? (c.k > 1 ? (g[e] + S) / d : g[e]) * std::fabs(dv[e]) : 0.0;
  return m;
}

// Backward check of set 0: host backward on the same saved / logits / map rows.
int64_t check_backward(const Check& c, const Set& s, bool recompute, const void* map_dev, bool bitmap) {
  int64_t wrong = 0;
  const double tol = c.dt == bitepFloat32 ? 1e-5 : 1e-2;
  for (const auto& [first, n] : c.ranges) {
    const int mw = bitmap ? (c.E + 7) / 8 : c.E;
    auto gmap = download<uint8_t>(map_dev, first, n, mw);
    auto sv = download<float>(s.saved.p, first, n, c.E);
    std::vector<float> gp(c.grad_probs.begin() + first * c.E, c.grad_probs.begin() + (first + n) * c.E);
    const size_t rowb = static_cast<size_t>(c.E) * c.ds;
    std::vector<uint8_t> lg(c.logits.begin() + first * rowb, c.logits.begin() + (first + n) * rowb);
    std::vector<uint8_t> hg(n * rowb);
    bitepRouterBackwardArgs_t a = BITEP_ROUTER_BWD_ARGS_INIT;
    a.num_tokens = n, a.grad_probs = gp.data(), a.routing_map = gmap.data();
    a.map_format = bitmap ? bitepMapBitmapU8 : bitepMapBytemap;
    a.saved = recompute ? nullptr : sv.data();
    a.logits = recompute ? lg.data() : nullptr;
    a.grad_logits = hg.data();
    BK(bitepRouterBackward(bitepBackendHost, &c.rc, &a, nullptr));
    auto gg = download<uint8_t>(s.grad.p, first, n, rowb);
    for (int64_t t = 0; t < n; ++t) {
      std::vector<float> want(c.E), got(c.E);
      for (int e = 0; e < c.E; ++e) {
        if (c.dt == bitepFloat32) {
          std::memcpy(&want[e], hg.data() + (t * c.E + e) * 4, 4);
          std::memcpy(&got[e], gg.data() + (t * c.E + e) * 4, 4);
        } else {
          uint16_t h1, h2;
          std::memcpy(&h1, hg.data() + (t * c.E + e) * 2, 2);
          std::memcpy(&h2, gg.data() + (t * c.E + e) * 2, 2);
          want[e] = bitep::host::bf16_to_float(h1), got[e] = bitep::host::bf16_to_float(h2);
        }
      }
      std::vector<float> x(c.E);
      std::vector<char> routed(c.E);
      for (int e = 0; e < c.E; ++e) x[e] = to_f(c, (first + t) * c.E + e), routed[e] = bit_of(gmap, bitmap, t, c.E, e);
      const std::vector<double> M = grad_scale(c, x.data(), routed, &gp[t * c.E]);
      double num = 0.0, den = 0.0;
      for (int e = 0; e < c.E; ++e) {
        if ((std::isnan(want[e]) && std::isnan(got[e])) || (std::isinf(want[e]) && want[e] == got[e])) continue;
        const double d = static_cast<double>(got[e]) - want[e];
        num += std::isfinite(d) ? d * d : INFINITY;
        den += M[e] * M[e];
      }
      wrong += std::sqrt(num) > tol * std::max(std::sqrt(den), 1e-30);
    }
  }
  return wrong;
}

// ---- main ----------------------------------------------------------------------------------------

struct Args {
  bool quick = false;
  std::string json, commit = "unknown";
  int iters = 100;
  std::vector<int64_t> tokens;  // non-empty: these T only (--tokens T,T,..)
  std::string experts;          // non-empty: comma-separated E values, the configs of those E only
  std::string configs;  // non-empty: comma-separated config names (softmax, softmax-pre, deepseek-v3; a model's name
                        // from kModelConfigs, or models for all of them; NAME@E: that config at E experts), those alone
  bool bf16_only = false;
  bool fwd_only = false;      // tuning runs: the forward rows alone
  bool bwd_only = false;      // tuning runs: the backward rows alone
  int topk = 0;               // > 0: this k for the configs without groups whose E allows it (--topk K; tuning runs)
  bool bitmap_first = false;  // each row pair timed bitmap first (--bitmap-first; the grid times the bytemap first)
  bool pdl = false;           // every timed kernel a dependent launch (--pdl)
};

void print_header() {
  std::printf("%8s %5s %3s %-12s %-5s %-16s %-4s %-10s %10s %10s %7s %10s %7s %7s %10s %9s %10s\n", "T", "E", "k",
              "config", "dtype", "format", "pass", "mode", "time(us)", "floor(us)", "%floor", "stream(us)", "%stream",
              "#wrong", "b-time(us)", "%floor(b)", "%stream(b)");
}

void print_record(const Record& r) {
  std::printf(
      "%8lld %5d %3d %-12s %-5s %-16s %-4s %-10s %10.2f %10.2f %6.1f%% %10.2f %6.1f%% %7lld %10.2f %8.1f%% %9.1f%%\n",
      static_cast<long long>(r.T), r.E, r.k, r.config.c_str(), r.dtype.c_str(), r.format.c_str(), r.pass.c_str(),
      r.mode.c_str(), r.median_us, r.floor_us, 100.0 * r.floor_us / r.median_us, r.stream_us,
      100.0 * r.stream_us / r.median_us, static_cast<long long>(r.wrong), r.batch_us, 100.0 * r.floor_us / r.batch_us,
      100.0 * r.stream_batch_us / r.batch_us);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      args.quick = true;
    } else if (a == "--json" && i + 1 < argc) {
      args.json = argv[++i];
    } else if (a == "--commit" && i + 1 < argc) {
      args.commit = argv[++i];
    } else if (a == "--tokens" && i + 1 < argc) {
      std::stringstream list(argv[++i]);
      for (std::string t; std::getline(list, t, ',');)
        args.tokens.push_back(std::max<int64_t>(1, std::atoll(t.c_str())));
    } else if (a == "--experts" && i + 1 < argc) {
      args.experts = "," + std::string(argv[++i]) + ",";
    } else if (a == "--configs" && i + 1 < argc) {
      args.configs = "," + std::string(argv[++i]) + ",";
    } else if (a == "--bf16") {
      args.bf16_only = true;
    } else if (a == "--fwd") {
      args.fwd_only = true;
    } else if (a == "--bwd") {
      args.bwd_only = true;
    } else if (a == "--bitmap-first") {
      args.bitmap_first = true;
    } else if (a == "--pdl") {
      args.pdl = true;
    } else if (a == "--iters" && i + 1 < argc) {
      args.iters = std::max(100, std::atoi(argv[++i]));
    } else if (a == "--topk" && i + 1 < argc) {
      args.topk = std::atoi(argv[++i]);
      if (args.topk < 1) {
        std::fprintf(stderr, "router_bench: --topk must be at least 1, got %s\n", argv[i]);
        return 2;
      }
    } else {
      std::fprintf(
          stderr,
          "usage: %s [--quick] [--json PATH] [--commit SHA] [--iters N>=100] [--tokens T,T,..] [--experts E,E,..] "
          "[--configs NAME,..] [--topk K] [--bf16] [--fwd | --bwd] [--bitmap-first] [--pdl]\n",
          argv[0]);
      return 2;
    }
  }
  // The order each row pair is timed in (forward and backward): a pair's second row follows the first's launches.
  const std::vector<bitepMapFormat_t> formats = args.bitmap_first
                                                    ? std::vector<bitepMapFormat_t>{bitepMapBitmapU8, bitepMapBytemap}
                                                    : std::vector<bitepMapFormat_t>{bitepMapBytemap, bitepMapBitmapU8};
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "router_bench: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const bitepStream_t bstream = reinterpret_cast<bitepStream_t>(stream);
  const double gbps = hbm_gbps(stream);
  std::printf("# router_bench on %s (%d SMs, L2 %d MB): HBM copy %.0f GB/s (read + write), commit %s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, gbps, args.commit.c_str());
  g_pdl = args.pdl;
  const int launch_flags = args.pdl ? BITEP_LAUNCH_PDL : 0;
  double empty_us = 0.0, empty_batch_us = 0.0;
  {
    Timer t(args.iters, stream);
    auto run = [&](int) { launch(empty_kernel, 1, 32, stream); };
    empty_us = t.median_us(run), empty_batch_us = t.median_us(run, kBatch);
  }
  std::printf("# an empty kernel, timed the same way: %.2f us a launch, %.2f us in a batch of %d (time, b-time)\n",
              empty_us, empty_batch_us, kBatch);
  if (args.bitmap_first) std::printf("# --bitmap-first: each bitmap row timed before its bytemap twin\n");
  if (args.pdl) std::printf("# --pdl: every timed kernel launched dependent on the one before (BITEP_LAUNCH_PDL)\n");
  print_header();

  std::vector<int64_t> Ts = {4096, 16384, 65536};
  std::vector<const Config*> cfgs;
  for (const Config& c : kConfigs) cfgs.push_back(&c);
  std::vector<bitepDataType_t> dts = {bitepFloat32, bitepBfloat16};
  if (args.quick) {
    Ts = {16384};
    cfgs = {&kConfigs[2], &kConfigs[3]};
    dts = {bitepBfloat16};
  }
  if (!args.tokens.empty()) Ts = args.tokens;
  // --experts: the table's configs of those E; an E the table lacks runs as a post-top-k softmax row with k = 8 (or
  // E, if smaller; --topk below sets k), for tuning runs at shapes outside the issue's grid (E = 1024, for one).
  std::vector<Config> extra;
  if (!args.experts.empty()) {
    std::vector<const Config*> keep;
    for (const Config* c : cfgs)
      if (args.experts.find("," + std::to_string(c->E) + ",") != std::string::npos) keep.push_back(c);
    std::stringstream list(args.experts.substr(1));
    std::vector<int> more;
    for (std::string t; std::getline(list, t, ',');) {
      const int E = std::atoi(t.c_str());
      const bool known =
          std::any_of(std::begin(kConfigs), std::end(kConfigs), [E](const Config& c) { return c.E == E; });
      if (E >= 1 && !known) more.push_back(E);
    }
    extra.reserve(more.size());
    for (int E : more) {
      extra.push_back({E, std::min(8, E), "softmax", bitepScoreSoftmax, 0, 0, 0, false, 1.0f});
      keep.push_back(&extra.back());
    }
    cfgs = keep;
  }
  // NAME@E: that config with E experts (its groups keep their count), a probe of what the expert count alone costs
  // (glm-4.5@256: GLM-4.5's routing over a whole bucket of 256 experts, against its 160).
  std::deque<Config> resized;
  std::deque<std::string> resized_names;
  if (!args.configs.empty()) {
    std::vector<const Config*> keep;
    for (const Config* c : cfgs)
      if (args.configs.find("," + std::string(c->name) + ",") != std::string::npos) keep.push_back(c);
    const bool models = args.configs.find(",models,") != std::string::npos;
    for (const Config& c : kModelConfigs)
      if (models || args.configs.find("," + std::string(c.name) + ",") != std::string::npos) keep.push_back(&c);
    std::stringstream list(args.configs.substr(1));
    for (std::string t; std::getline(list, t, ',');) {
      const size_t at = t.find('@');
      if (at == std::string::npos) continue;
      const std::string name = t.substr(0, at);
      const int E = std::atoi(t.c_str() + at + 1);
      const Config* from = nullptr;
      for (const Config& c : kConfigs)
        if (name == c.name) from = &c;
      for (const Config& c : kModelConfigs)
        if (name == c.name) from = &c;
      if (from == nullptr || E < from->k || (from->groups > 0 && E % from->groups != 0)) {
        std::fprintf(stderr,
                     "router_bench: --configs %s: no config named %s, or E not >= its k (%d) and a multiple of "
                     "its groups (%d)\n",
                     t.c_str(), name.c_str(), from != nullptr ? from->k : 0, from != nullptr ? from->groups : 0);
        return 2;
      }
      resized_names.push_back(t);
      resized.push_back(*from);
      resized.back().E = E;
      resized.back().name = resized_names.back().c_str();
      keep.push_back(&resized.back());
    }
    cfgs = keep;
  }
  // --topk: the configs without groups take k = K where K <= E (a copy each); the grouped ones keep theirs.
  std::vector<Config> with_k;
  if (args.topk > 0) {
    with_k.reserve(cfgs.size());
    std::vector<const Config*> keep;
    for (const Config* c : cfgs) {
      if (c->groups == 0 && args.topk <= c->E) {
        with_k.push_back(*c);
        with_k.back().k = args.topk;
        keep.push_back(&with_k.back());
      } else {
        keep.push_back(c);
      }
    }
    cfgs = keep;
  }
  if (args.bf16_only) dts = {bitepBfloat16};
  Timer timer(args.iters, stream);
  std::vector<Record> records;
  int64_t total_wrong = 0;

  for (int64_t T : Ts)
    for (const Config* cfg : cfgs)
      for (bitepDataType_t dt : dts) {
        const int E = cfg->E, k = cfg->k, ds = dt == bitepFloat32 ? 4 : 2;
        const size_t TE = static_cast<size_t>(T) * E, rb = (E + 7) / 8;
        Check chk;
        chk.cfg = cfg, chk.rc = router_config(*cfg, dt), chk.T = T, chk.E = E, chk.k = k, chk.dt = dt, chk.ds = ds;
        chk.logits.resize(TE * ds);
        for (size_t i = 0; i < TE; ++i) {
          const float v = 2.0f * gauss(T + E, i);
          if (dt == bitepFloat32) {
            std::memcpy(chk.logits.data() + 4 * i, &v, 4);
          } else {
            const uint16_t h = bitep::host::float_to_bf16(v);
            std::memcpy(chk.logits.data() + 2 * i, &h, 2);
          }
        }
        chk.grad_probs.resize(TE);
        for (size_t i = 0; i < TE; ++i) chk.grad_probs[i] = gauss(7, i);
        if (cfg->bias) {
          chk.bias.resize(E);
          for (int e = 0; e < E; ++e) chk.bias[e] = 0.05f * gauss(99, e);
        }
        // Checked tokens: the first 256 and the last 64, and 8 at each of 30 points between (every part of the grid).
        chk.ranges = {{0, std::min<int64_t>(T, 256)}};
        for (int j = 1; j < 31 && T > 512; ++j) chk.ranges.push_back({256 + (T - 320 - 8) * j / 31, 8});
        if (T > 512) chk.ranges.push_back({T - 64, 64});

        // Enough buffer sets that the (R - 1) other sets' traffic flushes the L2 between two uses of one.
        const size_t set_bytes = TE * (ds * 2 + 4 * 4 + 1) + T * rb * 2 + static_cast<size_t>(T) * k * 8;
        const size_t min_iter = TE * ds + T * rb;
        size_t free_b = 0, total_b = 0;
        CK(cudaMemGetInfo(&free_b, &total_b));
        int R = static_cast<int>(std::min<size_t>(512, 3 * static_cast<size_t>(prop.l2CacheSize) / min_iter + 2));
        R = std::max(2, std::min<int>(R, static_cast<int>(free_b / 2 / set_bytes)));
        std::vector<Set> sets(R);
        Dev bias_dev;
        bias_dev.alloc(E * 4);
        if (cfg->bias) CK(cudaMemcpy(bias_dev.p, chk.bias.data(), E * 4, cudaMemcpyHostToDevice));
        for (int r = 0; r < R; ++r) {
          Set& s = sets[r];
          s.logits.alloc(TE * ds), s.probs.alloc(TE * 4), s.saved.alloc(TE * 4), s.bytemap.alloc(TE);
          s.bitmap.alloc(T * rb), s.weights.alloc(T * k * 4), s.indices.alloc(T * k * 4), s.conv.alloc(T * rb);
          s.grad_probs.alloc(TE * 4), s.grad.alloc(TE * ds);
          if (r == 0) {
            CK(cudaMemcpy(s.logits.p, chk.logits.data(), TE * ds, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(s.grad_probs.p, chk.grad_probs.data(), TE * 4, cudaMemcpyHostToDevice));
          } else {
            CK(cudaMemcpy(s.logits.p, sets[0].logits.p, TE * ds, cudaMemcpyDeviceToDevice));
            CK(cudaMemcpy(s.grad_probs.p, sets[0].grad_probs.p, TE * 4, cudaMemcpyDeviceToDevice));
          }
        }
        const float* bias = cfg->bias ? bias_dev.as<float>() : nullptr;

        auto fwd = [&](Set& s, bool te, bitepMapFormat_t fmt, bool baseline) {
          bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
          a.num_tokens = T, a.logits = s.logits.p, a.expert_bias = bias;
          if (te)
            a.probs = s.probs.as<float>(), a.saved = s.saved.as<float>();
          else
            a.topk_weights = s.weights.as<float>();
          if (baseline) {
            a.topk_indices = s.indices.as<int32_t>();
          } else {
            a.map_format = fmt;
            a.routing_map = fmt == bitepMapBytemap ? s.bytemap.p : s.bitmap.p;
          }
          a.launch_flags = launch_flags;
          BK(bitepRouterForward(bitepBackendCuda, &chk.rc, &a, bstream));
          if (baseline) {
            const int64_t blocks = std::min<int64_t>((T + 7) / 8, static_cast<int64_t>(prop.multiProcessorCount) * 16);
            launch(indices_to_bitmap, static_cast<unsigned>(blocks), 256, stream, s.indices.as<int32_t>(), k, T, E,
                   s.conv.as<uint8_t>());
          }
        };
        auto bwd = [&](Set& s, bool recompute, bitepMapFormat_t fmt) {
          bitepRouterBackwardArgs_t a = BITEP_ROUTER_BWD_ARGS_INIT;
          a.num_tokens = T, a.grad_probs = s.grad_probs.as<float>();
          a.routing_map = fmt == bitepMapBytemap ? s.bytemap.p : s.bitmap.p, a.map_format = fmt;
          a.saved = recompute ? nullptr : s.saved.as<float>();
          a.logits = recompute ? s.logits.p : nullptr;
          a.grad_logits = s.grad.p;
          a.launch_flags = launch_flags;
          BK(bitepRouterBackward(bitepBackendCuda, &chk.rc, &a, bstream));
        };
        // stream_kernel over the given buffers of every set (nullptr / 0 bytes: unused), the median time.
        using Span = std::pair<Dev Set::*, size_t>;
        auto stream_us = [&](std::vector<Span> ins, std::vector<Span> outs) {
          auto args_of = [&](Set& s) {
            StreamArgs a{};
            for (size_t j = 0; j < ins.size(); ++j)
              a.in[j] = (s.*ins[j].first).as<const uint4>(), a.n_in[j] = ins[j].second / 16;
            for (size_t j = 0; j < outs.size(); ++j)
              a.out[j] = (s.*outs[j].first).as<uint4>(), a.n_out[j] = outs[j].second / 16;
            return a;
          };
          size_t n = 0;  // units: the largest buffer's
          for (const Span& b : ins) n = std::max(n, b.second / 16);
          for (const Span& b : outs) n = std::max(n, b.second / 16);
          auto grid = [&](size_t per_block) {
            return static_cast<unsigned>(std::max<size_t>(1, (n + per_block - 1) / per_block));
          };
          const unsigned strided_blocks = std::min(grid(256), static_cast<unsigned>(prop.multiProcessorCount) * 32);
          // The best of four shapes: one, two or four units a thread over the whole range, or a strided grid; its
          // batch time beside it.
          const std::function<void(int)> shapes[] = {
              [&](int i) { launch(stream_kernel<1>, grid(256), 256, stream, args_of(sets[i % R])); },
              [&](int i) { launch(stream_kernel<2>, grid(512), 256, stream, args_of(sets[i % R])); },
              [&](int i) { launch(stream_kernel<4>, grid(1024), 256, stream, args_of(sets[i % R])); },
              [&](int i) { launch(stream_kernel_strided, strided_blocks, 256, stream, args_of(sets[i % R]), n); }};
          double best = 0.0;
          const std::function<void(int)>* best_shape = nullptr;
          for (const auto& shape : shapes) {
            const double us = timer.median_us(shape);
            if (best_shape == nullptr || us < best) best = us, best_shape = &shape;
          }
          return std::make_pair(best, timer.median_us(*best_shape, kBatch));
        };
        std::pair<double, double> stream_now{0.0, 0.0};  // the stream times (one launch, batch) of the rows being added
        // A row: its launch's time, and the same launches' batch time.
        auto add = [&](const char* format, const char* pass, const char* mode, const std::function<void(int)>& run,
                       double bytes, int64_t wrong) {
          const double us = timer.median_us(run), batch = timer.median_us(run, kBatch);
          Record r{T,
                   E,
                   k,
                   cfg->name,
                   dt == bitepFloat32 ? "fp32" : "bf16",
                   format,
                   pass,
                   mode,
                   us,
                   bytes / (gbps * 1e3),
                   wrong,
                   stream_now.first,
                   batch,
                   stream_now.second};
          print_record(r);
          records.push_back(r);
          total_wrong += wrong;
        };

        // The checked run: set 0's outputs poisoned (0xff bytes: NaN, every map bit set), the row's call once more,
        // so each check reads what that row's kernel wrote, not an earlier row's.
        auto poison0 = [&] {
          Set& s = sets[0];
          for (Dev* d : {&s.probs, &s.saved, &s.weights, &s.indices, &s.bytemap, &s.bitmap, &s.conv, &s.grad})
            CK(cudaMemsetAsync(d->p, 0xff, d->bytes, stream));
        };
        // Forward: TE-compatible (probs + map + saved) and compact (map + [T, k] weights).
        for (bool te : {true, false}) {
          if (args.bwd_only) break;
          const char* mode = te ? "te" : "compact";
          const double out_bytes = te ? 8.0 * TE : 4.0 * T * k;
          for (bitepMapFormat_t fmt : formats) {
            const bool bm = fmt == bitepMapBitmapU8;
            const Span map_out = bm ? Span{&Set::bitmap, T * rb} : Span{&Set::bytemap, TE};
            stream_now =
                te ? stream_us({{&Set::logits, TE * ds}}, {{&Set::probs, TE * 4}, {&Set::saved, TE * 4}, map_out})
                   : stream_us({{&Set::logits, TE * ds}}, {{&Set::weights, T * k * 4}, map_out});
            poison0();
            fwd(sets[0], te, fmt, false);
            CK(cudaStreamSynchronize(stream));
            const int64_t wrong = check_forward(chk, sets[0], te, bm ? sets[0].bitmap.p : sets[0].bytemap.p, bm);
            add(
                bm ? "bitmap" : "bytemap", "fwd", mode, [&](int i) { fwd(sets[i % R], te, fmt, false); },
                TE * ds + out_bytes + (bm ? T * rb : TE), wrong);
          }
          poison0();
          fwd(sets[0], te, bitepMapNone, true);
          CK(cudaStreamSynchronize(stream));
          const int64_t wrong = check_forward(chk, sets[0], te, sets[0].conv.p, true);
          add(
              "indices+convert", "fwd", mode, [&](int i) { fwd(sets[i % R], te, bitepMapNone, true); },
              TE * ds + out_bytes + T * rb, wrong);
        }
        if (args.fwd_only) continue;
        // The maps and saved tensor of every set for the backward (TE-compatible forward, both formats).
        for (int r = 0; r < R; ++r) {
          fwd(sets[r], true, bitepMapBytemap, false);
          fwd(sets[r], true, bitepMapBitmapU8, false);
        }
        CK(cudaStreamSynchronize(stream));
        for (bool recompute : {false, true})
          for (bitepMapFormat_t fmt : formats) {
            const bool bm = fmt == bitepMapBitmapU8;
            stream_now = stream_us({{&Set::grad_probs, TE * 4},
                                    recompute ? Span{&Set::logits, TE * ds} : Span{&Set::saved, TE * 4},
                                    bm ? Span{&Set::bitmap, T * rb} : Span{&Set::bytemap, TE}},
                                   {{&Set::grad, TE * ds}});
            CK(cudaMemsetAsync(sets[0].grad.p, 0xff, sets[0].grad.bytes, stream));
            bwd(sets[0], recompute, fmt);
            CK(cudaStreamSynchronize(stream));
            const int64_t wrong =
                check_backward(chk, sets[0], recompute, bm ? sets[0].bitmap.p : sets[0].bytemap.p, bm);
            // The bytes a backward must move: grad_logits written whole, the map read, and of grad_probs and of
            // saved / logits the 32-byte sectors that hold a routed expert (at most k a token, at most the row):
            // grad_probs at unrouted experts meets a constant output, and the scores of the unrouted experts
            // matter only to the pre-top-k softmax, which reads saved / logits whole.
            auto routed = [&](int elem) {
              return static_cast<double>(T) * std::min<int64_t>(k, (E * elem + 31) / 32) * 32;
            };
            const double scores = cfg->pre ? TE * (recompute ? ds : 4.0) : routed(recompute ? ds : 4);
            const double bytes = routed(4) + scores + (bm ? T * rb : TE) + TE * ds;
            add(
                bm ? "bitmap" : "bytemap", "bwd", recompute ? "recompute" : "saved",
                [&](int i) { bwd(sets[i % R], recompute, fmt); }, bytes, wrong);
          }
      }

  if (!args.json.empty()) {
    FILE* f = std::fopen(args.json.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "router_bench: cannot write %s\n", args.json.c_str());
      return 2;
    }
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    std::fprintf(f,
                 "{\"card\": \"%s\", \"date\": \"%s\", \"commit\": \"%s\", \"hbm_GBps\": %.1f, \"empty_us\": %.3f, "
                 "\"empty_batch_us\": %.3f, \"batch\": %d, \"bitmap_first\": %s, \"pdl\": %s, \"records\": [\n",
                 prop.name, date, args.commit.c_str(), gbps, empty_us, empty_batch_us, kBatch,
                 args.bitmap_first ? "true" : "false", args.pdl ? "true" : "false");
    for (size_t i = 0; i < records.size(); ++i) {
      const Record& r = records[i];
      std::fprintf(
          f,
          "  {\"T\": %lld, \"E\": %d, \"k\": %d, \"config\": \"%s\", \"dtype\": \"%s\", \"format\": \"%s\", "
          "\"pass\": \"%s\", \"mode\": \"%s\", \"median_us\": %.3f, \"floor_us\": %.3f, \"pct_of_floor\": %.1f, "
          "\"stream_us\": %.3f, \"pct_of_stream\": %.1f, \"wrong\": %lld, \"batch_us\": %.3f, "
          "\"pct_of_floor_batch\": %.1f, \"stream_batch_us\": %.3f, \"pct_of_stream_batch\": %.1f}%s\n",
          static_cast<long long>(r.T), r.E, r.k, r.config.c_str(), r.dtype.c_str(), r.format.c_str(), r.pass.c_str(),
          r.mode.c_str(), r.median_us, r.floor_us, 100.0 * r.floor_us / r.median_us, r.stream_us,
          100.0 * r.stream_us / r.median_us, static_cast<long long>(r.wrong), r.batch_us,
          100.0 * r.floor_us / r.batch_us, r.stream_batch_us, 100.0 * r.stream_batch_us / r.batch_us,
          i + 1 < records.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  std::printf("# %lld wrong\n", static_cast<long long>(total_wrong));
  CK(cudaStreamDestroy(stream));
  return total_wrong == 0 ? 0 : 1;
}
