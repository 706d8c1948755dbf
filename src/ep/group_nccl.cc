// SPDX-License-Identifier: Apache-2.0
// The NCCL bootstraps of the cuda backend: a unique id, a group over a new communicator, a group over the
// caller's communicator. The NCCL work itself is in comm/nccl_transport.cc (src/ep/transport.h's hooks);
// builds without NCCL return bitepNotSupported.
#include "src/check.h"
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

bitepResult_t from_unique_id(
    const bitepUniqueId* id, int nranks, int rank, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  BITEP_ARG_CHECK(id != nullptr, "id is NULL");
  BITEP_ARG_CHECK(nranks >= 1, "nranks is %d, must be >= 1", nranks);
  BITEP_ARG_CHECK(rank >= 0 && rank < nranks, "rank is %d, must be in [0, nranks = %d)", rank, nranks);
  // A bad config is not a reason to leave the communicator's init (the peers would wait in it): the
  // config is checked, and agreed on, once the communicator exists.
  const double timeout = creation_timeout_s(config);
  int prev = -1;
  BITEP_CUDA_CHECK(cudaGetDevice(&prev));
  const int device = config_readable(config) && config->device >= 0 ? config->device : prev;
  // A device this process does not see: the init runs on the current one, and create_group fails the group on
  // every rank (its agreement names config->device).
  const int init_device = device < visible_cuda_devices() ? device : prev;
  if (init_device != prev) BITEP_CUDA_CHECK(cudaSetDevice(init_device));
  struct ncclComm* comm = nullptr;
  bitepResult_t r = nccl_comm_init(id, nranks, rank, timeout, &comm);
  if (r == bitepSuccess) {
    std::unique_ptr<Transport> t;
    r = make_nccl_transport(comm, /*owned=*/true, &t);
    if (r != bitepSuccess) ncclCommAbort(comm);  // the factory leaves comm to us when it fails
    if (r == bitepSuccess) r = create_group(std::move(t), config, device, group, false, bitepBackendCuda);
    // On failure after make_nccl_transport, the transport (and with it comm) is already gone.
  }
  if (init_device != prev) cudaSetDevice(prev);
  return r;
}

bitepResult_t from_nccl(struct ncclComm* comm, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  BITEP_ARG_CHECK(comm != nullptr, "comm is NULL");
  int device = -1;
  BITEP_CUDA_CHECK(cudaGetDevice(&device));
  std::unique_ptr<Transport> t;
  // The config's timeout for the agreement (a borrowed communicator had no init of ours to take one from).
  BITEP_CHECK(make_nccl_transport(comm, /*owned=*/false, &t, creation_timeout_s(config)));
  return create_group(std::move(t), config, device, group, false, bitepBackendCuda);
}
#endif

}  // namespace
}  // namespace bitep::ep

extern "C" {

bitepResult_t bitepGetUniqueId(bitepUniqueId* id) {
  return bitep::guard("bitepGetUniqueId", [&]() -> bitepResult_t {
#ifdef BITEP_HAVE_NCCL
    return bitep::ep::nccl_get_unique_id(id);
#else
    (void)id;
    BITEP_FAIL(bitepNotSupported, "this bitep was built without NCCL: the cuda backend's groups need it");
#endif
  });
}

bitepResult_t bitepGroupCreateFromUniqueId(
    const bitepUniqueId* id, int nranks, int rank, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  if (group != nullptr) *group = nullptr;
  return bitep::guard("bitepGroupCreateFromUniqueId", [&]() -> bitepResult_t {
#ifdef BITEP_HAVE_NCCL
    return bitep::ep::from_unique_id(id, nranks, rank, config, group);
#else
    (void)id, (void)nranks, (void)rank, (void)config;
    BITEP_FAIL(bitepNotSupported, "this bitep was built without NCCL: the cuda backend's groups need it");
#endif
  });
}

bitepResult_t bitepGroupCreateFromNccl(struct ncclComm* comm, const bitepGroupConfig_t* config, bitepGroup_t* group) {
  if (group != nullptr) *group = nullptr;
  return bitep::guard("bitepGroupCreateFromNccl", [&]() -> bitepResult_t {
#ifdef BITEP_HAVE_NCCL
    return bitep::ep::from_nccl(comm, config, group);
#else
    (void)comm, (void)config;
    BITEP_FAIL(bitepNotSupported, "this bitep was built without NCCL: the cuda backend's groups need it");
#endif
  });
}

}  // extern "C"
