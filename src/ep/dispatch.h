// SPDX-License-Identifier: Apache-2.0
// bitepDispatch's orchestration (src/ep/dispatch.cc: layout, count exchange, tables, the all-to-all path, the
// call itself; src/ep/dispatch_window.cc: the peer-window paths). Internal.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "bitep/bitep.h"
#include "kernels/ep_params.h"
#include "src/args.h"
#include "src/ep/exec.h"
#include "src/ep/group.h"
#include "src/ep/handle.h"
#include "src/ep/transport.h"
#include "src/trace.h"

namespace bitep::ep {

// The expert-major call after the transfer when the own rows' copies (and every row's positions) ran
// before it: the others' rows alone, positions as given, pads already zero; the gather's source table as
// given unless the first call took the bulk copies (which do not fill it) and this one does not.
bitepResult_t others_after_own(Exec* ex, bool first_bulk, kernels::ExpertMajorParams* ep);

class Dispatch {
 public:
  // prior: a failure of this rank's checks made before (bitepDispatchLowLatency's), which it reports to its
  // peers in the count exchange as any local failure.
  Dispatch(bitepGroup* g, const bitepDispatchArgs_t* a, bitepStream_t stream, bitepResult_t prior = bitepSuccess)
      : prior_(prior),
        g_(g),
        a_(a),
        ex_(g, stream),
        trace_("dispatch", g->rank, stream, g->config.backend == bitepBackendCuda),
        W_(g->nranks),
        self_(g->rank),
        L_(g->num_local_experts),
        KL_(g->max_row_experts),
        MB_(g->local_map_bytes),
        n_(L_ + 2 + g->nranks),
        row_bytes_(static_cast<size_t>(dtype_size(g->config.dtype)) * g->config.hidden) {}

  // A failed dispatch frees its handle here: after the work it queued (the stream is still the caller's,
  // joined with the side stream first).
  ~Dispatch() {
    (void)ex_.join();
    record_fence(h_.get(), ex_.stream());
  }

  // what: the API call, for the group's record when this rank fails alone (collective.h failed_alone).
  bitepResult_t run(bitepHandle_t* out, const char* what = "bitepDispatch");

 private:
  bitepResult_t steps(bitepHandle_t* out);
  // This rank's flags word in the exchange when its part so far succeeded.
  int32_t flags() const;
  // The arrival chunks this rank can take (window_chunks()): its copies out of the window go by the bulk
  // copies, which wait for the flags. Before the exchange, which carries it in the flags.
  int arrival_chunks();
  bitepResult_t before_exchange();
  bitepResult_t after_exchange();
  bitepResult_t upload_tables();
  // The arrival chunks' rows (chunk_rows_) and out = [W] send counts, then the pieces of the peers' rows
  // in this rank's window, chunk-major (ExpertMajorParams::arrival_pieces).
  bitepResult_t arrival_pieces(std::vector<int64_t>* out);
  bitepResult_t move_rows();
  bitepResult_t move_rows_window();
  bitepResult_t move_rows_window_small();
  // The peers' map slices and weights (with_rows: and their rows) from this rank's window into recv_map and
  // recv_weights (recv_x), in one launch on the current stream; the peers' rows sit at [0, own0) and [own1, R).
  bitepResult_t unpack_window(bool with_rows);
  bitepResult_t move_rows_nccl();
  kernels::RoutingInput routing() const;
  // The permute of this dispatch's tokens, the own rows into recv_x; the caller says where the others go.
  kernels::PermuteParams permute_params() const;
  // The expert-major view's parameters, recv_x to expert_x, with the gather's source table (a temporary:
  // call before any fork).
  bitepResult_t expert_copy_params(kernels::ExpertMajorParams* ep);

  const bitepResult_t prior_;
  bitepGroup* g_;
  const bitepDispatchArgs_t* a_;
  Exec ex_;
  Trace trace_;
  const int W_, self_, L_, KL_, MB_, n_;
  const size_t row_bytes_;
  HandlePtr h_;
  int32_t* xsend_ = nullptr;  // [W, n_]: counts, flags, the send-count vector (backend memory)
  int32_t* xrecv_ = nullptr;
  int32_t* xagree_ = nullptr;       // [kAgreeInts * W]: the agreement after the exchange (backend memory)
  std::vector<int32_t> recv_host_;  // [W, n_]: row q what rank q sent here; row self this rank's own
  bool any_weights_ = false;
  // The failure being returned is every rank's: each learnt of it in the count exchange or the agreement. Any other
  // leaves the peers behind (failed_alone).
  bool shared_verdict_ = false;
  bool split_ = false;         // every rank: the routing all-to-all first, the rows beside the own rows' copies
  PeerWindow* win_ = nullptr;  // rows go straight into the peers' windows (cuda, one NVLink domain)
  // The count exchange went through the windows: it was a barrier after every rank's previous use of its
  // window (each exchange is ordered after its rank's previous release), so the windows are idle.
  bool windows_idle_ = false;
  void* const* peer_dest_ = nullptr;   // [7W] the permute's destinations in the peers' windows (meta, rows)
                                       // and the arrival flags of this rank's chunks in them
  std::vector<void*> peer_dest_host_;  // the same table, as the host wrote it (the copy engine's chunks)
  // Arrival chunks per peer (this rank's offer before the exchange; agreed after, at most the window's
  // max_chunks()), of chunk_rows_ rows each (large window dispatches; upload_tables).
  int chunks_ = 0;
  int64_t chunk_rows_ = 0;
  // [W] send counts, then the arrival pieces [3P + 1] (ExpertMajorParams::arrival_pieces; backend memory).
  const int64_t* arrival_table_ = nullptr;
  int num_pieces_ = 0;
  size_t win_map_ = 0, win_weights_ = 0;  // offsets of the map and weight regions in a window
  // Send-side temporaries.
  void* send_x_ = nullptr;
  uint8_t* send_map_ = nullptr;
  float* send_weights_ = nullptr;
};

}  // namespace bitep::ep
