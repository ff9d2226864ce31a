// Which key blocks a CTA of the sm_90a band kernels visits, and which (query, key) pairs of a block it keeps:
// the integer side of ahn_fwd_sm90.cuh and ahn_bwd_sm90.cuh, kept apart so that tests/csrc/sm90_host_checks.cu
// can run it on the host against every pair of many shapes (each pair kept exactly once, nothing else).
#pragma once

#include <cute/config.hpp>

namespace ahn_sm90 {

// floor(a / b) for b > 0 (key blocks of the ring tail have negative indices)
CUTE_HOST_DEVICE constexpr int floor_div(int a, int b) { return a >= 0 ? a / b : -((b - 1 - a) / b); }

// query t (position P + t) and key j of its key stream (position P + j): inside the window, and stored
// (a cache holds no key before position 0)
CUTE_HOST_DEVICE constexpr bool band_pair(int t, int j, int W, int P) { return j <= t && t - W < j && P + j >= 0; }

// query t and sink s (position s < S): below the window (a sink inside it is a band key)
CUTE_HOST_DEVICE constexpr bool sink_pair(int t, int s, int W, int S, int P) { return s < S && s <= P + t - W; }

// The forward's key blocks for query rows row0 .. row0 + kBM - 1 (rows >= T are not stored): the band's blocks
// of kBN keys from the diagonal down to the window's left edge (block n: keys n kBN .., n < 0 on a cache's ring
// tail), then the sink blocks, highest first. The band's lowest block may hold sinks too: there the band keeps
// the keys inside the window and the sink block those below it.
struct FwdBlocks {
  int row0, kBM, kBN, W, S, P;
  int t_hi;  // the CTA's last stored row
  int n_hi, n_band, n_sink;

  CUTE_HOST_DEVICE FwdBlocks(int row0_, int kBM_, int kBN_, int T, int W_, int S_, int P_)
      : row0(row0_), kBM(kBM_), kBN(kBN_), W(W_), S(S_), P(P_) {
    t_hi = row0 + kBM - 1 < T - 1 ? row0 + kBM - 1 : T - 1;
    const int j_lo = row0 - W + 1 > -P ? row0 - W + 1 : -P;
    n_hi = t_hi / kBN;
    n_band = n_hi - floor_div(j_lo, kBN) + 1;
    const int s_hi = S - 1 < P + t_hi - W ? S - 1 : P + t_hi - W;  // the highest sink below some row's window
    n_sink = s_hi >= 0 ? s_hi / kBN + 1 : 0;
  }
  CUTE_HOST_DEVICE int count() const { return n_band + n_sink; }
  CUTE_HOST_DEVICE bool is_band(int i) const { return i < n_band; }
  // the i-th block's index: a band block of the key stream, or a sink block of the sink source
  CUTE_HOST_DEVICE int block(int i) const { return i < n_band ? n_hi - i : n_sink - 1 - (i - n_band); }
  // whether every row of the CTA keeps every key of the i-th block (then it needs no mask)
  CUTE_HOST_DEVICE bool whole(int i) const {
    const int key0 = block(i) * kBN;
    if (i < n_band) return key0 + kBN - 1 <= row0 && key0 > row0 + kBM - 1 - W && P + key0 >= 0;
    return key0 + kBN <= S && key0 + kBN - 1 <= P + row0 - W;
  }
  // whether row t keeps key (or sink) `key` of the i-th block
  CUTE_HOST_DEVICE bool keep(int i, int t, int key) const {
    return i < n_band ? band_pair(t, key, W, P) : sink_pair(t, key, W, S, P);
  }
};

// The backward's query blocks (kBM rows) for keys j0 .. j0 + kBN - 1 of a sequence of T tokens: every query
// t with j <= t < j + W for one of the keys, and t < T.
struct BwdBlocks {
  int m_lo, m_hi;

  CUTE_HOST_DEVICE BwdBlocks(int j0, int kBM, int kBN, int T, int W) {
    m_lo = j0 / kBM;
    const int t_hi = j0 + kBN - 2 + W;
    m_hi = (T - 1 < t_hi ? T - 1 : t_hi) / kBM;
  }
  CUTE_HOST_DEVICE int count() const { return m_hi - m_lo + 1; }
};

// whether queries t0 .. t0 + rows - 1 all keep keys j .. j + keys - 1 (all inside the band and the sequence)
CUTE_HOST_DEVICE constexpr bool bwd_whole(int t0, int rows, int j, int keys, int T, int W) {
  return t0 >= j + keys - 1 && t0 + rows - 1 - W < j && t0 + rows - 1 < T;
}

// whether query t keeps key j in the backward (P = 0: a prefill's own rows)
CUTE_HOST_DEVICE constexpr bool bwd_keep(int t, int j, int T, int W) { return band_pair(t, j, W, 0) && t < T; }

}  // namespace ahn_sm90
