// Host-side checks of the sm_90a kernels (csrc/cuda/sm90/): CuTe's layout algebra and the kernels' block plans
// (band_plan.h) run on the host, so these need nvcc and the CUTLASS headers but no GPU
// (tests/test_sm90_host_checks.py builds and runs this file). Exit status 0 when every check holds.
//
// 1. acc_to_a: an accumulator fragment of one product, converted to the input dtype in place, is the register
//    A operand of the next product (the forward's P V and the memory's s v_new / u ow; the backward's
//    dV += P^T dO and dK += dS^T Q). Every A register must hold the (row, k) element that operand wants there.
// 2. acc_rowcol: the (row, column) view of an accumulator, on which the kernels do per-row softmax statistics
//    and per-column lse / delta: a row index depends on r only, a column index on c only, and the threads of
//    a warpgroup cover the tile once.
// 3. The transposed shared-memory views (V^T, the states' hs^T, the backward's K^T, Q^T, dO^T): the same bytes
//    as the tile they transpose.
// 4. The block plans: over many (T, W, S, P), the forward's CTAs keep every (query, window key) and (query,
//    sink) pair exactly once and nothing else (whole, unmasked blocks included), and so do the backward's
//    (key block, query block, warpgroup) steps for the band's pairs.
// 5. The backward's dS^T stores: a thread's column pairs adjacent in the swizzled buffer (one 32-bit store each),
//    and no bank conflicts within a warp's store.
// A wrong register conversion and a plan off by one key are run through checks 1 and 4 too and must be caught.
#include <cstdio>
#include <vector>

#include "sm90/ahn_bwd_sm90.cuh"

using namespace cute;
using namespace ahn_sm90;

static int g_failed = 0;

static void report(char const* what, long bad, long total) {
  printf("%-62s %s (%ld of %ld wrong)\n", what, bad ? "FAIL" : "ok", bad, total);
  if (bad) ++g_failed;
}

template <class L>
CUTE_HOST_DEVICE constexpr auto wrong_acc_to_a(L const& l) {  // the negative control: mode 0's first two swapped
  auto a = acc_to_a(l);
  auto a0 = get<0>(a);
  return make_layout(make_layout(get<1>(a0), get<0>(a0), get<2>(a0)), get<1>(a), get<2>(a));
}

// the mismatching A registers over `threads` threads when mc's accumulator of the (M, K) tile `shp` feeds ma's A
template <class MmaC, class MmaA, class Shp, class Conv>
long acc_to_a_bad(Shp shp, int threads, Conv conv, long& total) {
  MmaC mc;
  MmaA ma;
  long bad = 0;
  total = 0;
  for (int t = 0; t < threads; ++t) {
    auto c = mc.get_thread_slice(t).partition_C(make_identity_tensor(shp));
    auto want = ma.get_thread_slice(t).partition_A(make_identity_tensor(shp));
    auto have = make_tensor(c.data(), conv(c.layout()));
    if (size<0>(have) != size<0>(want) || size<1>(have) != size<1>(want) || size<2>(have) != size<2>(want)) {
      total = 1;  // shapes that differ: one wrong, reported
      return 1;
    }
    for (int k = 0; k < size<2>(want); ++k)
      for (int m = 0; m < size<1>(want); ++m)
        for (int v = 0; v < size<0>(want); ++v, ++total) bad += !(have(v, m, k) == want(v, m, k));
  }
  return bad;
}

template <class MmaC, class MmaA, class Shp>
void check_acc_to_a(char const* what, Shp shp, int threads) {
  long total = 0;
  long bad = acc_to_a_bad<MmaC, MmaA>(shp, threads, [](auto l) { return acc_to_a(l); }, total);
  report(what, bad, total);
}

// acc_rowcol: rows depend on r only, columns on c only, every element of the (M, N) tile once
template <class Mma, class Shp>
void check_rowcol(char const* what, Shp shp, int threads) {
  Mma mma;
  constexpr int M = decltype(size<0>(shp))::value, N = decltype(size<1>(shp))::value;
  static_assert(M <= 256 && N <= 256, "the tile fits the tally");
  static int seen[256][256];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) seen[i][j] = 0;
  long bad = 0, total = 0;
  for (int t = 0; t < threads; ++t) {
    auto c = mma.get_thread_slice(t).partition_C(make_identity_tensor(shp));
    auto rc = make_tensor(c.data(), acc_rowcol(c.layout()));
    for (int r = 0; r < size<0>(rc); ++r)
      for (int k = 0; k < size<1>(rc); ++k, ++total) {
        auto x = rc(r, k);
        bad += get<0>(x) != get<0>(rc(r, 0)) || get<1>(x) != get<1>(rc(0, k));
        ++seen[get<0>(x)][get<1>(x)];
      }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) bad += seen[i][j] != 1;
  report(what, bad, total);
}

// a transposed view: t(i, j[, s]) is the same element as x(j, i[, s])
template <class LX, class LT>
void check_transposed(char const* what, LX lx, LT lt) {
  long bad = 0, total = 0;
  for (int i = 0; i < size<0>(lt); ++i)
    for (int j = 0; j < size<1>(lt); ++j) {
      if constexpr (decltype(rank(lt))::value == 3) {
        for (int s = 0; s < size<2>(lt); ++s, ++total) bad += lt(i, j, s) != lx(j, i, s);
      } else {
        ++total;
        bad += lt(i, j) != lx(j, i);
      }
    }
  report(what, bad, total);
}

// the backward's dS^T store: a thread's accumulator columns c, c + 1 (queries t, t + 1 of one key) land on
// adjacent elements of the swizzled query-major dS buffer, 4-byte aligned (one 32-bit store per pair), and
// each warp's store touches every bank once (the swizzle applies to byte addresses: a buffer on the host at
// the kernel's 1024-byte alignment, through the kernel's own tensor)
template <class Element>
void check_ds_pairs(char const* what, char const* what_banks) {
  using Bw = BandBwdTraits<Element>;
  alignas(1024) static Element buf[cosize_v<typename Bw::SmemLayoutdS>];
  Tensor sdS = make_tensor(make_smem_ptr(buf), typename Bw::SmemLayoutdS{});
  typename Bw::MmaSdP mma;
  auto rc = [&](int wt) {
    auto c = mma.get_thread_slice(wt).partition_C(make_identity_tensor(Shape<_64, Int<Bw::kBM>>{}));
    return make_tensor(c.data(), acc_rowcol(c.layout()));
  };
  constexpr int kRows = decltype(size<0>(rc(0)))::value, kCols = decltype(size<1>(rc(0)))::value;
  long bad = 0, total = 0, conflicted = 0, stores = 0;
  for (int b = 0; b < 2; ++b)
    for (int wg = 0; wg < 2; ++wg)
      for (int warp = 0; warp < 4; ++warp)
        for (int r = 0; r < kRows; ++r)
          for (int c = 0; c < kCols; c += 2, ++stores) {
            int words[32];
            for (int lane = 0; lane < 32; ++lane, ++total) {
              auto cSr = rc(32 * warp + lane);
              Element* p0 = &sdS(get<1>(cSr(r, c)), 64 * wg + get<0>(cSr(r, c)), b);
              Element* p1 = &sdS(get<1>(cSr(r, c + 1)), 64 * wg + get<0>(cSr(r, c + 1)), b);
              bad += p1 != p0 + 1 || reinterpret_cast<uintptr_t>(p0) % 4 != 0;
              words[lane] = int((reinterpret_cast<char*>(p0) - reinterpret_cast<char*>(buf)) / 4);
            }
            for (int x = 0; x < 32; ++x)  // another word in the same bank within one store: a conflict
              for (int y = 0; y < x; ++y) conflicted += words[x] % 32 == words[y] % 32 && words[x] != words[y];
          }
  report(what, bad, total);
  report(what_banks, conflicted, stores);
}

template <class Element>
void check_all(char const* dt) {
  printf("# %s\n", dt);
  using F = BandTraits<Element, true>;
  using Bw = BandBwdTraits<Element>;
  constexpr int kD = F::kD;
  char what[128];
  auto name = [&](char const* s) {
    snprintf(what, sizeof what, "%s %s", dt, s);
    return what;
  };
  // forward: S (128 rows over two warpgroups x kBN keys) -> P V; the memory's q k^T -> s v_new and
  // RMSNorm(q hs + s v_new) -> its [D, D] projection
  check_acc_to_a<typename F::TiledMmaQK, typename F::TiledMmaPV>(name("fwd P as P V's A"),
                                                                 Shape<Int<F::kBM>, Int<F::kBN>>{}, 128 * F::kConsumerWGs);
  check_acc_to_a<typename F::MmaQKm, typename F::MmaRS>(name("fwd s = q k^T as s v_new's A"), Shape<_64, _64>{}, 128);
  check_acc_to_a<typename F::MmaQH, typename F::MmaRS>(name("fwd u as u ow's A"), Shape<_64, Int<kD>>{}, 128);
  // backward: P^T and dS^T (keys x queries) -> dV += P^T dO, dK += dS^T Q
  check_acc_to_a<typename Bw::MmaSdP, typename Bw::MmaKV>(name("bwd P^T, dS^T as dV's, dK's A"),
                                                          Shape<_64, Int<Bw::kBM>>{}, 128);
  check_rowcol<typename F::TiledMmaQK>(name("fwd S (row, col) view"), Shape<Int<F::kBM>, Int<F::kBN>>{},
                                       128 * F::kConsumerWGs);
  check_rowcol<typename F::TiledMmaPV>(name("fwd O (row, col) view"), Shape<Int<F::kBM>, Int<kD>>{},
                                       128 * F::kConsumerWGs);
  check_rowcol<typename F::MmaQKm>(name("fwd q k^T (row, col) view"), Shape<_64, _64>{}, 128);
  check_rowcol<typename F::MmaQH>(name("fwd q hs (row, col) view"), Shape<_64, Int<kD>>{}, 128);
  check_rowcol<typename Bw::MmaSdP>(name("bwd S^T, dP^T (row, col) view"), Shape<_64, Int<Bw::kBM>>{}, 128);
  check_rowcol<typename Bw::MmaKV>(name("bwd dK, dV (row, col) view"), Shape<_64, Int<kD>>{}, 128);
  check_rowcol<typename Bw::MmaQ>(name("bwd dQ (row, col) view"), Shape<Int<Bw::kBM>, _64>{}, 128);
  check_transposed(name("fwd V^T"), typename F::SmemLayoutV{}, typename F::SmemLayoutVt{});
  check_transposed(name("fwd hs^T"), typename F::SmemLayoutHs{}, typename F::SmemLayoutHst{});
  check_transposed(name("bwd K^T"), typename Bw::SmemLayoutK{}, typename Bw::SmemLayoutKt{});
  check_transposed(name("bwd Q^T, dO^T"), typename Bw::SmemLayoutQ{}, typename Bw::SmemLayoutQt{});
  char what2[128];
  snprintf(what2, sizeof what2, "%s bwd dS^T pair stores: no bank conflicts", dt);
  check_ds_pairs<Element>(name("bwd dS^T pairs adjacent, 4-byte aligned"), what2);
  // the negative control: a wrong conversion must be caught
  long total = 0;
  long bad = acc_to_a_bad<typename Bw::MmaSdP, typename Bw::MmaKV>(Shape<_64, Int<Bw::kBM>>{}, 128,
                                                                   [](auto l) { return wrong_acc_to_a(l); }, total);
  printf("%-62s %s (%ld of %ld wrong)\n", name("negative control: swapped registers caught"), bad ? "ok" : "FAIL",
         bad, total);
  if (!bad) ++g_failed;
}

// 4. the forward's plan for a sequence of T queries at positions P .. P + T - 1 (a prefill: P = 0): the pairs
// its CTAs keep, against the window (positions P + t - W < p <= P + t, p >= 0, key j = p - P of the stream) and
// the sinks (s < S, s <= P + t - W); `shift` moves every kept key by one (the negative control)
static long fwd_plan_bad(int T, int W, int S, int P, int kBM, int kBN, int shift, long& pairs) {
  const int nb = T + W;  // band keys j = -W .. T - 1
  std::vector<int> band(size_t(T) * nb, 0), sink(size_t(T) * (S > 0 ? S : 1), 0);
  long bad = 0;
  for (int row0 = 0; row0 < T; row0 += kBM) {
    const FwdBlocks plan(row0, kBM, kBN, T, W, S, P);
    for (int i = 0; i < plan.count(); ++i) {
      const int key0 = plan.block(i) * kBN;
      const bool whole = plan.whole(i);
      for (int t = row0; t < row0 + kBM && t < T; ++t)
        for (int k = 0; k < kBN; ++k) {
          if (!(whole || plan.keep(i, t, key0 + k))) continue;
          const int key = key0 + k + shift;
          if (plan.is_band(i)) {
            const int pos = P + key;
            if (!(pos >= 0 && pos <= P + t && pos > P + t - W)) {
              ++bad;
              continue;
            }
            ++band[size_t(t) * nb + key + W];
          } else {
            if (!(key >= 0 && key < S && key <= P + t - W)) {
              ++bad;
              continue;
            }
            ++sink[size_t(t) * S + key];
          }
        }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int pos = P + t - W + 1 > 0 ? P + t - W + 1 : 0; pos <= P + t; ++pos, ++pairs)
      bad += band[size_t(t) * nb + pos - P + W] != 1;
    for (int s = 0; s < S && s <= P + t - W; ++s, ++pairs) bad += sink[size_t(t) * S + s] != 1;
  }
  return bad;
}

// the backward's plan for one sequence of T tokens: the (query, key) band pairs its steps keep (a CTA per kBN
// keys, its query blocks of kBM rows, a warpgroup per 64 keys)
static long bwd_plan_bad(int T, int W, int kBM, int kBN, int shift, long& pairs) {
  std::vector<int> seen(size_t(T) * T, 0);
  long bad = 0;
  for (int j0 = 0; j0 < T; j0 += kBN) {
    const BwdBlocks plan(j0, kBM, kBN, T, W);
    for (int i = 0; i < plan.count(); ++i) {
      const int t0 = (plan.m_lo + i) * kBM;
      for (int jw = j0; jw < j0 + kBN; jw += 64) {
        const bool whole = bwd_whole(t0, kBM, jw, 64, T, W);
        for (int t = t0; t < t0 + kBM; ++t)
          for (int j = jw; j < jw + 64; ++j) {
            if (!(whole || bwd_keep(t, j, T, W))) continue;
            const int key = j + shift;
            if (!(t < T && key >= 0 && key <= t && t - key < W)) {
              ++bad;
              continue;
            }
            ++seen[size_t(t) * T + key];
          }
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int j = t - W + 1 > 0 ? t - W + 1 : 0; j <= t; ++j, ++pairs) bad += seen[size_t(t) * T + j] != 1;
  return bad;
}

static void check_plans() {
  using F = BandTraits<cutlass::bfloat16_t, true>;
  using Bw = BandBwdTraits<cutlass::bfloat16_t>;
  const int Ts[] = {1, 2, 63, 65, 127, 128, 129, 257, 385, 700};
  const int Ws[] = {1, 2, 64, 127, 128, 129, 200, 255, 256, 300, 383, 511, 1000, 1023, 2000};
  const int Ss[] = {0, 1, 64, 127, 128, 129, 255, 256, 300, 500};
  const int Ps[] = {0, 1, 2, 127, 128, 129, 255, 300, 1000, 5000};
  long fbad = 0, fpairs = 0, bbad = 0, bpairs = 0, cases = 0;
  for (int T : Ts)
    for (int W : Ws) {
      bbad += bwd_plan_bad(T, W, Bw::kBM, Bw::kBN, 0, bpairs);
      for (int S : Ss)
        for (int P : Ps) {
          ++cases;
          fbad += fwd_plan_bad(T, W, S, P, F::kBM, F::kBN, 0, fpairs);
        }
    }
  char what[128];
  snprintf(what, sizeof what, "fwd plan: every pair once, %ld (T, W, S, P) cases", cases);
  report(what, fbad, fpairs);
  report("bwd plan: every band pair once", bbad, bpairs);
  // the negative controls: a plan whose keys are off by one must be caught
  long pairs = 0;
  const long f1 = fwd_plan_bad(257, 129, 129, 1, F::kBM, F::kBN, 1, pairs);
  const long b1 = bwd_plan_bad(257, 129, Bw::kBM, Bw::kBN, 1, pairs);
  printf("%-62s %s\n", "negative control: plans off by one key caught", f1 && b1 ? "ok" : "FAIL");
  if (!(f1 && b1)) ++g_failed;
}

int main() {
  check_all<cutlass::bfloat16_t>("bf16");
  check_all<cutlass::half_t>("fp16");
  printf("# block plans\n");
  check_plans();
  printf("%s\n", g_failed ? "FAILED" : "all host checks passed");
  return g_failed ? 1 : 0;
}
