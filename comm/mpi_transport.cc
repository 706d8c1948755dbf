// SPDX-License-Identifier: Apache-2.0
// MPI transport of the host backend. Nonblocking point-to-point MPI calls polled with MPI_Testsome until done or
// until the timeout: a failed or stalled peer gives bitepTimeout naming the peers that did not answer, never a
// hang. After a timeout the transport is broken (every later call fails): receives are cancelled, and the
// memory MPI may still touch (our scratch buffers; the group's pool) is never freed.
#include "comm/mpi_transport.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "src/check.h"
#include "src/env.h"

namespace bitep::ep {
namespace {

// bitep calls over MPI in progress in this process, counted below MPI_THREAD_MULTIPLE (MpiThreadHold).
std::atomic<int> g_mpi_calls{0};

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    default:
      return "MPI_THREAD_MULTIPLE";
  }
}

// One MPI message carries at most INT_MAX bytes: an all-to-all-v entry goes in messages of 1 GiB (a test hook,
// BITEP_MPI_CHUNK_BYTES, makes them smaller so that a test sees an entry in many).
constexpr int kChunkBytes = 1 << 30;

class MpiTransport final : public Transport {
 public:
  MpiTransport(MPI_Comm comm, double timeout_s)
      : comm_(comm),
        timeout_s_(timeout_s),
        chunk_bytes_(env_int("BITEP_MPI_CHUNK_BYTES", 1, kChunkBytes, kChunkBytes)) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &nranks_);
  }

  ~MpiTransport() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized || abandoned_) {
      // After a timeout MPI may still own requests on these buffers and this communicator: leave them.
      new std::vector<char>(std::move(coll_in_));
      new std::vector<char>(std::move(coll_out_));
      return;
    }
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int nranks() const override { return nranks_; }
  bitepResult_t enter_call(const char* call, bool teardown) override { return hold_.enter(call, teardown); }
  void leave_call() override { hold_.leave(); }

  bitepResult_t allgather_host(const void* in, void* out, size_t bytes) override {
    BITEP_CHECK(check_usable("allgather_host"));
    BITEP_ARG_CHECK(bytes <= INT_MAX, "internal: allgather_host of %zu bytes", bytes);
    coll_in_.assign(static_cast<const char*>(in), static_cast<const char*>(in) + bytes);
    BITEP_CHECK(exchange_blocks(bytes, 0, kSlotAllgather, timeout_s_, "an allgather (argument agreement)"));
    std::memcpy(out, coll_out_.data(), coll_out_.size());
    return bitepSuccess;
  }

  bitepResult_t exchange_counts(
      const int32_t* send, int32_t* recv, int32_t* recv_host, int n, bitepStream_t, double timeout_s) override {
    BITEP_CHECK(check_usable("exchange_counts"));
    const size_t row = sizeof(int32_t) * static_cast<size_t>(n), bytes = row * nranks_;
    BITEP_ARG_CHECK(row <= INT_MAX, "internal: exchange_counts of %d int32 per rank", n);
    coll_in_.assign(reinterpret_cast<const char*>(send), reinterpret_cast<const char*>(send) + bytes);
    BITEP_CHECK(exchange_blocks(row, row, kSlotCounts, timeout_s, "the count exchange"));
    std::memcpy(recv, coll_out_.data(), bytes);
    std::memcpy(recv_host, coll_out_.data(), bytes);
    return bitepSuccess;
  }

  bitepResult_t alltoallv(const std::vector<std::vector<PeerBuffers>>& per_peer,
                          bitepStream_t,
                          double timeout_s) override {
    BITEP_CHECK(check_usable("alltoallv"));
    BITEP_ARG_CHECK(static_cast<int>(per_peer.size()) == nranks_, "internal: alltoallv with %zu peers, expected %d",
                    per_peer.size(), nranks_);
    size_t entries = 0;
    for (const auto& list : per_peer) entries = std::max(entries, list.size());
    BITEP_ARG_CHECK(entries <= kSlots - kSlotRows, "internal: alltoallv of %zu buffers per peer (at most %d)", entries,
                    kSlots - kSlotRows);
    // Entry i of a peer travels with slot kSlotRows + i of this operation's tags, its chunks in order (MPI keeps
    // the order of one sender's messages of one tag).
    const int tag = next_tag(kSlotRows);
    return run(
        [&](Requests* q) -> bitepResult_t {
          for (int pass = 0; pass < 2; ++pass)  // receives first, then sends
            for (int p = 0; p < nranks_; ++p) {
              if (p == rank_) continue;
              for (size_t i = 0; i < per_peer[p].size(); ++i) {
                const PeerBuffers& b = per_peer[p][i];
                const uint64_t total = pass == 0 ? b.recv_bytes : b.send_bytes;
                char* base = pass == 0 ? static_cast<char*>(b.recv) : static_cast<char*>(const_cast<void*>(b.send));
                for (uint64_t off = 0; off < total; off += chunk_bytes_)
                  BITEP_CHECK(post(q, pass == 0, base + off,
                                   static_cast<int>(std::min<uint64_t>(total - off, chunk_bytes_)), p,
                                   tag + static_cast<int>(i)));
              }
            }
          return bitepSuccess;
        },
        timeout_s, "the all-to-all-v");
  }

 private:
  // The transport's operations are point-to-point messages, each operation's tagged with its sequence number and
  // its kind (never MPI's collectives). Ranks out of step (one failed a call alone; one abandoned an operation at
  // its timeout and MPI still holds its sends) then fail, never abort the job: an operation pairs with no peer's of
  // another kind or number, so it waits for its own and times out naming the peers; one that meets a peer's of its
  // kind and number but another size fails on the size (MPI's truncation, returned through the duplicate's
  // MPI_ERRORS_RETURN, or wait()'s check of each message's bytes). The numbers matter less than the kinds: a rank
  // that abandons an operation makes no other, so a peer that skipped one can still meet it, as a collective would.
  // Collectives would pair different operations: an MPI_Iallgather that met a peer's abandoned MPI_Ialltoall
  // failed with MPI_ERR_TRUNCATE, and Open MPI 4 raised it on MPI_COMM_WORLD, whose handler aborts the job, not on
  // this duplicate's MPI_ERRORS_RETURN (seen on one H100, Open MPI 4.1.6: bitepGroupDestroy's window release after
  // a peer's count exchange timed out). A tag is seq * kSlots + slot, below 32768 (the least MPI_TAG_UB MPI allows).
  static constexpr int kSlots = 16, kSeqs = 2048;
  static constexpr int kSlotAllgather = 0, kSlotCounts = 1, kSlotRows = 2;
  static_assert(kSlots * kSeqs <= 32768, "tags must stay within the least MPI_TAG_UB");

  struct Pending {
    int peer;
    bool recv;
    int len;  // the bytes posted
  };
  struct Requests {
    std::vector<MPI_Request> reqs;
    std::vector<Pending> what;  // what[i]: request i's peer and direction
  };

  int next_tag(int slot) {
    const int tag = static_cast<int>(seq_ % kSeqs) * kSlots + slot;
    ++seq_;
    return tag;
  }

  // One operation: post_all(q) posts its messages (post()), then they are waited for. Every way out that may leave
  // a request posted (an MPI error, the timeout, a message of another size, an exception such as std::bad_alloc)
  // abandons them: MPI may then still use the buffers, which the transport never frees again.
  template <typename PostAll>
  bitepResult_t run(PostAll&& post_all, double timeout_s, const char* op) {
    Requests q;
    try {
      bitepResult_t r = post_all(&q);
      if (r == bitepSuccess) r = wait(&q, timeout_s, op);
      if (r != bitepSuccess) abandon(&q);
      return r;
    } catch (...) {
      abandon(&q);
      throw;
    }
  }

  // The allgather and the count exchange: each rank sends peer p `block` bytes of coll_in_ from send_stride * p (0:
  // the same bytes to every peer), and coll_out_ (W blocks) gets rank q's at block * q, this rank's own included.
  bitepResult_t exchange_blocks(size_t block, size_t send_stride, int slot, double timeout_s, const char* op) {
    coll_out_.assign(block * nranks_, 0);
    if (block > 0) std::memcpy(coll_out_.data() + block * rank_, coll_in_.data() + send_stride * rank_, block);
    const int tag = next_tag(slot);
    return run(
        [&](Requests* q) -> bitepResult_t {
          for (int pass = 0; pass < 2; ++pass)  // receives first, then sends
            for (int p = 0; p < nranks_; ++p)
              if (p != rank_)
                BITEP_CHECK(post(q, pass == 0,
                                 pass == 0 ? coll_out_.data() + block * p : coll_in_.data() + send_stride * p,
                                 static_cast<int>(block), p, tag));
          return bitepSuccess;
        },
        timeout_s, op);
  }

  // Posts one receive (recv) or send of len bytes at buf with peer p (room first: no request goes unrecorded).
  bitepResult_t post(Requests* q, bool recv, void* buf, int len, int p, int tag) {
    q->reqs.reserve(q->reqs.size() + 1);
    q->what.reserve(q->what.size() + 1);
    MPI_Request req = MPI_REQUEST_NULL;
    const int err =
        recv ? MPI_Irecv(buf, len, MPI_BYTE, p, tag, comm_, &req) : MPI_Isend(buf, len, MPI_BYTE, p, tag, comm_, &req);
    if (err != MPI_SUCCESS) return mpi_error(err, recv ? "MPI_Irecv" : "MPI_Isend", __FILE__, __LINE__);
    q->reqs.push_back(req);
    q->what.push_back({p, recv, len});
    return bitepSuccess;
  }

  bitepResult_t check_usable(const char* op) {
    if (abandoned_)
      BITEP_FAIL(bitepInvalidUsage, "MPI transport: %s after an earlier failure (%s)", op,
                 broken_.empty() ? "an operation was abandoned" : broken_.c_str());
    return bitepSuccess;
  }

  // Cancels the receives and lets MPI keep the rest; the transport is broken from now on (its buffers stay).
  void abandon(Requests* q) noexcept {
    abandoned_ = true;
    for (size_t i = 0; i < q->reqs.size(); ++i) {
      MPI_Request& r = q->reqs[i];
      if (r == MPI_REQUEST_NULL) continue;
      if (q->what[i].recv) MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
  }

  // What broke the transport, for the refusals after it (no memory for the text: the generic one).
  void note_broken(const char* why) noexcept {
    try {
      if (broken_.empty()) broken_ = why;
    } catch (...) {
    }
  }

  // Polls until every request is done, or fails with bitepTimeout after timeout_s naming the peers not heard from
  // (run() then abandons what is left).
  bitepResult_t wait(Requests* q, double timeout_s, const char* op) {
    std::vector<MPI_Request>& reqs = q->reqs;
    if (reqs.empty()) return bitepSuccess;
    const auto start = std::chrono::steady_clock::now();
    std::vector<int> done(reqs.size());
    std::vector<MPI_Status> statuses(reqs.size());
    for (long spin = 0;; ++spin) {
      int outcount = 0;
      const int err = MPI_Testsome(static_cast<int>(reqs.size()), reqs.data(), &outcount, done.data(), statuses.data());
      if (err != MPI_SUCCESS) {
        // MPI_ERR_IN_STATUS: the failed request's status has the error (a message longer than its receive: a peer
        // made another operation of this one's tag).
        int code = err, peer = -1;
        for (int i = 0; err == MPI_ERR_IN_STATUS && i < outcount && i < static_cast<int>(done.size()); ++i)
          if (statuses[i].MPI_ERROR != MPI_SUCCESS) {
            code = statuses[i].MPI_ERROR;
            peer = q->what[done[i]].peer;
            break;
          }
        note_broken("an MPI error");
        char text[MPI_MAX_ERROR_STRING];
        int len = 0;
        if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) std::snprintf(text, sizeof(text), "MPI error %d", code);
        BITEP_FAIL(bitepMpiError, "rank %d: %s failed in MPI_Testsome%s%s: %s%s", rank_, op,
                   peer >= 0 ? ", with rank " : "", peer >= 0 ? std::to_string(peer).c_str() : "", text,
                   code == MPI_ERR_TRUNCATE ? " (a peer made a different call: destroy the group)" : "");
      }
      if (outcount == MPI_UNDEFINED) return bitepSuccess;  // no active request left
      // A shorter message than its receive is no MPI error: a peer that made another operation of this one's tag
      // (ranks out of step by a multiple of the sequences, or a different size of one call) would leave rows unset.
      for (int k = 0; k < outcount; ++k) {
        const Pending& w = q->what[done[k]];
        int got = 0;
        if (!w.recv || MPI_Get_count(&statuses[k], MPI_BYTE, &got) != MPI_SUCCESS || got == w.len) continue;
        note_broken("a peer's message of another size");
        BITEP_FAIL(bitepInvalidUsage,
                   "rank %d: %s: rank %d sent %d bytes where this rank expected %d: the ranks made different calls on "
                   "this group (destroy it)",
                   rank_, op, w.peer, got, w.len);
      }
      if (outcount > 0) spin = 0;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (elapsed > timeout_s) {
        std::string peers;
        std::vector<char> named(nranks_, 0);
        for (size_t i = 0; i < reqs.size(); ++i) {
          if (reqs[i] == MPI_REQUEST_NULL || named[q->what[i].peer]) continue;
          named[q->what[i].peer] = 1;
          peers += (peers.empty() ? "" : ", ") + std::to_string(q->what[i].peer);
        }
        char text[512];
        std::snprintf(text, sizeof(text), "rank %d: %s did not complete within %g s; waiting on: %s", rank_, op,
                      timeout_s, peers.c_str());
        note_broken(text);
        BITEP_FAIL(bitepTimeout, "%s (a peer failed, stalled, or did not make the same collective call)", text);
      }
      // Progress needs our calls into MPI; between them, leave the core to the other ranks.
      if (spin < 64) continue;
      if (spin < 4096) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
  }

  MPI_Comm comm_;
  double timeout_s_;
  uint64_t chunk_bytes_;  // an all-to-all-v entry's bytes per message
  int rank_ = 0, nranks_ = 1;
  bool abandoned_ = false;                // an operation's requests were left to MPI: every later operation is refused
  std::string broken_;                    // what happened then
  uint64_t seq_ = 0;                      // operations posted (next_tag)
  std::vector<char> coll_in_, coll_out_;  // buffers of the collectives (leaked if one is abandoned)
  MpiThreadHold hold_;                    // the call in progress on the group (enter_call)
};

}  // namespace

bitepResult_t MpiThreadHold::enter(const char* call, bool teardown) {
  leave();
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    if (teardown) return bitepSuccess;  // the transport's destructor makes no MPI call then
    BITEP_FAIL(bitepInvalidUsage, "%s makes MPI calls, but MPI is %s", call,
               finalized ? "finalized" : "not initialised");
  }
  int level = MPI_THREAD_SINGLE;
  MPI_Query_thread(&level);
  if (level >= MPI_THREAD_MULTIPLE) return bitepSuccess;
  if (level < MPI_THREAD_SERIALIZED) {
    int main_thread = 0;
    MPI_Is_thread_main(&main_thread);
    if (!main_thread)
      BITEP_FAIL(bitepInvalidUsage,
                 "%s makes MPI calls on the calling thread, and MPI's thread level is %s: only the thread that "
                 "initialised MPI may make them. Call it from that thread, or initialise MPI with MPI_Init_thread "
                 "at MPI_THREAD_SERIALIZED (one thread at a time) or MPI_THREAD_MULTIPLE",
                 call, thread_level_name(level));
  }
  if (g_mpi_calls.fetch_add(1, std::memory_order_acq_rel) != 0) {
    g_mpi_calls.fetch_sub(1, std::memory_order_acq_rel);
    BITEP_FAIL(bitepInvalidUsage,
               "%s makes MPI calls, and another thread is inside a bitep call over MPI (on another group) while "
               "MPI's thread level is %s: one thread at a time. Make the calls one after another, or initialise "
               "MPI with MPI_Init_thread at MPI_THREAD_MULTIPLE",
               call, thread_level_name(level));
  }
  counted_ = true;
  return bitepSuccess;
}

void MpiThreadHold::leave() {
  if (counted_) g_mpi_calls.fetch_sub(1, std::memory_order_acq_rel);
  counted_ = false;
}

std::unique_ptr<Transport> make_mpi_transport(MPI_Comm comm, double timeout_s) {
  return std::make_unique<MpiTransport>(comm, timeout_s);
}

bitepResult_t node_local_rank(Transport* t, int* local_rank) {
  struct Name {
    char text[MPI_MAX_PROCESSOR_NAME + 1];
  };
  Name mine{};
  int len = 0;
  BITEP_MPI_CHECK(MPI_Get_processor_name(mine.text, &len));
  std::vector<Name> all(t->nranks());
  BITEP_CHECK(t->allgather_host(&mine, all.data(), sizeof(Name)));
  int local = 0;
  for (int q = 0; q < t->rank(); ++q) local += std::memcmp(all[q].text, mine.text, sizeof(Name)) == 0 ? 1 : 0;
  *local_rank = local;
  return bitepSuccess;
}

}  // namespace bitep::ep
