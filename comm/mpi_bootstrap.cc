// SPDX-License-Identifier: Apache-2.0
// bitepGroupCreateMpi: both backends from an MPI communicator. The ranks first agree on the config over
// MPI (so a mismatch, even of the backend, fails on every rank), then:
//   host: the group's transport is MPI itself, over a duplicate of comm;
//   cuda: each rank picks its device (config->device, or its index among the ranks of its node), rank 0
//         makes an NCCL unique id, every rank learns it over MPI, and the group runs over a new NCCL
//         communicator (comm/nccl_transport.cc's make_nccl_transport); with BITEP_CUDA_TRANSPORT=ipc (a
//         testing transport) over MPI and CUDA IPC instead, the node's ranks sharing its GPUs in turn
//         (comm/mpi_ipc_transport.h).
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "bitep/bitep_mpi.h"
#include "comm/mpi_ipc_transport.h"
#include "comm/mpi_transport.h"
#include "src/check.h"
#include "src/ep/collective.h"
#include "src/ep/group.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
#endif
#ifdef BITEP_HAVE_NCCL
#include <nccl.h>
#endif

namespace bitep::ep {
namespace {

#ifdef BITEP_HAVE_NCCL
// The cuda backend's device: config->device, or the rank's index among the ranks of its node (shared: that
// index modulo the visible devices, for the IPC transport's ranks that share GPUs).
bitepResult_t pick_device(Transport* mpi, const bitepGroupConfig_t* config, bool shared, int* device) {
  int local_rank = 0;
  BITEP_CHECK(node_local_rank(mpi, &local_rank));
  const int count = visible_cuda_devices();
  *device = config->device >= 0 ? config->device : shared && count > 0 ? local_rank % count : local_rank;
  if (*device >= count)
    BITEP_FAIL(bitepNotSupported, "the cuda backend needs device %d (%s) but %d CUDA device(s) are visible%s", *device,
               config->device >= 0 ? "config->device" : "this rank's index on its node", count,
               config->device >= 0 ? "" : ": run fewer ranks per node, or set config->device");
  return bitepSuccess;
}

struct IdMessage {
  int32_t status;
  bitepUniqueId id;
};

// Each rank picks its device (pick_device) and, when id is not null, rank 0 makes an NCCL unique id; the ranks
// agree that every one did: a rank that failed returns its error, the others bitepRemoteError naming it.
bitepResult_t agree_device(
    Transport* mpi, const bitepGroupConfig_t* config, bool shared, int* device, bitepUniqueId* id) {
  bitepResult_t local = pick_device(mpi, config, shared, device);
  IdMessage mine{};
  if (local == bitepSuccess && id != nullptr && mpi->rank() == 0) local = nccl_get_unique_id(&mine.id);
  mine.status = local;
  SavedError saved(local);
  std::vector<IdMessage> all(mpi->nranks());
  const bitepResult_t r = mpi->allgather_host(&mine, all.data(), sizeof(IdMessage));
  if (r != bitepSuccess) return local != bitepSuccess ? saved.restore() : r;
  if (local != bitepSuccess) return saved.restore();
  for (int q = 0; q < mpi->nranks(); ++q)
    if (all[q].status != bitepSuccess)
      BITEP_FAIL(bitepRemoteError,
                 "rank %d could not set up its part of the cuda group (%s); see that rank's "
                 "bitepGetLastError()",
                 q, bitepGetErrorString(static_cast<bitepResult_t>(all[q].status)));
  if (id != nullptr) *id = all[0].id;
  return bitepSuccess;
}

// With `device` current: make(&t) gives the transport, and the group (config->device = device) runs over it.
template <typename Make>
bitepResult_t group_on_device(int device, const bitepGroupConfig_t* config, bitepGroup_t* group, Make make) {
  int prev = -1;
  BITEP_CUDA_CHECK(cudaGetDevice(&prev));
  if (prev != device) BITEP_CUDA_CHECK(cudaSetDevice(device));
  std::unique_ptr<Transport> t;
  bitepResult_t res = make(&t);
  if (res == bitepSuccess) {
    bitepGroupConfig_t cfg = *config;
    cfg.device = device;
    res = create_group(std::move(t), &cfg, device, group, /*configs_agreed=*/true);
  }
  if (prev != device) cudaSetDevice(prev);
  return res;
}

bitepResult_t create_nccl(Transport* mpi, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  int device = -1;
  bitepUniqueId id;
  BITEP_CHECK(agree_device(mpi, config, false, &device, &id));
  return group_on_device(device, config, group, [&](std::unique_ptr<Transport>* t) {
    struct ncclComm* nccl = nullptr;
    BITEP_CHECK(nccl_comm_init(&id, mpi->nranks(), mpi->rank(), config->timeout_s, &nccl));
    const bitepResult_t res = make_nccl_transport(nccl, /*owned=*/true, t);
    if (res != bitepSuccess) ncclCommAbort(nccl);  // the factory leaves comm to us when it fails
    return res;
  });
}

// BITEP_CUDA_TRANSPORT=ipc: the group's transport is `mpi` itself (taken over) with the device's memory shared
// by CUDA IPC; the node's ranks share its devices.
bitepResult_t create_ipc(std::unique_ptr<Transport> mpi, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  int device = -1;
  BITEP_CHECK(agree_device(mpi.get(), config, true, &device, nullptr));
  return group_on_device(device, config, group, [&](std::unique_ptr<Transport>* t) {
    return make_mpi_ipc_transport(std::move(mpi), device, t);
  });
}
#endif

// MPI_Comm_idup of comm, polled until done or until timeout_s: then bitepTimeout, with the request and the handle it
// will write left to MPI (a nonblocking collective's request may be neither freed nor cancelled; a late peer still
// completes it).
bitepResult_t dup_polled(MPI_Comm comm, double timeout_s, MPI_Comm* out) {
  auto* slot = new MPI_Comm(MPI_COMM_NULL);  // written when the request completes: not on this stack
  MPI_Request req = MPI_REQUEST_NULL;
  const int err = MPI_Comm_idup(comm, slot, &req);
  if (err != MPI_SUCCESS) {
    delete slot;
    return mpi_error(err, "MPI_Comm_idup", __FILE__, __LINE__);
  }
  const auto start = std::chrono::steady_clock::now();
  for (long spin = 0;; ++spin) {
    int done = 0;
    BITEP_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));  // (on an error the slot is left: MPI may own it)
    if (done) {
      *out = *slot;
      delete slot;
      return bitepSuccess;
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (elapsed > timeout_s)
      BITEP_FAIL(bitepTimeout,
                 "bitepGroupCreateMpi: the duplication of comm did not complete within %g s: a rank of comm did not "
                 "call bitepGroupCreateMpi (or was refused before it, see its bitepGetLastError()); comm has a "
                 "collective in flight now, which completes when that rank calls bitepGroupCreateMpi",
                 timeout_s);
    if (spin < 64) continue;
    if (spin < 4096)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

bitepResult_t create_mpi(MPI_Comm comm, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  if (group != nullptr) *group = nullptr;
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    BITEP_FAIL(bitepInvalidUsage, "MPI is %s: call bitepGroupCreateMpi between MPI_Init and MPI_Finalize",
               initialized ? "finalized" : "not initialised");
  BITEP_ARG_CHECK(comm != MPI_COMM_NULL, "comm is MPI_COMM_NULL");
  MpiThreadHold hold;
  BITEP_CHECK(hold.enter("bitepGroupCreateMpi"));
  // Collective: every rank duplicates before any check can make it leave. Polled against the config's timeout (a
  // rank refused above, or one that never calls, would leave its peers in a blocking MPI_Comm_dup for good).
  MPI_Comm dup = MPI_COMM_NULL;
  BITEP_CHECK(dup_polled(comm, creation_timeout_s(config), &dup));
  MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
  bitepResult_t local = check_group_config(config);
  if (local == bitepSuccess && group == nullptr)
    local = set_error(bitepInvalidArgument, __FILE__, __LINE__, "group is NULL");
#ifndef BITEP_HAVE_NCCL
  if (local == bitepSuccess && config->backend == bitepBackendCuda)
    local = set_error(bitepNotSupported, __FILE__, __LINE__,
                      "config->backend is bitepBackendCuda but this bitep was built without NCCL");
#endif
  std::unique_ptr<Transport> mpi =
      make_mpi_transport(dup, local == bitepSuccess ? config->timeout_s : kDefaultTimeoutS);
  SavedError saved(local);
  const ConfigBlob blob = make_config_blob(config, mpi->nranks(), local);
  std::vector<ConfigBlob> all(mpi->nranks());
  const bitepResult_t r = mpi->allgather_host(&blob, all.data(), sizeof(ConfigBlob));
  if (r != bitepSuccess) return local != bitepSuccess ? saved.restore() : r;
  BITEP_CHECK(agree_configs(all.data(), mpi->nranks(), mpi->rank(), local));
  if (config->backend == bitepBackendHost) return create_group(std::move(mpi), config, -1, group, true);
#ifdef BITEP_HAVE_NCCL
  // The ranks agree on the transport too (a rank in NCCL's init and one in the IPC transport's would wait for
  // each other until the timeout).
  const int32_t ipc = mpi_ipc_requested() ? 1 : 0;
  std::vector<int32_t> ipcs(mpi->nranks());
  BITEP_CHECK(mpi->allgather_host(&ipc, ipcs.data(), sizeof(int32_t)));
  for (int q = 0; q < mpi->nranks(); ++q)
    if (ipcs[q] != ipc)
      BITEP_FAIL(bitepInvalidUsage,
                 "BITEP_CUDA_TRANSPORT is %s on rank %d but %s on rank %d: every rank must set it alike",
                 ipc ? "ipc" : "not ipc", mpi->rank(), ipcs[q] ? "ipc" : "not ipc", q);
  if (ipc) return create_ipc(std::move(mpi), config, group);
  return create_nccl(mpi.get(), config, group);
#else
  BITEP_FAIL(bitepInternalError, "unreachable: cuda backend without NCCL");
#endif
}

}  // namespace
}  // namespace bitep::ep

extern "C" bitepResult_t bitepGroupCreateMpi(MPI_Comm comm, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  return bitep::guard("bitepGroupCreateMpi", [&] { return bitep::ep::create_mpi(comm, config, group); });
}
