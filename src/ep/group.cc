// SPDX-License-Identifier: Apache-2.0
// EP group: config checks and their collective agreement, creation over a transport, destruction, queries.
#include "src/ep/group.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "kernels/ep_params.h"
#include "src/args.h"
#include "src/check.h"
#include "src/ep/collective.h"
#include "src/ep/low_latency.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/ep.h"
#endif

namespace bitep::ep {

bitepResult_t check_group_config(const bitepGroupConfig_t* c) {
  BITEP_CHECK_STRUCT(c, "config", bitepGroupConfig_t, BITEP_GROUP_CONFIG_MAGIC, "BITEP_GROUP_CONFIG_INIT");
  BITEP_CHECK(check_backend(c->backend));
  BITEP_ARG_CHECK(c->num_experts >= 1, "config->num_experts is %d, must be >= 1", c->num_experts);
  BITEP_ARG_CHECK(c->topk >= 1 && c->topk <= c->num_experts, "config->topk is %d, must be in [1, num_experts = %d]",
                  c->topk, c->num_experts);
  BITEP_ARG_CHECK(c->hidden >= 1, "config->hidden is %d, must be >= 1", c->hidden);
  BITEP_CHECK(check_dtype(c->dtype, "config->dtype"));
  BITEP_ARG_CHECK(c->expert_alignment >= 1 && c->expert_alignment <= (1 << 20),
                  "config->expert_alignment is %d, must be in [1, 2^20] rows", c->expert_alignment);
  BITEP_ARG_CHECK(std::isfinite(c->timeout_s) && c->timeout_s > 0, "config->timeout_s is %g, must be finite and > 0",
                  c->timeout_s);
  BITEP_ARG_CHECK(c->device >= -1, "config->device is %d, must be >= 0 or -1 (automatic)", c->device);
  BITEP_ARG_CHECK(c->low_latency_max_tokens >= 0 && c->low_latency_max_tokens <= kMaxLowLatencyTokens,
                  "config->low_latency_max_tokens is %d, must be in [0, %d] (0: no low-latency dispatches)",
                  c->low_latency_max_tokens, kMaxLowLatencyTokens);
  return bitepSuccess;
}

ConfigBlob make_config_blob(const bitepGroupConfig_t* c, int nranks, bitepResult_t status) {
  ConfigBlob b{};
  b.status = status;
  b.nranks = nranks;
  const bool readable = config_readable(c);
  b.backend = readable ? c->backend : -1;
  b.num_experts = readable ? c->num_experts : -1;
  b.topk = readable ? c->topk : -1;
  b.hidden = readable ? c->hidden : -1;
  b.dtype = readable ? c->dtype : -1;
  b.low_latency_max_tokens = readable ? c->low_latency_max_tokens : -1;
  return b;
}

bitepResult_t agree_configs(const ConfigBlob* all, int nranks, int self, bitepResult_t self_status) {
  if (self_status != bitepSuccess) return self_status;  // the rank's own error text is still set
  for (int r = 0; r < nranks; ++r)
    if (all[r].status != bitepSuccess)
      BITEP_FAIL(bitepRemoteError,
                 "rank %d of %d failed its local checks of the config (%s); see that rank's "
                 "bitepGetLastError()",
                 r, nranks, bitepGetErrorString(static_cast<bitepResult_t>(all[r].status)));
  struct Field {
    const char* name;
    int32_t ConfigBlob::*member;
  };
  static const Field fields[] = {{"config->backend", &ConfigBlob::backend},
                                 {"config->num_experts", &ConfigBlob::num_experts},
                                 {"config->topk", &ConfigBlob::topk},
                                 {"config->hidden", &ConfigBlob::hidden},
                                 {"config->dtype", &ConfigBlob::dtype},
                                 {"nranks", &ConfigBlob::nranks},
                                 {"config->low_latency_max_tokens", &ConfigBlob::low_latency_max_tokens}};
  for (const Field& f : fields)
    for (int r = 1; r < nranks; ++r)
      if (all[r].*f.member != all[0].*f.member)
        BITEP_FAIL(bitepInvalidArgument,
                   "%s differs across ranks: rank 0 has %d, rank %d has %d; every rank of the "
                   "group must pass the same value (this is rank %d)",
                   f.name, all[0].*f.member, r, all[r].*f.member, self);
  return bitepSuccess;
}

int visible_cuda_devices() {
  int count = 0;
#ifdef BITEP_HAVE_CUDA
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
  }
#endif
  return count;
}

namespace {
std::mutex g_groups_mu;
std::unordered_set<const bitepGroup*>& live_groups() {
  static auto* live = new std::unordered_set<const bitepGroup*>();  // never destroyed: usable at exit
  return *live;
}
// check_live_group with g_groups_mu held.
bitepResult_t check_live_group_locked(bitepGroup_t g) {
  BITEP_ARG_CHECK(g != nullptr, "group is NULL");
  BITEP_ARG_CHECK(live_groups().count(g) != 0 && g->magic == kGroupMagic,
                  "group (%p) is not a live bitep group (destroyed, or not from bitepGroupCreate*)",
                  static_cast<void*>(g));
  return bitepSuccess;
}
}  // namespace

void add_live_group(const bitepGroup* group) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  live_groups().insert(group);
}
void forget_live_group(const bitepGroup* group) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  live_groups().erase(group);
}
bool is_live_group(const bitepGroup* group) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  return live_groups().count(group) != 0;
}

bitepResult_t check_live_group(bitepGroup_t g) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  return check_live_group_locked(g);
}

bitepResult_t check_group(bitepGroup_t g) {
  BITEP_CHECK(check_live_group(g));
  if (!g->broken.empty())
    BITEP_FAIL(bitepInvalidUsage, "the group is unusable after %s; destroy it and create a new one", g->broken.c_str());
  return bitepSuccess;
}

bool pool_may_free(bitepGroup_t g) {
  if (g->pool_in_doubt) return false;
  return !g->pool_if_idle || g->life->pool->idle();
}

void let_go_of_pool(bitepGroup_t g) {
  Life* life = g->life.get();
  life->alive = false;
  if (g->pool_if_idle && !g->pool_in_doubt) {
    settle_pool(life);  // now, or by the last handle that still holds a block
    return;
  }
  if (g->pool_in_doubt) life->pool->leak();
  life->pool.reset();
}

size_t settle_pool(Life* life) {
  if (life->alive || life->pool == nullptr || life->pool->blocks_in_use()) return 0;
  size_t freed = 0;
  if (life->pool->idle())
    freed = life->pool->held_bytes();
  else
    life->pool->leak();
  life->pool.reset();
  return freed;
}

GroupCall::~GroupCall() {
  if (group_ == nullptr) return;
  if (transport_) group_->transport->leave_call();
  group_->in_call.store(nullptr, std::memory_order_release);
}

namespace {
// in_call while a call passes its transport's checks: the call's name appears once it is inside.
const char kEntering[] = "(a call being entered)";
}  // namespace

bitepResult_t GroupCall::enter(bitepGroup_t group, const char* call, Uses uses) {
  std::unique_lock<std::mutex> lock(g_groups_mu);
  BITEP_CHECK(check_live_group_locked(group));
  const char* inside = nullptr;
  const bool held =
      group->in_call.compare_exchange_strong(inside, kEntering, std::memory_order_acquire, std::memory_order_relaxed);
  lock.unlock();  // held, the group outlives the call: bitepGroupDestroy needs the hold to free it
  if (!held) {
    if (inside == kEntering)
      BITEP_FAIL(bitepInvalidUsage,
                 "group (%p) is in use: another thread is entering a call on it. Calls on one group must not "
                 "overlap: make them one after another, or give each thread its own group",
                 static_cast<void*>(group));
    BITEP_FAIL(bitepInvalidUsage,
               "group (%p) is in use: another thread is inside %s on it. Calls on one group must not overlap: "
               "make them one after another, or give each thread its own group",
               static_cast<void*>(group), inside);
  }
  group_ = group;
  if (uses != kLocal && group->transport != nullptr) {
    BITEP_CHECK(group->transport->enter_call(call, uses == kTeardown));  // on failure the destructor lets the group go
    transport_ = true;
  }
  group->peer_work_at_entry = group->peer_work;  // failed_alone: whether this call queued work with the peers
  group->in_call.store(call, std::memory_order_release);
  return bitepSuccess;
}

bitepResult_t create_group(std::unique_ptr<Transport> transport,
                           const bitepGroupConfig_t* config,
                           int device,
                           bitepGroup_t* group,
                           bool configs_agreed,
                           int required_backend) {
  if (group != nullptr) *group = nullptr;
  BITEP_ARG_CHECK(transport != nullptr, "internal: create_group without a transport");
  bitepResult_t local = check_group_config(config);
  if (local == bitepSuccess && required_backend >= 0 && config->backend != required_backend)
    local = set_error(bitepInvalidArgument, __FILE__, __LINE__,
                      "config->backend is %d but this bootstrap makes %s groups", static_cast<int>(config->backend),
                      required_backend == bitepBackendCuda ? "bitepBackendCuda (1)" : "bitepBackendHost (0)");
  if (local == bitepSuccess && group == nullptr)
    local = set_error(bitepInvalidArgument, __FILE__, __LINE__, "group is NULL");
#ifdef BITEP_HAVE_CUDA
  // A device this process does not see fails here, in the agreement, not in a peer's later collective.
  if (local == bitepSuccess && config->backend == bitepBackendCuda) {
    const int count = visible_cuda_devices();
    if (device < 0 || device >= count)
      local = set_error(bitepNotSupported, __FILE__, __LINE__,
                        "the cuda backend needs device %d (config->device, or the current device) but %d CUDA "
                        "device(s) are visible",
                        device, count);
  }
#endif
  const int W = transport->nranks(), self = transport->rank();
  if (!configs_agreed) {
    SavedError saved(local);
    const ConfigBlob mine = make_config_blob(config, W, local);
    std::vector<ConfigBlob> all(W);
    const bitepResult_t r = transport->allgather_host(&mine, all.data(), sizeof(ConfigBlob));
    if (r != bitepSuccess) return local != bitepSuccess ? saved.restore() : r;
    BITEP_CHECK(agree_configs(all.data(), W, self, local));
  } else if (local != bitepSuccess) {
    return local;
  }
  const int E = config->num_experts;
  // Same E and W on every rank now: every rank reaches the same verdict.
  BITEP_ARG_CHECK(E % W == 0,
                  "config->num_experts (%d) %% nranks (%d) != 0: every rank owns num_experts / nranks "
                  "experts",
                  E, W);
  // A low-latency handle holds W * C * KL + L * (expert_alignment - 1) expert rows (C = low_latency_max_tokens,
  // KL = experts a row can route to on one rank), whose offsets the kernels keep in int32.
  if (config->low_latency_max_tokens > 0) {
    const int L = E / W, KL = kernels::max_row_experts(config->topk, L);
    const int64_t rows = int64_t{W} * config->low_latency_max_tokens * KL + int64_t{L} * (config->expert_alignment - 1);
    BITEP_ARG_CHECK(rows <= INT32_MAX,
                    "config->low_latency_max_tokens (%d) x nranks (%d) x %d experts a row + %d local experts x "
                    "(config->expert_alignment (%d) - 1) = %lld expert rows a low-latency dispatch, above 2^31 - 1: "
                    "lower low_latency_max_tokens or expert_alignment",
                    config->low_latency_max_tokens, W, KL, L, config->expert_alignment, static_cast<long long>(rows));
  }
  auto g = std::make_unique<bitepGroup>();
  g->config = *config;
  g->rank = self;
  g->nranks = W;
  g->device = config->backend == bitepBackendCuda ? device : -1;
  g->num_local_experts = E / W;
  g->max_row_experts = kernels::max_row_experts(config->topk, E / W);
  g->local_map_bytes = kernels::local_map_bytes(E / W);
  g->agree_always = config->backend == bitepBackendHost;
  g->life = std::make_shared<Life>();
  g->life->pool = std::make_unique<Pool>(config->backend, g->device);
#ifdef BITEP_HAVE_CUDA
  if (config->backend == bitepBackendCuda) {
    int prev = -1;
    BITEP_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != g->device) BITEP_CUDA_CHECK(cudaSetDevice(g->device));
    bitepResult_t r = bitepSuccess;
    cudaEvent_t ev = nullptr;
    BITEP_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), r, done);
    g->upload_event = ev;
    BITEP_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), r, done);
    g->fork_event = ev;
    BITEP_CUDA_CHECK_GOTO(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), r, done);
    g->join_event = ev;
    {
      cudaStream_t side = nullptr;
      BITEP_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), r, done);
      g->side_stream = side;
    }
    // The kernels that run while others wait on them, loaded before any call (kernels::load_ep_kernels). Not
    // fatal here: a kernel that cannot load fails its launch with CUDA's error.
    if (kernels::load_ep_kernels() != cudaSuccess) (void)cudaGetLastError();
    // Collective like the config agreement above: every rank gets a peer window, or none does.
    r = transport->open_window(config->timeout_s);
    // The low-latency window, fixed at its size: where the peer window is (so every rank alike), or of the
    // rank's own memory at W = 1 (the transport decides).
    if (r == bitepSuccess && config->low_latency_max_tokens > 0)
      r = transport->open_low_latency_window(
          low_latency_window_bytes(W, config->low_latency_max_tokens, g->num_local_experts, g->max_row_experts,
                                   static_cast<size_t>(dtype_size(config->dtype)) * config->hidden),
          config->timeout_s);
    if (r == bitepSuccess) r = make_low_latency_tables(g.get(), transport.get());
  done:
    if (prev != g->device) cudaSetDevice(prev);
    if (r != bitepSuccess) return r;
  }
#endif
  g->transport = std::move(transport);
  add_live_group(g.get());
  *group = g.release();
  return bitepSuccess;
}

}  // namespace bitep::ep

bitepGroup::~bitepGroup() {
#ifdef BITEP_HAVE_CUDA
  if (upload_event != nullptr) {
    cudaEventSynchronize(static_cast<cudaEvent_t>(upload_event));
    cudaEventDestroy(static_cast<cudaEvent_t>(upload_event));
  }
  if (upload_staging != nullptr) cudaFreeHost(upload_staging);
  if (side_stream != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(side_stream));  // after its work
  if (ce_stream != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(ce_stream));
  if (ce_event != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(ce_event));
  if (fork_event != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(fork_event));
  if (join_event != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(join_event));
  if (ll_tables != nullptr) cudaFree(ll_tables);
  (void)cudaGetLastError();
#endif
  magic = 0;
}

extern "C" {

bitepResult_t bitepGroupDestroy(bitepGroup_t group) {
  return bitep::guard("bitepGroupDestroy", [&]() -> bitepResult_t {
    if (group == nullptr) return bitepSuccess;
    BITEP_ARG_CHECK(bitep::ep::is_live_group(group), "group (%p) is not a live bitep group (destroyed twice?)",
                    static_cast<void*>(group));
    bitep::ep::GroupCall call;
    BITEP_CHECK(call.enter(group, "bitepGroupDestroy", bitep::ep::GroupCall::kTeardown));
    call.forget();                        // the group goes with the hold
    bitep::ep::forget_live_group(group);  // from here every call on it is refused without reading it
    {
      std::lock_guard<std::mutex> lock(group->life->mu);
      bitep::ep::let_go_of_pool(group);
    }
    delete group;
    return bitepSuccess;
  });
}

bitepResult_t bitepGroupGetRank(bitepGroup_t group, int* rank, int* nranks) {
  return bitep::guard("bitepGroupGetRank", [&]() -> bitepResult_t {
    // Read under the registry's lock: a bitepGroupDestroy on another thread frees the group only after taking it out.
    std::lock_guard<std::mutex> lock(bitep::ep::g_groups_mu);
    BITEP_CHECK(bitep::ep::check_live_group_locked(group));
    if (rank != nullptr) *rank = group->rank;
    if (nranks != nullptr) *nranks = group->nranks;
    return bitepSuccess;
  });
}

bitepResult_t bitepGroupMemoryBytes(bitepGroup_t group, size_t* bytes) {
  return bitep::guard("bitepGroupMemoryBytes", [&]() -> bitepResult_t {
    bitep::ep::GroupCall call;
    BITEP_CHECK(call.enter(group, "bitepGroupMemoryBytes", bitep::ep::GroupCall::kLocal));
    BITEP_ARG_CHECK(bytes != nullptr, "bytes is NULL");
    size_t fixed = group->upload_bytes;
    if (group->transport != nullptr && group->transport->window() != nullptr)
      fixed += group->transport->window()->bytes();
    if (group->transport != nullptr && group->transport->low_latency_window() != nullptr)
      fixed += group->transport->low_latency_window()->bytes();
    *bytes = group->life->pool->held_bytes() + fixed;
    return bitepSuccess;
  });
}

bitepResult_t bitepGroupTrimMemory(bitepGroup_t group, size_t* freed) {
  return bitep::guard("bitepGroupTrimMemory", [&]() -> bitepResult_t {
    bitep::ep::GroupCall call;
    BITEP_CHECK(call.enter(group, "bitepGroupTrimMemory", bitep::ep::GroupCall::kLocal));
    const size_t n = bitep::ep::pool_may_free(group) ? group->life->pool->trim() : 0;
    if (freed != nullptr) *freed = n;
    return bitepSuccess;
  });
}

}  // extern "C"
