// SPDX-License-Identifier: Apache-2.0
// The EP group: configuration agreed by every rank, the transport, the buffer pool, and the liveness
// record its handles share. Bootstraps (comm/mpi_bootstrap.cc, comm/nccl_*.cc) build a Transport and
// hand it to create_group(), the one path every group goes through.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "bitep/bitep.h"
#include "src/ep/pool.h"
#include "src/ep/transport.h"

namespace bitep::ep {

// Shared by a group and its handles: a handle of a destroyed group sees alive == false. The group's pool goes with
// the group (let_go_of_pool), except one whose fate waits for the blocks live handles still hold (settle_pool).
struct Life {
  std::mutex mu;
  bool alive = true;
  std::unique_ptr<Pool> pool;
  // A pool kept for the handles that never settled (a captured handle's blocks stay in use): leaked.
  ~Life() {
    if (!alive && pool != nullptr) pool->leak();
  }
};

// The fields every rank must pass identically, plus the rank's local verdict on its own arguments;
// exchanged with one allgather at group creation. All int32 so it is a plain byte blob.
struct ConfigBlob {
  int32_t status;  // bitepSuccess, or the code of the rank's local failure
  int32_t backend;
  int32_t num_experts;
  int32_t topk;
  int32_t hidden;
  int32_t dtype;
  int32_t nranks;
  int32_t low_latency_max_tokens;
};

// Local checks of a group config (struct, ranges); does not need W.
bitepResult_t check_group_config(const bitepGroupConfig_t* config);
// Fills blob from config (which may be null or invalid: status tells).
ConfigBlob make_config_blob(const bitepGroupConfig_t* config, int nranks, bitepResult_t status);
// Given every rank's blob: bitepSuccess when all ranks are valid and agree; else every rank returns the
// same verdict: the rank's own error (self failed), bitepRemoteError (another rank failed its local
// checks), or bitepInvalidArgument naming the first field that differs and two ranks that disagree.
bitepResult_t agree_configs(const ConfigBlob* all, int nranks, int self, bitepResult_t self_status);

// Creates the group over `transport` (taken over, destroyed on failure). Collective over the transport's
// ranks: checks config locally (and that its backend is required_backend, unless -1), then (unless
// configs_agreed, when the caller already ran agree_configs over the same ranks) agrees on it with one
// allgather_host, so every rank fails alike. device: the cuda device of the group (-1 for host).
bitepResult_t create_group(std::unique_ptr<Transport> transport,
                           const bitepGroupConfig_t* config,
                           int device,
                           bitepGroup_t* group,
                           bool configs_agreed = false,
                           int required_backend = -1);

// CUDA devices this process sees (0 where the query fails, or in a build without CUDA).
int visible_cuda_devices();

// The groups given to callers and not destroyed: a registry, so that a call on a destroyed group (or on a pointer that
// was never a group) is refused without reading the memory it points to. create_group adds a group as it returns it;
// bitepGroupDestroy takes it out, inside the group's hold, before freeing it. add_live_group / forget_live_group are
// public for the tests' group objects.
void add_live_group(const bitepGroup* group);
void forget_live_group(const bitepGroup* group);
bool is_live_group(const bitepGroup* group);
// group is a live group (not NULL, not destroyed); a broken one passes (the queries still answer on it).
bitepResult_t check_live_group(bitepGroup_t group);
// A live group that can still communicate (no earlier transport failure, no collective call this rank failed alone:
// src/ep/collective.h failed_alone).
bitepResult_t check_group(bitepGroup_t group);
// Whether the group's pool may be freed or trimmed now: not in doubt, and where a call failed alone before it queued
// work with its peers (pool_if_idle), only while nothing queued on the pool is left (Pool::idle()).
bool pool_may_free(bitepGroup_t group);

// bitepGroupDestroy's part of the pool (life->mu held): marks the group gone, then leaks the pool if in doubt and
// frees it if not, except where it waits only on Pool::idle() (pool_if_idle): that one settle_pool decides, now or,
// while live handles hold blocks, once each has given its blocks back with its fence. So a failed call's pool is not
// leaked merely because handles outlived their group.
void let_go_of_pool(bitepGroup_t group);
// A destroyed group's pool kept for its handles (life->mu held): once no block is in use, freed where Pool::idle()
// holds (returns the bytes freed) and leaked where not (0); 0 and kept while a block is still in use.
size_t settle_pool(Life* life);

// One API call's hold on a group. Calls on one group must not overlap: they share its transport, streams, staging
// buffer and counters. enter() refuses with bitepInvalidUsage, naming the call in progress, while another thread is
// inside one; the hold ends with the GroupCall. Calls one after another from different threads are fine.
class GroupCall {
 public:
  GroupCall() = default;
  ~GroupCall();
  GroupCall(const GroupCall&) = delete;
  GroupCall& operator=(const GroupCall&) = delete;
  // What the call does with the group's transport: kTransport (it may communicate) and kTeardown (bitepGroupDestroy)
  // pass the transport's thread rules too (Transport::enter_call); kLocal calls do not use it.
  enum Uses { kTransport, kTeardown, kLocal };
  // Refuses a group that is not live (check_live_group); the test and the hold are taken under the registry's lock,
  // so a bitepGroupDestroy on another thread either refuses this call or is refused. call: the API function's name, a
  // string literal.
  bitepResult_t enter(bitepGroup_t group, const char* call, Uses uses = kTransport);
  // bitepGroupDestroy: the group goes with the hold (nothing is written to it after; its transport's destructor
  // ends the transport's part).
  void forget() { group_ = nullptr; }

 private:
  bitepGroup* group_ = nullptr;
  bool transport_ = false;  // the transport's enter_call passed
};

constexpr uint32_t kGroupMagic = 0x62e9a001u;
constexpr uint32_t kHandleMagic = 0x62e9a002u;

}  // namespace bitep::ep

struct bitepGroup {
  uint32_t magic = bitep::ep::kGroupMagic;
  bitepGroupConfig_t config{};
  int rank = 0;
  int nranks = 1;
  int device = -1;
  int num_local_experts = 0;  // L
  int max_row_experts = 0;    // KL = min(k, L)
  int local_map_bytes = 0;    // MB = ceil(L / 8)
  // Host backend: every collective call first agrees on the ranks' argument checks (one allgather), so
  // a bad argument on one rank fails the call on every rank instead of stalling the others. The cuda
  // backend skips it (it would cost a host synchronisation); see bitepDispatch's notes.
  bool agree_always = false;
  std::unique_ptr<bitep::ep::Transport> transport;
  std::shared_ptr<bitep::ep::Life> life;
  // The API call inside the group now (its name, once past its transport's checks), or null: bitep::ep::GroupCall.
  std::atomic<const char*> in_call{nullptr};
  std::string broken;  // non-empty once a failure left peers in an unknown state (what happened)
  // The pool's blocks may still be written or read by work the group cannot wait for (a transport failure's abandoned
  // requests; a cuda call failed alone after queuing transfers): they are leaked at destruction, never trimmed.
  bool pool_in_doubt = false;
  // A cuda call this rank failed alone before it queued any work with its peers (pool_in_doubt otherwise): no peer
  // can write into the pool, but work queued by earlier calls may still wait for a peer that has left. The pool is
  // freed (at destruction, by bitepGroupTrimMemory) only while Pool::idle() says nothing queued on it is left, and
  // leaked otherwise (pool_may_free); at destruction, blocks live handles hold put that off (let_go_of_pool).
  bool pool_if_idle = false;
  // cuda: work queued with the peers so far (an all-to-all on a stream; a peer window's acquire, before its stores
  // and barriers): collective.h's peer_alltoallv and acquire_window count it, GroupCall::enter notes the count at
  // the call's start, and failed_alone compares the two.
  uint64_t peer_work = 0;
  uint64_t peer_work_at_entry = 0;
  void* upload_staging = nullptr;  // cuda: pinned host staging of Exec::upload_staged
  size_t upload_bytes = 0;
  void* upload_event = nullptr;  // cuda: cudaEvent_t recorded after the last staged upload
  // cuda: the stream beside the caller's that Exec::fork() / join() order work on (copies that overlap an
  // all-to-all), and the two events that order it.
  void* side_stream = nullptr;
  void* fork_event = nullptr;
  void* join_event = nullptr;
  // cuda: the stream of the copy engine's chunks (Exec::ce_chunks), created at its first use, and the event
  // that orders it with the caller's stream.
  void* ce_stream = nullptr;
  void* ce_event = nullptr;
  // Dispatches numbered so far (bitepHandle::seq): host groups check that a combine's ranks give the handles
  // of one dispatch.
  uint64_t dispatches = 0;
  // cuda, with the low-latency window: device tables (src/ep/low_latency.cc), and the common alignment of
  // the combine's destinations.
  void* ll_tables = nullptr;
  int ll_outs_align = 1;
  ~bitepGroup();
};
