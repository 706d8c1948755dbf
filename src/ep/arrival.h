// SPDX-License-Identifier: Apache-2.0
// The arrival chunks of a large window dispatch (src/ep/dispatch.cc): how every rank cuts the rows it sends
// each peer into chunks, and the order in which a rank copies the peers' rows out of its window as their
// chunks land (kernels/ep_params.h, PermuteParams::chunk_* and ExpertMajorParams::arrival_pieces).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ep_params.h"

namespace bitep::ep {

// Rows per chunk: the largest rank-to-rank count of matrix ([W, W], row s = what rank s sends each rank)
// over `chunks` (>= 1), at least 1. Every rank computes it from the same matrix, so all cut alike.
int64_t arrival_chunk_rows(const std::vector<int64_t>& matrix, int W, int chunks);

// The pieces of the peers' rows in rank `self`'s window, chunk-major (every sender's chunk j before any
// sender's chunk j + 1, senders ascending): seq [P + 1] (seq[0] = 0, prefix of the pieces' rows), row_start
// [P] (recv_offsets[s] + j * chunk_rows) and flag [P] (s * max_chunks + j), concatenated. The own rows are
// not in it; empty pieces are left out.
std::vector<int64_t> arrival_pieces(const std::vector<int64_t>& matrix,
                                    const std::vector<int64_t>& recv_offsets,
                                    int W,
                                    int self,
                                    int64_t chunk_rows,
                                    int max_chunks);

// The sender's side of the rows pass by the copy engine (BITEP_WINDOW_ROWS=ce): rank self's rows for peer r sit
// in the send buffer `send` from row send_offsets[r] (send_counts[r] rows of row_bytes) and go to peer_rows[r],
// its block in r's window. Chunk j of r, rows [j * chunk_rows, ...), waits for local_flags[r * max_chunks + j]
// (the rows pass raises it), is copied, and raises peer_flags[r][j]. Chunk-major: every peer's chunk j before any
// peer's chunk j + 1, the order the receivers copy them in. No chunk for self or for a peer sent nothing.
std::vector<kernels::CeChunk> copy_engine_chunks(const std::vector<int64_t>& send_counts,
                                                 const std::vector<int64_t>& send_offsets,
                                                 int self,
                                                 int64_t chunk_rows,
                                                 int chunks,
                                                 uint64_t row_bytes,
                                                 const char* send,
                                                 const std::vector<char*>& peer_rows,
                                                 const std::vector<uint64_t*>& peer_flags,
                                                 const uint64_t* local_flags,
                                                 int max_chunks);

}  // namespace bitep::ep
