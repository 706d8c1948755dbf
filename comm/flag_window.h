// SPDX-License-Identifier: Apache-2.0
// The peer window's flags, barriers, count exchange and bookkeeping (src/ep/transport.h's PeerWindow),
// whatever maps the ranks' buffers into this process: NCCL's symmetric memory (comm/nccl_window.cu) or
// CUDA IPC handles between processes on one node (comm/mpi_ipc_transport.cc). A subclass only allocates,
// shares and frees the buffers (map / unmap).
//
// Layout of a rank's buffer: [kFlagBytes: one uint64 flag per rank (W <= kFlagBytes / 8)][two exchange
// slots of kExchangeBytes][kChunkFlagBytes: the dispatch's arrival flags, [W][max_chunks()] uint64][data area].
// barrier(): epoch e = the number of barriers so far on this window, the same on every rank, counted on the
// device (epoch_word(): the kernel reads it, adds one and stores it back after its wait, so barriers replayed
// by a CUDA graph count too). Thread p stores e to flag[self] of rank p's window (release, system scope), then
// waits until flag[p] of its own window reaches e (acquire). Flags only grow, so a peer already one barrier
// ahead satisfies the wait. The window's users order its barriers (acquire() / release(), or one stream).
// exchange() is a barrier that first stores this rank's rows into slot (x % 2) of every peer, x = the
// number of exchanges so far: a peer can be one exchange ahead (storing into the other slot), never two,
// since it cannot pass exchange x + 1 before this rank has entered it, after reading slot x % 2 (the
// host waits for each exchange's result before it issues the next).
// A peer missing for timeout_s ends the wait and raises a mapped host word that check() reports; the
// stream moves on instead of hanging (the data of that call is then incomplete, and the call after it
// fails).
//
// A window is replaced (never resized in place) when a call needs more: the device is synchronised, the
// old buffers unmapped and freed, the new one zeroed before any peer can address it (map() is collective).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "src/ep/pool.h"
#include "src/ep/transport.h"

namespace bitep::ep {

class FlagWindow : public PeerWindow {
 public:
  static constexpr size_t kFlagBytes = 4096;                   // up to 512 ranks
  static constexpr size_t kExchangeBytes = size_t{256} << 10;  // per slot: W * n int32 (W = 64: n <= 1024)
  static constexpr size_t kChunkFlagBytes = size_t{64} << 10;  // W * max_chunks() uint64
  static constexpr int kMaxChunks = 64;                        // per sender, at most
  static constexpr size_t kChunkFlagOffset = kFlagBytes + 2 * kExchangeBytes;
  static constexpr size_t kHeaderBytes = kChunkFlagOffset + kChunkFlagBytes;
  static constexpr size_t kGranularity = size_t{2} << 20;
  static constexpr size_t kInitialBytes = size_t{4} << 20;

  // fixed_bytes > 0: a data area of that size, never replaced (reserve() beyond it fails).
  FlagWindow(int rank, int nranks, size_t fixed_bytes);
  ~FlagWindow() override;  // a subclass unmaps in its own destructor (unmap() is its)
  FlagWindow(const FlagWindow&) = delete;
  FlagWindow& operator=(const FlagWindow&) = delete;

  // The mapped host word of the timeouts and the device table of the buffers.
  bitepResult_t init();
  // The count exchange through the window (on every rank alike, or on none).
  void set_exchange(bool on) { exchange_on_ = on; }

  bitepResult_t acquire(bitepStream_t stream) override { return order_.acquire(stream); }
  bitepResult_t release(bitepStream_t stream) override { return order_.release(stream); }
  size_t bytes() const override { return data_bytes_ + (mapped_ ? kHeaderBytes : 0); }
  bitepResult_t reserve(size_t bytes, double timeout_s) override;
  char* data(int r) const override { return bases_[r] + kHeaderBytes; }
  int max_chunks() const override;
  uint64_t* chunk_flags(int r) const override { return reinterpret_cast<uint64_t*>(bases_[r] + kChunkFlagOffset); }
  volatile int* timeout_word() const override { return timed_out_dev_; }
  const uint64_t* epoch_word() const override { return epoch_dev_; }
  bitepResult_t barrier(bitepStream_t stream, double timeout_s) override;
  uint64_t exchanges() const override { return exchanges_; }
  bool can_exchange(int n) const override;
  bitepResult_t exchange(
      const int32_t* send, int32_t* recv, int32_t* recv_mapped, int n, bitepStream_t stream, double timeout_s) override;
  bitepResult_t check() override;

 protected:
  // Collective: this rank's buffer of `bytes` (header and data), zeroed before any peer can address it, and
  // bases[r] = rank r's buffer as this process addresses it, for every r. `bases_dev` is a device array of
  // nranks pointers the subclass may use as scratch (its contents are rewritten from bases afterwards).
  virtual bitepResult_t map(size_t bytes, double timeout_s, char** bases_dev, std::vector<char*>* bases) = 0;
  // Collective: undoes map() (nothing mapped: nothing to do).
  virtual void unmap() = 0;
  // The subclass's destructor and reserve(): unmap() once, then nothing is mapped.
  void unmap_all();
  double timeout_s() const { return timeout_s_; }
  int rank_, nranks_;

 private:
  int threads() const { return nranks_ < 1024 ? (nranks_ + 31) / 32 * 32 : 1024; }

  bool exchange_on_ = true;  // the count exchange through the windows (exchange())
  size_t fixed_bytes_;       // > 0: the data area's size, never replaced
  bool mapped_ = false;
  uint64_t exchanges_ = 0;  // exchanges so far: the slot of the next is exchanges_ % 2
  size_t data_bytes_ = 0;
  std::vector<char*> bases_;       // host copy of every rank's buffer as mapped here
  void* bases_dev_ = nullptr;      // the same on the device (the barrier's)
  uint64_t* epoch_dev_ = nullptr;  // the barriers so far (the count exchanges included), on the device
  double timeout_s_ = 300.0;
  StreamOrder order_;                  // acquire() / release()
  volatile int* timed_out_ = nullptr;  // mapped pinned host word
  volatile int* timed_out_dev_ = nullptr;
};

// The ranks agree over t whether a window opens: each offers `ok` (else off_reason says why not, for
// BITEP_TRACE) and whether its count exchange may go through it (BITEP_LSA_EXCHANGE=0: not); when every
// rank offered one and every rank's w->init() passed, w reserves fixed_bytes (or the initial size) and
// becomes *out; else *out stays null on every rank. The trace names the window by fixed_bytes (> 0: the
// low-latency one). exchange_elsewhere (non-null): this transport never exchanges counts through a window, and the
// trace says where they go instead.
bitepResult_t open_flag_window(Transport* t,
                               bool ok,
                               const char* off_reason,
                               std::unique_ptr<FlagWindow> w,
                               size_t fixed_bytes,
                               double timeout_s,
                               std::unique_ptr<PeerWindow>* out,
                               const char* exchange_elsewhere = nullptr);

}  // namespace bitep::ep
