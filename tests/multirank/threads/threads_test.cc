// SPDX-License-Identifier: Apache-2.0
// Groups and threads (bitep.h, "Threads"), under mpirun at the MPI thread level that BITEP_TEST_MPI_THREAD asks for
// (main.cc): one suite a level, and a suite skips where MPI gave another level. The host backend, and for the held
// call and the calls from thread after thread the cuda backend too (ThreadsMultipleCuda, skipped without a GPU).
// - MPI_THREAD_MULTIPLE: a call on a group while another thread is inside one on it is refused, naming that call, and
//   the call inside is unharmed; one group per thread, all at once, each correct; one group's calls made one after
//   another from different threads.
// - MPI_THREAD_SERIALIZED: a call on one group while another thread is inside a call on another is refused.
// - below: calls that make MPI calls from a thread other than MPI's main thread are refused, before any MPI call.
// Every round checks its data: a dispatch and a combine of two experts a token, weights 1/2 and the experts the
// identity, give back each token's row bit for bit.
#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bitep/bitep.h"
#include "bitep/bitep.hpp"
#include "bitep/bitep_mpi.h"
#include "src/ep/group.h"  // bitepGroup::in_call: when a thread is inside a call (a test waits for it, reads nothing else)
#include "tests/multirank/ep_checks.h"  // gpu_per_rank
#include "tests/multirank/mpi_main.h"

#ifdef BITEP_MULTIRANK_CUDA
#include <cuda_runtime.h>
#endif

namespace {

constexpr int kTopk = 2;
constexpr int kGoTag = 4711;

struct World {
  int rank = 0, size = 1;
};
World world() {
  World w;
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  return w;
}

// A group's shape: L experts a rank, H fp32 elements a row.
struct Shape {
  int experts_per_rank = 2;
  int hidden = 8;
};

// Where a group runs: the host backend (host memory), or the cuda backend on `device` (device memory, each call on a
// stream of its own, synchronised before its result is read).
struct Place {
  bitepBackend_t backend = bitepBackendHost;
  int device = -1;
};

bitepResult_t make_group(MPI_Comm comm, const Shape& s, const Place& place, bitepGroup_t* g) {
  int W = 1;
  MPI_Comm_size(comm, &W);
  bitepGroupConfig_t c = BITEP_GROUP_CONFIG_INIT;
  c.backend = place.backend;
  c.device = place.device;
  c.num_experts = s.experts_per_rank * W;
  c.topk = kTopk;
  c.hidden = s.hidden;
  c.dtype = bitepFloat32;
  c.timeout_s = 30.0;  // a test that goes wrong (a call not refused, say) ends in a timeout, not a hang
  return bitepGroupCreateMpi(comm, &c, g);
}
bitepResult_t make_group(MPI_Comm comm, const Shape& s, bitepGroup_t* g) { return make_group(comm, s, Place{}, g); }

#ifdef BITEP_MULTIRANK_CUDA
// Whether every rank has a GPU for the cuda backend (collective; ept::gpu_per_rank): *place names this rank's.
bool cuda_place(Place* place, std::string* why) {
  place->backend = bitepBackendCuda;
  return ept::gpu_per_rank(&place->device, why);
}

// Device copies of host vectors and a stream, on one device, made without changing the calling thread's current
// device (a bitep call on a thread that never chose one must pick the group's itself); freed after a synchronisation.
class Staged {
 public:
  explicit Staged(int device) : device_(device) {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking);
    cudaSetDevice(prev);
  }
  ~Staged() {
    cudaStreamSynchronize(stream_);
    for (void* p : bufs_) cudaFree(p);
    cudaStreamDestroy(stream_);
  }
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  void* alloc(size_t bytes) {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    void* p = nullptr;
    cudaMalloc(&p, bytes > 0 ? bytes : 1);
    cudaSetDevice(prev);
    bufs_.push_back(p);
    return p;
  }
  template <typename T>
  void* upload(const std::vector<T>& v) {
    void* p = alloc(v.size() * sizeof(T));
    cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    return p;
  }
  bitepStream_t stream() const { return reinterpret_cast<bitepStream_t>(stream_); }
  bool sync() { return cudaStreamSynchronize(stream_) == cudaSuccess; }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  std::vector<void*> bufs_;
};
#endif

// One rank's tokens for a round: x, a bitmap of two distinct experts a token and their weights (1/2 each).
struct Tokens {
  int64_t T = 0;
  std::vector<float> x;
  std::vector<uint8_t> map;
  std::vector<float> weights;
};

Tokens make_tokens(int rank, int64_t T, int E, int H, int seed) {
  Tokens tk;
  tk.T = T;
  const int MB = (E + 7) / 8;
  tk.x.resize(static_cast<size_t>(T) * H);
  tk.map.assign(static_cast<size_t>(T) * MB, 0);
  tk.weights.assign(static_cast<size_t>(T) * kTopk, 0.5f);
  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < H; ++h)
      tk.x[t * H + h] = static_cast<float>(seed * 7 + rank * 1000 + t) + static_cast<float>(h) / 64.0f;
    const int e1 = static_cast<int>((seed + 3 * t + rank) % E);
    const int e2 = static_cast<int>((e1 + 1 + t % (E - 1)) % E);
    for (const int e : {e1, e2}) tk.map[t * MB + e / 8] |= static_cast<uint8_t>(1u << (e % 8));
  }
  return tk;
}

std::string failure(const char* call, bitepResult_t r) {
  return std::string(call) + " returned " + bitepGetErrorString(r) + ": " + bitepGetLastError();
}

bitepResult_t dispatch(bitepGroup_t g, const Place& place, const Tokens& tk, bitepHandle_t* h) {
  bitepDispatchArgs_t a = BITEP_DISPATCH_ARGS_INIT;
  a.num_tokens = tk.T;
  a.map_format = bitepMapBitmapU8;
  if (place.backend == bitepBackendHost) {
    a.x = tk.x.data();
    a.routing_map = tk.map.data();
    a.topk_weights = tk.weights.data();
    return bitepDispatch(g, &a, nullptr, h);
  }
#ifdef BITEP_MULTIRANK_CUDA
  Staged st(place.device);
  a.x = st.upload(tk.x);
  a.routing_map = st.upload(tk.map);
  a.topk_weights = static_cast<const float*>(st.upload(tk.weights));
  return bitepDispatch(g, &a, st.stream(), h);  // ~Staged waits for it before freeing the inputs
#else
  return bitepNotSupported;
#endif
}
bitepResult_t dispatch(bitepGroup_t g, const Tokens& tk, bitepHandle_t* h) { return dispatch(g, Place{}, tk, h); }

// The combine of h with the experts the identity (y = expert_x), checked against tk.x; "" when every bit agrees.
std::string combine_and_check(bitepGroup_t g, const Place& place, bitepHandle_t h, const Tokens& tk, int H) {
  bitepDispatchLayout_t layout;
  bitepResult_t r = bitepHandleGetLayout(h, &layout);
  if (r != bitepSuccess) return failure("bitepHandleGetLayout", r);
  std::vector<float> out(tk.x.size(), -1.0f);
  bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
  c.y = layout.expert_x;
  c.layout = bitepLayoutExpertMajor;
  c.weighted = 1;
  if (place.backend == bitepBackendHost) {
    c.out = out.data();
    r = bitepCombine(g, h, &c, nullptr);
  } else {
#ifdef BITEP_MULTIRANK_CUDA
    Staged st(place.device);
    c.out = st.upload(out);
    r = bitepCombine(g, h, &c, st.stream());
    if (!st.sync() || cudaMemcpy(out.data(), c.out, out.size() * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess)
      return std::string("CUDA: ") + cudaGetErrorString(cudaGetLastError());
#else
    r = bitepNotSupported;
#endif
  }
  if (r != bitepSuccess) return failure("bitepCombine", r);
  for (size_t i = 0; i < out.size(); ++i)
    if (std::memcmp(&out[i], &tk.x[i], sizeof(float)) != 0)
      return "token " + std::to_string(i / H) + " element " + std::to_string(i % H) + ": combined " +
             std::to_string(out[i]) + ", sent " + std::to_string(tk.x[i]);
  return "";
}
std::string combine_and_check(bitepGroup_t g, bitepHandle_t h, const Tokens& tk, int H) {
  return combine_and_check(g, Place{}, h, tk, H);
}

// A dispatch and a combine of this rank's T tokens; "" or what went wrong.
std::string round_trip(bitepGroup_t g, const Place& place, int rank, int64_t T, const Shape& s, int E, int seed) {
  const Tokens tk = make_tokens(rank, T, E, s.hidden, seed);
  bitepHandle_t h = nullptr;
  const bitepResult_t r = dispatch(g, place, tk, &h);
  if (r != bitepSuccess) return failure("bitepDispatch", r);
  const std::string err = combine_and_check(g, place, h, tk, s.hidden);
  bitepHandleDestroy(h);
  return err;
}
std::string round_trip(bitepGroup_t g, int rank, int64_t T, const Shape& s, int E, int seed) {
  return round_trip(g, Place{}, rank, T, s, E, seed);
}

// Waits until another thread is inside `call` on g: past its entry checks (the group names a call only then), so
// inside MPI's thread rules' count too.
void wait_until_inside(bitepGroup_t g, const char* call) {
  for (;;) {
    const char* inside = g->in_call.load(std::memory_order_acquire);
    if (inside != nullptr && std::strcmp(inside, call) == 0) return;
    std::this_thread::yield();
  }
}

// r is bitepInvalidUsage and the thread's detail holds every one of `parts`.
::testing::AssertionResult refused(bitepResult_t r, std::initializer_list<const char*> parts) {
  const std::string detail = bitepGetLastError();
  if (r != bitepInvalidUsage)
    return ::testing::AssertionFailure() << "returned " << bitepGetErrorString(r) << " (" << detail
                                         << "), not bitepInvalidUsage";
  for (const char* p : parts)
    if (detail.find(p) == std::string::npos)
      return ::testing::AssertionFailure() << "the detail does not say \"" << p << "\": " << detail;
  return ::testing::AssertionSuccess();
}

bool at_level(int lo, int hi) {
  const int level = multirank_mpi_thread_level();
  return level >= lo && level <= hi;
}

// ------------------------------------------------------------------------------------- MPI_THREAD_MULTIPLE

// Rank 0's second thread calls into the group while its first is inside bitepDispatch (held there: the other ranks
// join that dispatch only when rank 0 says so). Every call that takes the group is refused naming bitepDispatch and
// changes nothing; the queries that read what creation fixed answer; then the dispatch inside completes, correct.
// The refused calls are given host pointers: they are refused before they look at them. On the cuda backend this
// thread makes no CUDA call while the other is held (the held call's kernels wait for the peers).
void held_call_is_refused(const Place& place) {
  const World w = world();
  const Shape s{3, 16};
  const int E = s.experts_per_rank * w.size;
  bitepGroup_t g = nullptr;
  ASSERT_EQ(make_group(MPI_COMM_WORLD, s, place, &g), bitepSuccess) << bitepGetLastError();
  // A handle of an earlier dispatch, for the calls that take one.
  const Tokens earlier = make_tokens(w.rank, 12, E, s.hidden, 1);
  bitepHandle_t h0 = nullptr;
  ASSERT_EQ(dispatch(g, place, earlier, &h0), bitepSuccess) << bitepGetLastError();

  std::string inside_result = "not run";
  if (w.rank == 0) {
    std::thread inside([&] { inside_result = round_trip(g, place, w.rank, 20, s, E, 2); });
    wait_until_inside(g, "bitepDispatch");
    const Tokens tk = make_tokens(w.rank, 5, E, s.hidden, 3);
    bitepHandle_t h = reinterpret_cast<bitepHandle_t>(0x1);
    // Host pointers (Place{}), never device copies: cudaFree would wait for the held call's kernels, which wait for the
    // peers that this thread releases only after these calls.
    EXPECT_TRUE(
        refused(dispatch(g, Place{}, tk, &h), {"bitepDispatch: ", "another thread is inside bitepDispatch on it"}));
    EXPECT_EQ(h, nullptr);
    bitepDispatchArgs_t ll = BITEP_DISPATCH_ARGS_INIT;
    EXPECT_TRUE(
        refused(bitepDispatchLowLatency(g, &ll, nullptr, &h), {"bitepDispatchLowLatency: ", "inside bitepDispatch"}));
    std::vector<float> out(earlier.x.size()), grad(earlier.x.size());
    bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
    c.y = earlier.x.data();
    c.out = out.data();
    EXPECT_TRUE(refused(bitepCombine(g, h0, &c, nullptr), {"bitepCombine: ", "inside bitepDispatch"}));
    EXPECT_TRUE(refused(bitepDispatchBackward(g, h0, grad.data(), bitepLayoutExpertMajor, out.data(), nullptr),
                        {"bitepDispatchBackward: ", "inside bitepDispatch"}));
    bitepCombineBackwardArgs_t cb = BITEP_COMBINE_BWD_ARGS_INIT;
    cb.grad_out = out.data();
    cb.grad_y = grad.data();
    EXPECT_TRUE(refused(bitepCombineBackward(g, h0, &cb, nullptr), {"bitepCombineBackward: ", "inside bitepDispatch"}));
    const int32_t* sources = nullptr;
    EXPECT_TRUE(refused(bitepHandleGetExpertSources(g, h0, nullptr, &sources), {"inside bitepDispatch"}));
    size_t bytes = 0;
    int capturable = 0;
    EXPECT_TRUE(refused(bitepGroupMemoryBytes(g, &bytes), {"bitepGroupMemoryBytes: ", "inside bitepDispatch"}));
    EXPECT_TRUE(refused(bitepGroupTrimMemory(g, &bytes), {"inside bitepDispatch"}));
    EXPECT_TRUE(refused(bitepGroupLowLatencyCapturable(g, &capturable), {"inside bitepDispatch"}));
    EXPECT_TRUE(refused(bitepGroupDestroy(g), {"bitepGroupDestroy: ", "inside bitepDispatch", "must not overlap"}));
    {  // The C++ layer's reset throws the refusal and keeps the group (its destructor would drop it unfreed).
      bitep::Group cpp(g);
      try {
        cpp.reset();
        ADD_FAILURE() << "bitep::Group::reset() returned while another thread is inside bitepDispatch";
      } catch (const bitep::Error& e) {
        EXPECT_EQ(e.result(), bitepInvalidUsage) << e.what();
        EXPECT_NE(std::string(e.what()).find("inside bitepDispatch"), std::string::npos) << e.what();
      }
      EXPECT_EQ(cpp.get(), g) << "a refused reset let go of the group";
      EXPECT_EQ(cpp.release(), g);
    }
    // What creation fixed, and a handle's layout, may be read at any time.
    int rank = -1, nranks = -1;
    EXPECT_EQ(bitepGroupGetRank(g, &rank, &nranks), bitepSuccess) << bitepGetLastError();
    EXPECT_EQ(rank, 0);
    EXPECT_EQ(nranks, w.size);
    bitepDispatchLayout_t layout;
    EXPECT_EQ(bitepHandleGetLayout(h0, &layout), bitepSuccess) << bitepGetLastError();
    EXPECT_STREQ(g->in_call.load(), "bitepDispatch") << "a refused call let go of the group";
    for (int q = 1; q < w.size; ++q) {
      int go = 1;
      MPI_Send(&go, 1, MPI_INT, q, kGoTag, MPI_COMM_WORLD);
    }
    inside.join();
  } else {
    int go = 0;
    MPI_Recv(&go, 1, MPI_INT, 0, kGoTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    inside_result = round_trip(g, place, w.rank, 20, s, E, 2);
  }
  EXPECT_EQ(inside_result, "") << "the call inside";
  // The group is whole: the earlier handle combines, a new round trip works, and it destroys.
  EXPECT_EQ(combine_and_check(g, place, h0, earlier, s.hidden), "");
  EXPECT_EQ(bitepHandleDestroy(h0), bitepSuccess);
  EXPECT_EQ(round_trip(g, place, w.rank, 7, s, E, 4), "");
  EXPECT_EQ(bitepGroupDestroy(g), bitepSuccess) << bitepGetLastError();
}

TEST(ThreadsMultiple, ACallWhileAnotherThreadIsInsideIsRefusedNamingIt) {
  if (!at_level(MPI_THREAD_MULTIPLE, MPI_THREAD_MULTIPLE)) GTEST_SKIP() << "needs MPI_THREAD_MULTIPLE";
  if (world().size < 2) GTEST_SKIP() << "one rank: no call waits for a peer, so none can be held inside";
  held_call_is_refused(Place{});
}

// Three threads a rank, each with a group of its own over its own communicator (created in the thread, different
// shapes), run their rounds at the same time.
TEST(ThreadsMultiple, OneGroupPerThreadAllAtOnce) {
  if (!at_level(MPI_THREAD_MULTIPLE, MPI_THREAD_MULTIPLE)) GTEST_SKIP() << "needs MPI_THREAD_MULTIPLE";
  const World w = world();
  constexpr int kGroups = 3, kRounds = 8;
  const Shape shapes[kGroups] = {{2, 8}, {3, 33}, {5, 4}};  // E = 2W, 3W, 5W: not multiples of 8 at most W
  std::vector<MPI_Comm> comms(kGroups, MPI_COMM_NULL);
  for (MPI_Comm& c : comms) MPI_Comm_dup(MPI_COMM_WORLD, &c);
  std::vector<std::string> results(kGroups);
  std::vector<std::thread> threads;
  for (int i = 0; i < kGroups; ++i)
    threads.emplace_back([&, i] {
      const Shape& s = shapes[i];
      bitepGroup_t g = nullptr;
      bitepResult_t r = make_group(comms[i], s, &g);
      if (r != bitepSuccess) {
        results[i] = failure("bitepGroupCreateMpi", r);
        return;
      }
      for (int n = 0; n < kRounds && results[i].empty(); ++n) {
        const int seed = 100 * i + n;
        const int64_t T = (seed + 5 * w.rank) % 41;  // 0 .. 40 tokens, 0 on some ranks in some rounds
        results[i] = round_trip(g, w.rank, T, s, s.experts_per_rank * w.size, seed);
      }
      r = bitepGroupDestroy(g);
      if (r != bitepSuccess && results[i].empty()) results[i] = failure("bitepGroupDestroy", r);
    });
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kGroups; ++i) EXPECT_EQ(results[i], "") << "group " << i;
  for (MPI_Comm& c : comms) MPI_Comm_free(&c);
}

// One group's calls one after another from four threads: dispatch, expert sources, combine, handle destroy. cuda:
// threads that never chose a device (the group's calls make its device current themselves).
void calls_from_thread_after_thread(const Place& place) {
  const World w = world();
  const Shape s{4, 12};
  const int E = s.experts_per_rank * w.size;
  bitepGroup_t g = nullptr;
  ASSERT_EQ(make_group(MPI_COMM_WORLD, s, place, &g), bitepSuccess) << bitepGetLastError();
  const Tokens tk = make_tokens(w.rank, 25, E, s.hidden, 9);
  bitepHandle_t h = nullptr;
  bitepResult_t dispatched = bitepInternalError, sourced = bitepInternalError, destroyed = bitepInternalError;
  std::string combined = "not run";
  const int32_t* sources = nullptr;
  std::thread([&] { dispatched = dispatch(g, place, tk, &h); }).join();
  ASSERT_EQ(dispatched, bitepSuccess);
  std::thread([&] { sourced = bitepHandleGetExpertSources(g, h, nullptr, &sources); }).join();
  EXPECT_EQ(sourced, bitepSuccess);
  EXPECT_NE(sources, nullptr);
  std::thread([&] { combined = combine_and_check(g, place, h, tk, s.hidden); }).join();
  EXPECT_EQ(combined, "");
  std::thread([&] { destroyed = bitepHandleDestroy(h); }).join();
  EXPECT_EQ(destroyed, bitepSuccess);
  EXPECT_EQ(bitepGroupDestroy(g), bitepSuccess) << bitepGetLastError();
}

TEST(ThreadsMultiple, OneGroupsCallsFromThreadAfterThread) {
  if (!at_level(MPI_THREAD_MULTIPLE, MPI_THREAD_MULTIPLE)) GTEST_SKIP() << "needs MPI_THREAD_MULTIPLE";
  calls_from_thread_after_thread(Place{});
}

// The same two on the cuda backend: the hold comes before anything backend-specific, and a call from a fresh thread
// runs on the group's device. Not one group a thread at once: cuda groups over the same GPUs must order their calls
// alike on every rank (bitep.h, "Threads").
#ifdef BITEP_MULTIRANK_CUDA
TEST(ThreadsMultipleCuda, ACallWhileAnotherThreadIsInsideIsRefusedNamingIt) {
  if (!at_level(MPI_THREAD_MULTIPLE, MPI_THREAD_MULTIPLE)) GTEST_SKIP() << "needs MPI_THREAD_MULTIPLE";
  if (world().size < 2) GTEST_SKIP() << "one rank: no call waits for a peer, so none can be held inside";
  Place place;
  std::string why;
  if (!cuda_place(&place, &why)) GTEST_SKIP() << why;
  held_call_is_refused(place);
}

TEST(ThreadsMultipleCuda, OneGroupsCallsFromThreadAfterThread) {
  if (!at_level(MPI_THREAD_MULTIPLE, MPI_THREAD_MULTIPLE)) GTEST_SKIP() << "needs MPI_THREAD_MULTIPLE";
  Place place;
  std::string why;
  if (!cuda_place(&place, &why)) GTEST_SKIP() << why;
  calls_from_thread_after_thread(place);
}
#else
TEST(ThreadsMultipleCuda, NeedsTheCudaBuild) { GTEST_SKIP() << "this build has no CUDA"; }
#endif

// ------------------------------------------------------------------------------------- MPI_THREAD_SERIALIZED

// Rank 0's second thread calls into group 2 while its first is inside a dispatch on group 1: at this level two
// threads may not be in MPI at once, so the call is refused before any MPI call; a query that does not communicate
// answers. Rank 0's second thread may not call MPI while the first is inside it, so it tells the other ranks to join
// group 1's dispatch through a word of node-shared memory (MPI_Win_allocate_shared, made before; plain loads and
// stores, no MPI call): the ranks must share one node.
TEST(ThreadsSerialized, ACallOverMpiWhileAnotherGroupsCallIsInsideIsRefused) {
  if (!at_level(MPI_THREAD_SERIALIZED, MPI_THREAD_SERIALIZED)) GTEST_SKIP() << "needs MPI_THREAD_SERIALIZED";
  const World w = world();
  if (w.size < 2) GTEST_SKIP() << "one rank: no call waits for a peer, so none can be held inside";
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int node_size = 0;
  MPI_Comm_size(node, &node_size);
  if (node_size != w.size) {
    MPI_Comm_free(&node);
    GTEST_SKIP() << "the ranks span several nodes: no shared word to signal through";
  }
  // Rank 0 (rank 0 of `node` too: the split keeps the order) owns the word; the others find it.
  int* go = nullptr;
  MPI_Win win;
  MPI_Win_allocate_shared(w.rank == 0 ? static_cast<MPI_Aint>(sizeof(int)) : 0, sizeof(int), MPI_INFO_NULL, node, &go,
                          &win);
  if (w.rank != 0) {
    MPI_Aint bytes = 0;
    int unit = 0;
    MPI_Win_shared_query(win, 0, &bytes, &unit, &go);
  } else {
    __atomic_store_n(go, 0, __ATOMIC_RELEASE);
  }
  const Shape s{2, 8};
  const int E = s.experts_per_rank * w.size;
  bitepGroup_t g1 = nullptr, g2 = nullptr;
  ASSERT_EQ(make_group(MPI_COMM_WORLD, s, &g1), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(make_group(MPI_COMM_WORLD, s, &g2), bitepSuccess) << bitepGetLastError();
  MPI_Barrier(MPI_COMM_WORLD);  // the word is 0 before anyone looks
  std::string inside_result = "not run";
  if (w.rank == 0) {
    std::thread inside([&] { inside_result = round_trip(g1, w.rank, 10, s, E, 5); });
    wait_until_inside(g1, "bitepDispatch");
    const Tokens tk = make_tokens(w.rank, 3, E, s.hidden, 6);
    bitepHandle_t h = nullptr;
    EXPECT_TRUE(refused(dispatch(g2, tk, &h),
                        {"bitepDispatch makes MPI calls", "another thread is inside a bitep call over MPI",
                         "MPI_THREAD_SERIALIZED", "MPI_THREAD_MULTIPLE"}));
    EXPECT_EQ(g2->in_call.load(), nullptr) << "the refused call still holds group 2";
    size_t bytes = 0;
    EXPECT_EQ(bitepGroupMemoryBytes(g2, &bytes), bitepSuccess) << bitepGetLastError();
    __atomic_store_n(go, 1, __ATOMIC_RELEASE);
    inside.join();
  } else {
    while (__atomic_load_n(go, __ATOMIC_ACQUIRE) == 0) std::this_thread::yield();
    inside_result = round_trip(g1, w.rank, 10, s, E, 5);
  }
  EXPECT_EQ(inside_result, "");
  // One after another, both groups work.
  EXPECT_EQ(round_trip(g2, w.rank, 6, s, E, 7), "");
  EXPECT_EQ(round_trip(g1, w.rank, 6, s, E, 8), "");
  EXPECT_EQ(bitepGroupDestroy(g2), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(bitepGroupDestroy(g1), bitepSuccess) << bitepGetLastError();
  MPI_Win_free(&win);
  MPI_Comm_free(&node);
}

// ------------------------------------------------------------------------- MPI_THREAD_SINGLE and _FUNNELED

// Another thread than MPI's main one: group creation, dispatch and group destroy are refused before any MPI call (on
// every rank alike, so no rank waits for another); a query that makes no MPI call answers; on the main thread the
// same group works.
TEST(ThreadsBelowSerialized, OnlyTheMainThreadMakesMpiCalls) {
  if (!at_level(MPI_THREAD_SINGLE, MPI_THREAD_FUNNELED)) GTEST_SKIP() << "needs MPI_THREAD_SINGLE or _FUNNELED";
  const World w = world();
  const Shape s{2, 8};
  const int E = s.experts_per_rank * w.size;
  bitepGroup_t other = reinterpret_cast<bitepGroup_t>(0x1);
  bitepResult_t created = bitepSuccess;
  std::string created_detail;
  std::thread([&] {
    created = make_group(MPI_COMM_WORLD, s, &other);
    created_detail = bitepGetLastError();
  }).join();
  EXPECT_EQ(created, bitepInvalidUsage) << created_detail;
  EXPECT_NE(created_detail.find("bitepGroupCreateMpi makes MPI calls on the calling thread"), std::string::npos)
      << created_detail;
  EXPECT_EQ(other, nullptr);
  bitepGroup_t g = nullptr;
  ASSERT_EQ(make_group(MPI_COMM_WORLD, s, &g), bitepSuccess) << bitepGetLastError();
  const Tokens tk = make_tokens(w.rank, 9, E, s.hidden, 10);
  std::thread([&] {
    bitepHandle_t h = nullptr;
    EXPECT_TRUE(refused(dispatch(g, tk, &h), {"bitepDispatch makes MPI calls on the calling thread",
                                              "only the thread that initialised MPI", "MPI_Init_thread"}));
    EXPECT_TRUE(refused(bitepGroupDestroy(g), {"bitepGroupDestroy makes MPI calls"}));
    size_t bytes = 0;
    EXPECT_EQ(bitepGroupMemoryBytes(g, &bytes), bitepSuccess) << bitepGetLastError();
  }).join();
  EXPECT_EQ(g->in_call.load(), nullptr) << "a refused call still holds the group";
  EXPECT_EQ(round_trip(g, w.rank, 9, s, E, 10), "");
  EXPECT_EQ(bitepGroupDestroy(g), bitepSuccess) << bitepGetLastError();
}

}  // namespace
