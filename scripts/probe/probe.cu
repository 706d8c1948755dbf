// Throwaway probe (not built by CMake): NCCL symmetric window registration, blocking and non-blocking.
#include <mpi.h>
#include <nccl.h>
#include <nccl_device.h>
#include <cstdio>
#include <cuda_runtime.h>
#include <unistd.h>
__global__ void bases(ncclWindow_t w, int n, char** out) { int p = threadIdx.x; if (p < n) out[p] = (char*)ncclGetPeerPointer(w, 0, p); }
__global__ void put(char* peer, int v) { ((int*)peer)[threadIdx.x] = v + threadIdx.x; }
int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank, n; MPI_Comm_rank(MPI_COMM_WORLD, &rank); MPI_Comm_size(MPI_COMM_WORLD, &n);
  cudaSetDevice(rank);
  for (int blocking = 1; blocking >= 0; --blocking) {
    ncclUniqueId id; if (rank == 0) ncclGetUniqueId(&id);
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER; cfg.blocking = blocking;
    ncclComm_t comm; ncclResult_t r = ncclCommInitRankConfig(&comm, n, id, rank, &cfg);
    ncclResult_t st = ncclInProgress; while (st == ncclInProgress) ncclCommGetAsyncError(comm, &st);
    printf("[%d] blocking=%d init r=%d st=%d\n", rank, blocking, r, st);
    auto team = ncclTeamLsa(comm);
    printf("[%d] lsa team nRanks=%d rank=%d\n", rank, team.nRanks, team.rank);
    void* mem = nullptr; r = ncclMemAlloc(&mem, 8 << 20); printf("[%d] memalloc r=%d %p\n", rank, r, mem);
    cudaMemset(mem, 0, 8 << 20); cudaDeviceSynchronize();
    volatile ncclWindow_t win = nullptr;
    r = ncclCommWindowRegister(comm, mem, 8 << 20, (ncclWindow_t*)&win, NCCL_WIN_COLL_SYMMETRIC);
    printf("[%d] register r=%d win=%p\n", rank, r, (void*)win);
    int polls = 0; st = ncclInProgress;
    while (st == ncclInProgress) { ncclCommGetAsyncError(comm, &st); ++polls; }
    printf("[%d] after %d polls st=%d win=%p\n", rank, polls, st, (void*)win);
    for (int i = 0; i < 100 && win == nullptr; ++i) usleep(10000);
    printf("[%d] after wait win=%p\n", rank, (void*)win);
    if (win != nullptr) {
      char** d; cudaMalloc(&d, 8 * n); bases<<<1, 32>>>(win, n, d);
      cudaError_t e = cudaDeviceSynchronize(); char* h[8] = {};
      cudaMemcpy(h, d, 8 * n, cudaMemcpyDeviceToHost);
      printf("[%d] bases kernel %s: %p %p (mem %p)\n", rank, cudaGetErrorString(e), h[0], h[1], mem);
      put<<<1, 32>>>(h[(rank + 1) % n], 1000 * (rank + 1)); e = cudaDeviceSynchronize();
      MPI_Barrier(MPI_COMM_WORLD);
      int got[4]; cudaMemcpy(got, mem, 16, cudaMemcpyDeviceToHost);
      printf("[%d] put %s, my window holds %d %d %d %d\n", rank, cudaGetErrorString(e), got[0], got[1], got[2], got[3]);
      r = ncclCommWindowDeregister(comm, win); st = ncclInProgress; while (st == ncclInProgress) ncclCommGetAsyncError(comm, &st);
      printf("[%d] deregister r=%d st=%d\n", rank, r, st);
    }
    ncclMemFree(mem);
    ncclCommDestroy(comm);
    fflush(stdout);
  }
  MPI_Finalize();
}
