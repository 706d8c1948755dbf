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

}  // namespace bitep::ep
