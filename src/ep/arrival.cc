// SPDX-License-Identifier: Apache-2.0
#include "src/ep/arrival.h"

#include <algorithm>

namespace bitep::ep {

int64_t arrival_chunk_rows(const std::vector<int64_t>& matrix, int W, int chunks) {
  int64_t most = 1;
  for (int s = 0; s < W; ++s)
    for (int r = 0; r < W; ++r)
      if (r != s) most = std::max(most, matrix[static_cast<size_t>(s) * W + r]);
  return (most + chunks - 1) / chunks;
}

std::vector<int64_t> arrival_pieces(const std::vector<int64_t>& matrix,
                                    const std::vector<int64_t>& recv_offsets,
                                    int W,
                                    int self,
                                    int64_t chunk_rows,
                                    int max_chunks) {
  std::vector<int64_t> seq{0}, row, flag;
  for (int j = 0; j < max_chunks; ++j)
    for (int s = 0; s < W; ++s) {
      const int64_t left = s == self ? 0 : matrix[static_cast<size_t>(s) * W + self] - j * chunk_rows;
      if (left <= 0) continue;
      seq.push_back(seq.back() + std::min(left, chunk_rows));
      row.push_back(recv_offsets[s] + j * chunk_rows);
      flag.push_back(static_cast<int64_t>(s) * max_chunks + j);
    }
  seq.insert(seq.end(), row.begin(), row.end());
  seq.insert(seq.end(), flag.begin(), flag.end());
  return seq;
}

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
                                                 int max_chunks) {
  const int W = static_cast<int>(send_counts.size());
  std::vector<kernels::CeChunk> out;
  for (int j = 0; j < chunks; ++j)
    for (int r = 0; r < W; ++r) {
      const int64_t n = r == self ? 0 : send_counts[r], first = j * chunk_rows;
      if (first >= n) continue;
      kernels::CeChunk k;
      k.dst = peer_rows[r] + first * row_bytes;
      k.src = send + (send_offsets[r] + first) * row_bytes;
      k.bytes = static_cast<uint64_t>(std::min(chunk_rows, n - first)) * row_bytes;
      k.flag = peer_flags[r] + j;
      k.wait = local_flags + static_cast<size_t>(r) * max_chunks + j;
      out.push_back(k);
    }
  return out;
}

}  // namespace bitep::ep
