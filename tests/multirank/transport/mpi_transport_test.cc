// SPDX-License-Identifier: Apache-2.0
// The MPI transport on its own (comm/mpi_transport.cc), under mpirun: every rank's bytes where they belong through many
// operations (past the tags' sequence wrap); ranks out of step fail with bitepTimeout naming the peer, never aborting
// the job; an operation of another size on a peer is refused on every rank, not taken as short rows; the node-local
// rank through it.
#include "comm/mpi_transport.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "tests/multirank/ep_world.h"

namespace bitep::ep {
namespace {

using ept::world_rank;
using ept::world_size;

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// A transport over a duplicate of MPI_COMM_WORLD, as bitepGroupCreateMpi makes it.
std::unique_ptr<Transport> make_transport(double timeout_s) {
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &dup);
  MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
  return make_mpi_transport(dup, timeout_s);
}

// The byte that rank `from` sends rank `to` at offset i of entry e in round r.
uint8_t pattern(int r, int from, int to, int e, size_t i) {
  return static_cast<uint8_t>(r * 131 + from * 29 + to * 7 + e * 53 + i * 3 + 1);
}

// One all-to-all-v of three entries a peer, of sizes from 1 to max_bytes that depend on both ranks and the round
// (entry 1 empty), each byte checked where it lands.
void check_alltoallv(Transport* t, int r, int max_bytes) {
  const int W = world_size(), self = world_rank();
  auto size_of = [&](int from, int to, int e) -> size_t {
    return e == 1 ? 0 : 1 + (from * 5 + to * 3 + e + r) % max_bytes;
  };
  std::vector<std::vector<PeerBuffers>> per_peer(W);
  std::vector<std::vector<uint8_t>> sends, recvs;
  sends.reserve(3 * W);
  recvs.reserve(3 * W);
  for (int p = 0; p < W; ++p) {
    if (p == self) continue;
    for (int e = 0; e < 3; ++e) {
      sends.emplace_back(size_of(self, p, e));
      for (size_t i = 0; i < sends.back().size(); ++i) sends.back()[i] = pattern(r, self, p, e, i);
      recvs.emplace_back(size_of(p, self, e), 0);
      per_peer[p].push_back({sends.back().data(), sends.back().size(), recvs.back().data(), recvs.back().size()});
    }
  }
  ASSERT_EQ(t->alltoallv(per_peer, nullptr, 60.0), bitepSuccess) << bitepGetLastError();
  for (int p = 0, k = 0; p < W; ++p) {
    if (p == self) continue;
    for (int e = 0; e < 3; ++e, ++k)
      for (size_t i = 0; i < recvs[k].size(); ++i)
        ASSERT_EQ(recvs[k][i], pattern(r, p, self, e, i)) << "round " << r << ", from rank " << p << ", entry " << e;
  }
}

TEST(MpiTransport, EveryRanksBytesWhereTheyBelong) {
  const int W = world_size(), self = world_rank();
  std::unique_ptr<Transport> t = make_transport(60.0);
  ASSERT_EQ(t->rank(), self);
  ASSERT_EQ(t->nranks(), W);
  for (int r = 0; r < 3; ++r) {
    // Allgather: 5 + r bytes from each rank.
    const size_t bytes = 5 + r;
    std::vector<uint8_t> in(bytes), out(bytes * W, 0);
    for (size_t i = 0; i < bytes; ++i) in[i] = pattern(r, self, 0, 0, i);
    ASSERT_EQ(t->allgather_host(in.data(), out.data(), bytes), bitepSuccess) << bitepGetLastError();
    for (int q = 0; q < W; ++q)
      for (size_t i = 0; i < bytes; ++i)
        ASSERT_EQ(out[q * bytes + i], pattern(r, q, 0, 0, i)) << "round " << r << ", from rank " << q << ", byte " << i;
    // Count exchange: n int32 to each rank, row q of the result from rank q.
    const int n = 3;
    std::vector<int32_t> send(static_cast<size_t>(W) * n), recv(send.size(), -1), recv_host(send.size(), -1);
    for (int q = 0; q < W; ++q)
      for (int j = 0; j < n; ++j) send[q * n + j] = 100000 * r + 1000 * self + 10 * q + j;
    ASSERT_EQ(t->exchange_counts(send.data(), recv.data(), recv_host.data(), n, nullptr, 60.0), bitepSuccess)
        << bitepGetLastError();
    for (int q = 0; q < W; ++q)
      for (int j = 0; j < n; ++j) {
        ASSERT_EQ(recv_host[q * n + j], 100000 * r + 1000 * q + 10 * self + j) << "round " << r << ", from rank " << q;
        ASSERT_EQ(recv[q * n + j], recv_host[q * n + j]);
      }
    // All-to-all-v: three entries a peer, of sizes that depend on both ranks (an empty one among them).
    ASSERT_NO_FATAL_FAILURE(check_alltoallv(t.get(), r, 9));
  }
  // Past the tags' sequence wrap (2048 operations): every allgather still pairs with its own.
  for (int r = 0; r < 2100; ++r) {
    const int32_t mine = r * W + self;
    std::vector<int32_t> all(W, -1);
    ASSERT_EQ(t->allgather_host(&mine, all.data(), sizeof(mine)), bitepSuccess) << bitepGetLastError();
    for (int q = 0; q < W; ++q) ASSERT_EQ(all[q], r * W + q) << "operation " << r;
  }
}

// An entry larger than the transport's message goes in several messages of one tag, which MPI keeps in order:
// BITEP_MPI_CHUNK_BYTES=3 (a test hook; the chunks are 1 GiB) splits entries of up to 40 bytes into up to 14.
TEST(MpiTransport, EntriesInChunksKeepTheirOrder) {
  setenv("BITEP_MPI_CHUNK_BYTES", "3", 1);
  std::unique_ptr<Transport> t = make_transport(60.0);
  unsetenv("BITEP_MPI_CHUNK_BYTES");
  for (int r = 0; r < 4; ++r) ASSERT_NO_FATAL_FAILURE(check_alltoallv(t.get(), r, 40));
}

// Every rank but 0 makes a count exchange alone and times out (MPI keeps its sends); then rank 0 makes an allgather.
// Rank 0 must time out naming rank 1; with MPI's nonblocking collectives the two met, and Open MPI 4 raised the
// MPI_ERR_TRUNCATE on MPI_COMM_WORLD, ending the job. Then each transport refuses every operation.
TEST(MpiTransport, RanksOutOfStepTimeOutNamingThePeer) {
  const int W = world_size(), self = world_rank();
  if (W < 2) GTEST_SKIP() << "needs 2 ranks";
  const double timeout = 0.5;
  std::unique_ptr<Transport> t = make_transport(timeout);
  std::vector<int32_t> send(4 * W, 1), recv(4 * W), recv_host(4 * W);
  if (self != 0) {
    EXPECT_EQ(t->exchange_counts(send.data(), recv.data(), recv_host.data(), 4, nullptr, timeout), bitepTimeout);
    EXPECT_TRUE(has(bitepGetLastError(), "the count exchange did not complete")) << bitepGetLastError();
    EXPECT_TRUE(has(bitepGetLastError(), "waiting on: 0")) << bitepGetLastError();
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (self == 0) {
    const int32_t mine = 7;
    std::vector<int32_t> all(W);
    EXPECT_EQ(t->allgather_host(&mine, all.data(), sizeof(mine)), bitepTimeout);
    EXPECT_TRUE(has(bitepGetLastError(), "waiting on: 1")) << bitepGetLastError();
  }
  EXPECT_EQ(t->exchange_counts(send.data(), recv.data(), recv_host.data(), 4, nullptr, timeout), bitepInvalidUsage);
  EXPECT_TRUE(has(bitepGetLastError(), "after an earlier failure")) << bitepGetLastError();
  MPI_Barrier(MPI_COMM_WORLD);
}

// Rank 0 allgathers 4 bytes where its peers allgather 8: rank 0's receives are too short for its peers' messages (MPI's
// truncation, through the duplicate's MPI_ERRORS_RETURN), and the peers' receive 4 bytes where they posted 8 (no MPI
// error: the transport checks each message's size). Every rank fails naming a peer, none takes the short rows.
TEST(MpiTransport, AnOperationOfAnotherSizeIsRefusedOnEveryRank) {
  const int W = world_size(), self = world_rank();
  if (W < 2) GTEST_SKIP() << "needs 2 ranks";
  std::unique_ptr<Transport> t = make_transport(30.0);
  const size_t bytes = self == 0 ? 4 : 8;
  std::vector<uint8_t> in(bytes, static_cast<uint8_t>(self)), out(bytes * W);
  const bitepResult_t r = t->allgather_host(in.data(), out.data(), bytes);
  const std::string err = bitepGetLastError();
  if (self == 0) {
    EXPECT_EQ(r, bitepMpiError) << err;
    EXPECT_TRUE(has(err, "different call")) << err;
  } else {
    EXPECT_EQ(r, bitepInvalidUsage) << err;
    EXPECT_TRUE(has(err, "rank 0 sent 4 bytes where this rank expected 8")) << err;
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// The node-local rank (the cuda backend's default device): the ranks' processor names by MPI_Allgather, counted
// here, against node_local_rank's through the transport. mpirun on one machine: every rank's own rank.
TEST(MpiTransport, NodeLocalRank) {
  const int W = world_size(), self = world_rank();
  std::unique_ptr<Transport> t = make_transport(60.0);
  int local = -1;
  ASSERT_EQ(node_local_rank(t.get(), &local), bitepSuccess) << bitepGetLastError();
  std::vector<char> names(static_cast<size_t>(W) * (MPI_MAX_PROCESSOR_NAME + 1), 0);
  char* mine = names.data() + static_cast<size_t>(self) * (MPI_MAX_PROCESSOR_NAME + 1);
  int len = 0;
  MPI_Get_processor_name(mine, &len);
  MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, names.data(), MPI_MAX_PROCESSOR_NAME + 1, MPI_CHAR, MPI_COMM_WORLD);
  int expected = 0;
  for (int q = 0; q < self; ++q)
    expected += std::string(names.data() + static_cast<size_t>(q) * (MPI_MAX_PROCESSOR_NAME + 1)) == mine ? 1 : 0;
  EXPECT_EQ(local, expected) << "processor " << mine;
  // The transport goes on after it (its allgather was one operation like the others).
  const int32_t v = self;
  std::vector<int32_t> all(W, -1);
  ASSERT_EQ(t->allgather_host(&v, all.data(), sizeof(v)), bitepSuccess) << bitepGetLastError();
  for (int q = 0; q < W; ++q) EXPECT_EQ(all[q], q);
}

}  // namespace
}  // namespace bitep::ep
