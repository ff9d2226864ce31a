// Window + sinks attention forward for sm_90a (H100 / H200): query t attends keys j <= t with t - W < j (the
// band) or j < S (the sinks).
//
// The engine spike of the Hopper forward (NOTES_prefill.md, "Our own band kernel"): one CTA per
// (128-row query block, head, batch) with a producer warp that brings Q once and the band's K, V tiles
// through a two-stage TMA pipeline, and two consumer warpgroups of 64 rows each running wgmma: S = Q K^T
// from shared memory, the online softmax in registers, O += P V with P straight from the registers. Inside a
// warpgroup the next block's Q K^T is issued before this block's P V, so the softmax of one block runs
// while the tensor cores work on the other; with kPingPong the two warpgroups also take turns issuing their
// products (named barriers), so one's softmax runs under the other's GEMMs. Key blocks go from the diagonal
// (causal mask) down to the window's left edge (left mask), then the sink blocks below the band (masked);
// the blocks between need no mask.
//
// Out: o (the band's normalised output, [B, T, H, D], the input dtype) and lse ([B, H, T], fp32, natural
// log), what cuDNN's band gives the fused AHN forward today.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

namespace ahn_sm90 {

using namespace cute;

template <class Element_, int kBM_ = 128, int kBN_ = 128, int kD_ = 128, int kStages_ = 2>
struct BandTraits {
  using Element = Element_;
  static constexpr int kBM = kBM_, kBN = kBN_, kD = kD_, kStages = kStages_;
  static constexpr int kConsumerWGs = kBM / 64;
  static constexpr int kThreads = 128 * (kConsumerWGs + 1);
  using TileQK = Shape<Int<kBM>, Int<kBN>, Int<kD>>;  // S = Q K^T: (M, N, K)
  using TilePV = Shape<Int<kBM>, Int<kD>, Int<kBN>>;  // O = P V:   (M, N, K)
  using AtomLayout = Layout<Shape<Int<kConsumerWGs>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, TileQK, GMMA::Major::K, GMMA::Major::K>(), AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TilePV, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBM>, Int<kD>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBN>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutV = SmemLayoutK;
  // V^T as P V's B operand: the same bytes seen as (D, BN), i.e. MN-major
  using SmemLayoutVt = decltype(composition(
      SmemLayoutV{}, make_ordered_layout(Shape<Int<kD>, Int<kBN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutV>> v;
    alignas(16) uint64_t bar_q;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
  };

  // [B, T, heads, D] in global memory, as (T, D, heads, B) for TMA
  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor{}, SmemLayoutQ{}, Shape<Int<kBM>, Int<kD>>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor{}, take<0, 2>(SmemLayoutK{}),
                                       Shape<Int<kBN>, Int<kD>>{}, _1{}));

  struct Params {
    TmaQ tma_q;
    TmaKV tma_k, tma_v;
    Element* o;
    float* lse;
    int B, T, H, HKV, W, S;
    float scale_log2;
  };
};

// ((2, 2, V), M, N) accumulator layout -> ((2, M), (2, V, N)): rows x columns of one thread's values
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(L const& l) {
  static_assert(decltype(rank(l))::value == 3);
  auto l0 = get<0>(l);
  return make_layout(make_layout(get<1>(l0), get<1>(l)), make_layout(get<0>(l0), get<2>(l0), get<2>(l)));
}

// ((2, 2, V), 1, 1) accumulator of S -> ((2, 2, 2), 1, V / 2): the A-operand registers of P V's wgmma (k-blocks
// of 16 columns are two of the accumulator's 8-column groups, in the order the A fragment wants them)
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_to_a(L const& l) {
  static_assert(decltype(size<1>(l))::value == 1 && decltype(size<2>(l))::value == 1);
  auto l0 = get<0>(l);
  auto v = logical_divide(get<2>(l0), Int<2>{});
  return make_layout(make_layout(get<0>(l0), get<1>(l0), get<0>(v)), get<1>(l), get<1>(v));
}

// one wgmma batch over every k-block: C (+)= A B; wait for all but `kWait` batches when kWait >= 0
template <bool kZeroInit, int kWait, class Mma, class TA, class TB, class TC>
CUTE_DEVICE void wgmma(Mma& mma, TA const& a, TB const& b, TC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(c);
}

CUTE_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

template <class Traits, bool kPingPong>
__global__ void __launch_bounds__(Traits::kThreads, 1) band_fwd_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using Element = typename Traits::Element;
  constexpr int kBM = Traits::kBM, kBN = Traits::kBN, kD = Traits::kD;
  using SS = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  extern __shared__ char smem_raw[];
  SS& ss = *reinterpret_cast<SS*>(smem_raw);

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hkv = h / (p.H / p.HKV);
  const int T = p.T, W = p.W, S = p.S;
  const int row0 = m_block * kBM;
  // key blocks of the band of rows row0 .. row0 + kBM - 1: first key row0 - W + 1, last row0 + kBM - 1;
  // then the sink blocks below the band's first one, highest first
  const int n_lo = max(0, row0 - W + 1) / kBN;
  const int n_hi = min(row0 + kBM - 1, T - 1) / kBN;
  const int n_band = n_hi - n_lo + 1;
  const int n_sink = min(n_lo, (S + kBN - 1) / kBN);
  const int n_blocks = n_band + n_sink;
  auto block_of = [&](int i) { return i < n_band ? n_hi - i : n_sink - 1 - (i - n_band); };

  const int warp_group = threadIdx.x / 128;
  typename Pipeline::Params pk;
  pk.transaction_bytes = kBN * kD * sizeof(Element);
  pk.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pk.is_leader = threadIdx.x == 0;
  pk.num_consumers = Traits::kConsumerWGs * 128;
  Pipeline pipe_k(ss.pipe_k, pk, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pk, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_q, 1);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutVt{});

  if (warp_group == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x == 0) {
      Tensor mQ = p.tma_q.get_tma_tensor(make_shape(T, kD, p.H, p.B));
      Tensor mK = p.tma_k.get_tma_tensor(make_shape(T, kD, p.HKV, p.B));
      Tensor mV = p.tma_v.get_tma_tensor(make_shape(T, kD, p.HKV, p.B));
      Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));
      Tensor gK = local_tile(mK(_, _, hkv, b), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      Tensor gV = local_tile(mV(_, _, hkv, b), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tKg, tKs] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_q, kBM * kD * sizeof(Element));
      copy(p.tma_q.with(ss.bar_q), tQg, tQs);
      PipelineState wk = cutlass::make_producer_start_state<Pipeline>();
      PipelineState wv = cutlass::make_producer_start_state<Pipeline>();
      for (int i = 0; i < n_blocks; ++i) {
        const int n = block_of(i);
        pipe_k.producer_acquire(wk);
        copy(p.tma_k.with(*pipe_k.producer_get_barrier(wk)), tKg(_, n), tKs(_, wk.index()));
        ++wk;
        pipe_v.producer_acquire(wv);
        copy(p.tma_v.with(*pipe_v.producer_get_barrier(wv)), tVg(_, n), tVs(_, wv.index()));
        ++wv;
      }
    }
    return;
  }

  // consumers: warpgroups 1 .. kConsumerWGs, 64 rows each
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int tid = threadIdx.x - 128;
  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tSrK = thr_qk.partition_fragment_B(sK);
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBM>, Int<kBN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBM>, Int<kD>>{});
  Tensor rP = make_tensor<Element>(tSrS.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_a(tSrS.layout()));
  Tensor Sacc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
  Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  Tensor cS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor cSrc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
  Tensor cO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), acc_rowcol(cO.layout()));
  constexpr int kRows = decltype(size<0>(Sacc))::value;
  constexpr int kCols = decltype(size<1>(Sacc))::value;

  float row_max[kRows], row_sum[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const float sl2 = p.scale_log2;

  // mask the keys of key block n that row t does not attend (j > t, or t - W >= j >= S); a block inside the
  // band for every row, or sinks only that every row sees past its window, needs none
  auto mask = [&](int n) {
    const int key0 = n * kBN;
    const bool causal_ok = key0 + kBN - 1 <= row0;
    if (causal_ok && key0 > row0 + kBM - 1 - W) return;
    if (causal_ok && key0 + kBN <= S) return;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int t = row0 + get<0>(cSrc(r, 0));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int j = key0 + get<1>(cSrc(r, c));
        if (j > t || (j <= t - W && j >= S)) Sacc(r, c) = -INFINITY;
      }
    }
  };
  // online softmax of the scores (in place: they become P); rescale gets the factors of the output so far
  auto softmax = [&](float (&rescale)[kRows]) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) mx = fmaxf(mx, Sacc(r, c));
      mx = quad_max(mx);
      const float m_scaled = mx == -INFINITY ? 0.f : mx * sl2;
      rescale[r] = fast_exp2(row_max[r] * sl2 - m_scaled);
      row_max[r] = mx;
      float sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const float e = fast_exp2(Sacc(r, c) * sl2 - m_scaled);
        Sacc(r, c) = e;
        sum += e;
      }
      row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
  };
  // P in the input dtype; the fences keep the registers in place around the asynchronous P V that reads them
  auto to_p = [&]() {
    cutlass::NumericArrayConverter<Element, float, decltype(size(tSrS))::value> cvt;
    auto frag = cvt(*reinterpret_cast<cutlass::Array<float, decltype(size(tSrS))::value> const*>(tSrS.data()));
    *reinterpret_cast<decltype(frag)*>(rP.data()) = frag;
    warpgroup_fence_operand(rP);
  };

  // kPingPong: the consumer warpgroups take turns issuing their products; the second lets the first go first
  const int wg = tid / 128;
  auto my_turn = [&]() {
    if constexpr (kPingPong) cutlass::arch::NamedBarrier::sync(256, wg);
  };
  auto your_turn = [&](bool last) {
    if constexpr (kPingPong) {
      if (!(last && wg == 1)) cutlass::arch::NamedBarrier::arrive(256, 1 - wg);
    }
  };
  if constexpr (kPingPong) {
    if (wg == 1) cutlass::arch::NamedBarrier::arrive(256, 0);
  }

  clear(tOrO);
  PipelineState rk, rv;
  cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_q, 0);
  float rescale[kRows];

  pipe_k.consumer_wait(rk);
  my_turn();
  wgmma<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), tSrS);
  your_turn(false);
  warpgroup_wait<0>();
  pipe_k.consumer_release(rk);
  ++rk;
  mask(n_hi);
  softmax(rescale);
  to_p();
  for (int i = 1; i < n_blocks; ++i) {
    const int n = block_of(i);
    pipe_k.consumer_wait(rk);
    pipe_v.consumer_wait(rv);
    my_turn();
    wgmma<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), tSrS);
    wgmma<false, -1>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), tOrO);
    your_turn(false);
    warpgroup_wait<1>();
    pipe_k.consumer_release(rk);
    ++rk;
    mask(n);
    softmax(rescale);
    warpgroup_wait<0>();
    warpgroup_fence_operand(rP);
    pipe_v.consumer_release(rv);
    ++rv;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < decltype(size<1>(O))::value; ++c) O(r, c) *= rescale[r];
    }
    to_p();
  }
  pipe_v.consumer_wait(rv);
  my_turn();
  wgmma<false, -1>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), tOrO);
  your_turn(true);
  warpgroup_wait<0>();
  pipe_v.consumer_release(rv);

  // o = acc / l, lse = m * scale + log l; rows past T are not stored
  const int lane = threadIdx.x % 32;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float l = quad_sum(row_sum[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int t = row0 + get<0>(cOrc(r, 0));
    if (t < T) {
      Element* orow = p.o + ((int64_t(b) * T + t) * p.H + h) * kD;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < decltype(size<1>(O))::value; c += 2) {
        const int d = get<1>(cOrc(r, c));
        cutlass::Array<Element, 2> pair;
        pair[0] = Element(O(r, c) * inv);
        pair[1] = Element(O(r, c + 1) * inv);
        *reinterpret_cast<cutlass::Array<Element, 2>*>(orow + d) = pair;
      }
      if (lane % 4 == 0) {
        p.lse[(int64_t(b) * p.H + h) * T + t] =
            l > 0.f ? (row_max[r] * sl2 + log2f(l)) * 0.69314718055994531f : -INFINITY;
      }
    }
  }
}

template <class Element, bool kPingPong>
void band_fwd_launch(Element const* q, Element const* k, Element const* v, Element* o, float* lse, int B, int T,
                     int H, int HKV, int W, int S, int64_t q_row_stride, int64_t kv_row_stride, cudaStream_t stream) {
  using Traits = BandTraits<Element>;
  constexpr int kD = Traits::kD;
  auto gq = make_tensor(make_gmem_ptr(q), make_shape(T, kD, H, B),
                        make_stride(q_row_stride, _1{}, int64_t(kD), q_row_stride * T));
  auto gk = make_tensor(make_gmem_ptr(k), make_shape(T, kD, HKV, B),
                        make_stride(kv_row_stride, _1{}, int64_t(kD), kv_row_stride * T));
  auto gv = make_tensor(make_gmem_ptr(v), make_shape(T, kD, HKV, B),
                        make_stride(kv_row_stride, _1{}, int64_t(kD), kv_row_stride * T));
  typename Traits::Params p{
      make_tma_copy(SM90_TMA_LOAD{}, gq, typename Traits::SmemLayoutQ{}, Shape<Int<Traits::kBM>, Int<kD>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gk, take<0, 2>(typename Traits::SmemLayoutK{}),
                    Shape<Int<Traits::kBN>, Int<kD>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gv, take<0, 2>(typename Traits::SmemLayoutV{}),
                    Shape<Int<Traits::kBN>, Int<kD>>{}, _1{}),
      o, lse, B, T, H, HKV, W, S, float(1.4426950408889634 / sqrt(double(kD)))};
  auto kernel = band_fwd_kernel<Traits, kPingPong>;
  const int smem = sizeof(typename Traits::SharedStorage);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid((T + Traits::kBM - 1) / Traits::kBM, H, B);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
}

}  // namespace ahn_sm90
