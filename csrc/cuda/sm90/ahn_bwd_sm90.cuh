// Window band attention backward for sm_90a (H100 / H200): the gradients of the band share of the fused
// forward's attention, keys j with t - W < j <= t for query t. The sinks below the window and the memory stay
// with the Triton kernels (backward.py), which add these gradients to theirs.
//
// One CTA per (128-key block, query head, sequence), not persistent: CTAs retire all through the launch, so a
// stream beside it (the memory's reverse state chain) gets SMs as they free up, which cuDNN's persistent band
// backward never gives. A producer warp loads the CTA's K and V once, then streams the query blocks that see
// these keys (64 rows: Q, dO, and their lse and delta) through a two-stage TMA pipeline. Two consumer
// warpgroups own 64 keys each and compute, per query block, with the products transposed so that P^T and dS^T
// come out of the accumulators already as the A operands of the dK, dV products:
//   S^T = K Q^T, dP^T = V dO^T (from shared memory), P^T = exp2(S^T scale - lse), dS^T = P^T (dP^T - delta),
//   dV += P^T dO, dK += dS^T Q (A from registers), and dQ = dS K: dS^T goes to shared memory, each warpgroup
//   multiplies it by half of K's columns and adds its 64 x 64 fp32 tile to the global dq by bulk reductions
//   (cp.reduce.async.bulk, one 256-byte row each).
// At the end each warpgroup adds its 64 keys' dK (times the softmax scale) and dV to the global fp32 dk, dv by
// bulk reductions too: the G query heads of a kv head meet there.
//
// Rows: one packed batch row of Tt tokens, sequence n the rows cu[n] .. cu[n + 1] - 1 (equal lengths are the
// case of a regular cu). lse (log2 domain, the scores scaled by scale_log2) and delta = rowsum(dO o_win) come
// as ld [2, H, Tpad] fp32 (Tpad >= Tt, a multiple of 4): TMA boxes of 68 rows whose first is the step's first
// query rounded down to a multiple of 4 (TMA faults on an innermost start coordinate that is not 16-byte aligned,
// and a packed sequence may start at any row).
#pragma once

#include "ahn_fwd_sm90.cuh"

namespace ahn_sm90 {

// cp.reduce.async.bulk: add `bytes` (a multiple of 16, both addresses 16-byte aligned) of fp32 from shared
// memory into global memory, in the executing thread's bulk async-group
CUTE_DEVICE void bulk_add_f32(float* gmem, float const* smem, int bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(gmem), "r"(s),
               "r"(bytes)
               : "memory");
}

template <class Element_, int kD_ = 128>
struct BandBwdTraits {
  using Element = Element_;
  static constexpr int kBM = 64;   // queries per step
  static constexpr int kBN = 128;  // keys per CTA, 64 per consumer warpgroup
  static constexpr int kD = kD_;
  static constexpr int kStages = 2;
  static constexpr int kConsumerWGs = kBN / 64;
  static constexpr int kThreads = 128 * (kConsumerWGs + 1);
  static constexpr int kQRow = 64 + 8;  // dq staging row (floats): padded against bank conflicts, 16-byte rows
  using WG = Layout<Shape<_1, _1, _1>>;
  // S^T = K Q^T and dP^T = V dO^T: (64 keys, kBM queries, K = D)
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBM>, Int<kD>>, GMMA::Major::K, GMMA::Major::K>(),
      WG{}));
  // dV += P^T dO, dK += dS^T Q: (64 keys, D, K = kBM queries), A from registers, B = dO / Q seen as (D, queries)
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kD>, Int<kBM>>, GMMA::Major::K, GMMA::Major::MN>(),
      WG{}));
  // dQ[:, 64 w ..] = dS K[:, 64 w ..]: (kBM queries, 64 of D, K = kBN keys), dS (queries contiguous) and K seen
  // as (D, keys), both MN-major
  using MmaQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBM>, _64, Int<kBN>>, GMMA::Major::MN, GMMA::Major::MN>(),
      WG{}));

  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBN>, Int<kD>>{}));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutK{}, make_ordered_layout(Shape<Int<kD>, Int<kBN>>{}, Step<_2, _1>{})));
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBM>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kD>, Int<kBM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // dS as (queries, keys), two buffers (one per step parity: a warpgroup writes the next while the other may
  // still read this one)
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<Int<kBM>, Int<kBN>, _2>{}));
  // lse / delta: a box of kBM + 4 rows (up to 3 rows before the step's first query, see the top), one stage
  // every kLStage floats (TMA writes shared memory at 128-byte aligned addresses)
  static constexpr int kLBox = kBM + 4;
  static constexpr int kLStage = (kLBox + 31) / 32 * 32;
  using SmemLayoutL = Layout<Shape<Int<kLBox>, Int<kStages>>, Stride<_1, Int<kLStage>>>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  struct SharedStorage {
    // K, V, Q, dO (32 KB each) also stage the final dK and dV (64 x 128 fp32 per warpgroup and tensor)
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdS>> ds;
    alignas(128) float dq[kConsumerWGs][kBM][kQRow];
    alignas(128) float lse[kStages * kLStage];
    alignas(128) float delta[kStages * kLStage];
    alignas(16) uint64_t bar_kv;
    typename Pipeline::SharedStorage pipe_q;
    typename Pipeline::SharedStorage pipe_do;
  };
  static_assert(cosize_v<SmemLayoutK> * sizeof(Element) == 64 * kD * sizeof(float), "dK / dV staging");
  static_assert(cosize_v<SmemLayoutQ> * sizeof(Element) == 64 * kD * sizeof(float), "dK / dV staging");

  // [1, Tt, heads, D] rows as (Tt, D, heads, 1) for TMA; ld [2, H, Tpad] as (Tpad, H, 2)
  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStride{}));
  using LTensor = decltype(make_tensor(make_gmem_ptr(static_cast<float const*>(nullptr)),
                                       Shape<int32_t, int32_t, int32_t>{}, Stride<_1, int64_t, int64_t>{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor{}, take<0, 2>(SmemLayoutQ{}),
                                      Shape<Int<kBM>, Int<kD>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor{}, SmemLayoutK{}, Shape<Int<kBN>, Int<kD>>{}, _1{}));
  using TmaL =
      decltype(make_tma_copy(SM90_TMA_LOAD{}, LTensor{}, Layout<Shape<Int<kLBox>>>{}, Shape<Int<kLBox>>{}, _1{}));

  struct Params {
    TmaQ tma_q, tma_do;
    TmaK tma_k, tma_v;
    TmaL tma_l;
    float *dq, *dk, *dv;  // [Tt, H, D], [Tt, HKV, D], [Tt, HKV, D] fp32, added to
    int Tt, Tpad, H, HKV, W;
    int const* cu;
    float scale_log2, scale;
  };
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    band_bwd_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBM = Traits::kBM, kBN = Traits::kBN, kD = Traits::kD;
  using SS = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  extern __shared__ __align__(1024) char smem_raw[];  // the 128-byte swizzled tiles want 1024-byte alignment
  SS& ss = *reinterpret_cast<SS*>(smem_raw);

  const int n_block = blockIdx.x, h = blockIdx.y, seq = blockIdx.z;
  const int hkv = h / (p.H / p.HKV);
  const int W = p.W;
  const int bos = p.cu[seq];
  const int T = p.cu[seq + 1] - bos;
  const int j0 = n_block * kBN;
  if (j0 >= T) return;  // the grid covers the longest sequence
  // the query blocks that see some key of this block: t from j0 to j0 + kBN - 1 + W - 1 (and < T)
  const BwdBlocks plan(j0, kBM, kBN, T, W);
  const int m_lo = plan.m_lo;
  const int n_m = plan.count();

  const int warp_group = threadIdx.x / 128;
  const auto pp = tma_pipe_params<Pipeline>(kBM * kD * sizeof(Element) + Traits::kLBox * sizeof(float),
                                            Traits::kConsumerWGs * 128);  // a row block and its lse / delta
  Pipeline pipe_q(ss.pipe_q, pp, Shape<_1, _1, _1>{});
  Pipeline pipe_do(ss.pipe_do, pp, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_kv, 1);
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutK{});
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sDO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutQ{});

  if (warp_group == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x == 0) {
      Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.Tt, kD, p.H, 1));
      Tensor mDO = p.tma_do.get_tma_tensor(make_shape(p.Tt, kD, p.H, 1));
      Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.Tt, kD, p.HKV, 1));
      Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.Tt, kD, p.HKV, 1));
      Tensor mL = p.tma_l.get_tma_tensor(make_shape(p.Tpad, p.H, 2));
      // rows from the sequence's first; rows past its end (the next sequence's) are masked, past Tt zeros
      auto from = [&](auto const& m) { return domain_offset(make_coord(bos, 0), m); };
      Tensor gQ = local_tile(from(mQ(_, _, h, 0)), Shape<Int<kBM>, Int<kD>>{}, make_coord(_, _0{}));
      Tensor gDO = local_tile(from(mDO(_, _, h, 0)), Shape<Int<kBM>, Int<kD>>{}, make_coord(_, _0{}));
      Tensor gK = local_tile(from(mK(_, _, hkv, 0)), Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, _0{}));
      Tensor gV = local_tile(from(mV(_, _, hkv, 0)), Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, _0{}));
      // step m's lse / delta box starts at row l0 + m kBM, l0 = bos rounded down to a multiple of 4 (16 bytes)
      const int l0 = bos & ~3;
      auto box = [&](int e, int m) {
        return local_tile(domain_offset(make_coord(l0 + m * kBM), mL(_, h, e)), Shape<Int<Traits::kLBox>>{},
                          make_coord(_0{}));
      };
      Tensor sLse = make_tensor(make_smem_ptr(ss.lse), typename Traits::SmemLayoutL{});
      Tensor sDel = make_tensor(make_smem_ptr(ss.delta), typename Traits::SmemLayoutL{});
      auto [tQg, tQs] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tDg, tDs] = tma_partition(p.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sDO), group_modes<0, 2>(gDO));
      auto [tKg, tKs] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_kv, 2 * kBN * kD * sizeof(Element));
      copy(p.tma_k.with(ss.bar_kv), tKg, tKs);
      copy(p.tma_v.with(ss.bar_kv), tVg, tVs);
      PipelineState wq = cutlass::make_producer_start_state<Pipeline>();
      PipelineState wd = cutlass::make_producer_start_state<Pipeline>();
      for (int i = 0; i < n_m; ++i) {
        const int m = m_lo + i;
        pipe_q.producer_acquire(wq);
        copy(p.tma_q.with(*pipe_q.producer_get_barrier(wq)), tQg(_, m), tQs(_, wq.index()));
        {
          auto [tLg, tLs] = tma_partition(p.tma_l, _0{}, Layout<_1>{}, group_modes<0, 1>(sLse), box(0, m));
          copy(p.tma_l.with(*pipe_q.producer_get_barrier(wq)), tLg, tLs(_, wq.index()));
        }
        ++wq;
        pipe_do.producer_acquire(wd);
        copy(p.tma_do.with(*pipe_do.producer_get_barrier(wd)), tDg(_, m), tDs(_, wd.index()));
        {
          auto [tEg, tEs] = tma_partition(p.tma_l, _0{}, Layout<_1>{}, group_modes<0, 1>(sDel), box(1, m));
          copy(p.tma_l.with(*pipe_do.producer_get_barrier(wd)), tEg, tEs(_, wd.index()));
        }
        ++wd;
      }
    }
    return;
  }

  // consumers: warpgroup wg owns keys j0 + 64 wg .. j0 + 64 wg + 63
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int wg = warp_group - 1;
  const int wt = threadIdx.x % 128;
  typename Traits::MmaSdP mma_s;
  typename Traits::MmaKV mma_kv;
  typename Traits::MmaQ mma_q;
  auto thr_s = mma_s.get_thread_slice(wt);
  auto thr_kv = mma_kv.get_thread_slice(wt);
  auto thr_q = mma_q.get_thread_slice(wt);
  Tensor sKw = local_tile(sK, Shape<_64, Int<kD>>{}, make_coord(wg, _0{}));
  Tensor sVw = local_tile(sV, Shape<_64, Int<kD>>{}, make_coord(wg, _0{}));
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQt{});
  Tensor sDOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutQt{});
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKt{});
  Tensor sKtw = local_tile(sKt, Shape<_64, Int<kBN>>{}, make_coord(wg, _0{}));  // D columns 64 wg ..
  Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), typename Traits::SmemLayoutdS{});
  Tensor tSrK = thr_s.partition_fragment_A(sKw);
  Tensor tSrV = thr_s.partition_fragment_A(sVw);
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);
  Tensor tSrDO = thr_s.partition_fragment_B(sDO);
  Tensor tKVrDOt = thr_kv.partition_fragment_B(sDOt);
  Tensor tKVrQt = thr_kv.partition_fragment_B(sQt);
  Tensor tQrdS = thr_q.partition_fragment_A(sdS);
  Tensor tQrKt = thr_q.partition_fragment_B(sKtw);

  Tensor accS = partition_fragment_C(mma_s, Shape<_64, Int<kBM>>{});
  Tensor accdP = partition_fragment_C(mma_s, Shape<_64, Int<kBM>>{});
  Tensor accdV = partition_fragment_C(mma_kv, Shape<_64, Int<kD>>{});
  Tensor accdK = partition_fragment_C(mma_kv, Shape<_64, Int<kD>>{});
  Tensor accdQ = partition_fragment_C(mma_q, Shape<Int<kBM>, _64>{});
  clear(accdV);
  clear(accdK);
  Tensor rP = make_tensor<Element>(accS.layout());
  Tensor rdS = make_tensor<Element>(accdP.layout());
  Tensor tP = make_tensor(rP.data(), acc_to_a(accS.layout()));
  Tensor tdS = make_tensor(rdS.data(), acc_to_a(accdP.layout()));
  // (row, column) views: S^T, dP^T, dS^T rows are keys, columns queries; dQ rows queries, columns D
  Tensor Sr = make_tensor(accS.data(), acc_rowcol(accS.layout()));
  Tensor dPr = make_tensor(accdP.data(), acc_rowcol(accdP.layout()));
  Tensor dSr = make_tensor(rdS.data(), acc_rowcol(accdP.layout()));
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, Int<kBM>>{}));
  Tensor cSr = make_tensor(cS.data(), acc_rowcol(cS.layout()));
  Tensor dQr = make_tensor(accdQ.data(), acc_rowcol(accdQ.layout()));
  Tensor cQ = thr_q.partition_C(make_identity_tensor(Shape<Int<kBM>, _64>{}));
  Tensor cQr = make_tensor(cQ.data(), acc_rowcol(cQ.layout()));
  Tensor dKVr = make_tensor(accdK.data(), acc_rowcol(accdK.layout()));
  Tensor dVr = make_tensor(accdV.data(), acc_rowcol(accdV.layout()));
  Tensor cKV = thr_kv.partition_C(make_identity_tensor(Shape<_64, Int<kD>>{}));
  Tensor cKVr = make_tensor(cKV.data(), acc_rowcol(cKV.layout()));
  constexpr int kRows = decltype(size<0>(Sr))::value;
  constexpr int kCols = decltype(size<1>(Sr))::value;

  const int jw = j0 + 64 * wg;  // this warpgroup's first key
  const float sl2 = p.scale_log2;
  const bool lead = wt < 32;  // warp 0 of the warpgroup issues its bulk reductions
  constexpr int kBarBoth = 0;  // named barriers (cutlass offsets them past its reserved ids)
  const int bar_mine = 1 + wg;

  cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_kv, 0);
  PipelineState rq, rd;
  for (int i = 0; i < n_m; ++i) {
    const int t0 = (m_lo + i) * kBM;
    pipe_q.consumer_wait(rq);
    wgmma<true, -1>(mma_s, tSrK, tSrQ(_, _, _, rq.index()), accS);
    pipe_do.consumer_wait(rd);
    wgmma<true, -1>(mma_s, tSrV, tSrDO(_, _, _, rd.index()), accdP);
    warpgroup_wait<1>();
    // P^T = exp2(S^T scale - lse) on the band: key j, query t with j <= t, t - W < j, t < T
    float const* lse = ss.lse + rq.index() * Traits::kLStage + (bos & 3);
    const bool inside = bwd_whole(t0, kBM, jw, 64, T, W);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int j = jw + get<0>(cSr(r, 0));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int tl = get<1>(cSr(r, c));
        const int t = t0 + tl;
        const float e = fast_exp2(Sr(r, c) * sl2 - lse[tl]);
        Sr(r, c) = inside || bwd_keep(t, j, T, W) ? e : 0.f;
      }
    }
    warpgroup_wait<0>();
    // dS^T = P^T (dP^T - delta)
    float const* delta = ss.delta + rd.index() * Traits::kLStage + (bos & 3);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) dPr(r, c) = Sr(r, c) * (dPr(r, c) - delta[get<1>(cSr(r, c))]);
    }
    acc_to_regs<Element>(accS, rP);
    acc_to_regs<Element>(accdP, rdS);
    // dS as (query, key) into this step's buffer, for dQ = dS K over both warpgroups' keys; before the dK
    // product below, which reads the same registers asynchronously (reading a wgmma's A registers before its
    // wait is undefined). A thread's columns c, c + 1 are queries t, t + 1 of one key: adjacent in the
    // query-major buffer, so one 4-byte store each (tests/csrc/sm90_host_checks.cu checks the adjacency)
    const int buf = i % 2;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; c += 2) {
        cutlass::Array<Element, 2> pair;
        pair[0] = dSr(r, c);
        pair[1] = dSr(r, c + 1);
        *reinterpret_cast<cutlass::Array<Element, 2>*>(&sdS(get<1>(cSr(r, c)), 64 * wg + get<0>(cSr(r, c)), buf)) =
            pair;
      }
    }
    wgmma<false, -1>(mma_kv, tP, tKVrDOt(_, _, _, rd.index()), accdV);
    wgmma<false, -1>(mma_kv, tdS, tKVrQt(_, _, _, rq.index()), accdK);
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(256, kBarBoth);
    wgmma<true, -1>(mma_q, tQrdS(_, _, _, buf), tQrKt, accdQ);
    warpgroup_wait<0>();
    pipe_q.consumer_release(rq);
    ++rq;
    pipe_do.consumer_release(rd);
    ++rd;
    // dQ (times the scale) through the staging rows into the global fp32 dq: the last reductions must have
    // read the staging first
    if (lead) tma_store_wait<0>();
    cutlass::arch::NamedBarrier::sync(128, bar_mine);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < decltype(size<0>(dQr))::value; ++r) {
      const int row = get<0>(cQr(r, 0));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < decltype(size<1>(dQr))::value; c += 2) {
        float2 pair = make_float2(dQr(r, c) * p.scale, dQr(r, c + 1) * p.scale);
        *reinterpret_cast<float2*>(&ss.dq[wg][row][get<1>(cQr(r, c))]) = pair;
      }
    }
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(128, bar_mine);
    if (lead) {
      for (int row = wt; row < kBM; row += 32) {
        if (t0 + row < T) {
          bulk_add_f32(p.dq + (int64_t(bos + t0 + row) * p.H + h) * kD + 64 * wg, &ss.dq[wg][row][0], 64 * 4);
        }
      }
      tma_store_arrive();
    }
  }

  // dK (times the scale) and dV of this warpgroup's keys into the global fp32 dk, dv: staged in K / V (dK,
  // dV of warpgroup 0) and Q / dO (warpgroup 1) once both warpgroups are done with them
  cutlass::arch::NamedBarrier::sync(256, kBarBoth);
  float* stage_k = reinterpret_cast<float*>(wg == 0 ? ss.k.data() : ss.q.data());
  float* stage_v = reinterpret_cast<float*>(wg == 0 ? ss.v.data() : ss.dout.data());
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < decltype(size<0>(dKVr))::value; ++r) {
    const int row = get<0>(cKVr(r, 0));
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < decltype(size<1>(dKVr))::value; c += 2) {
      const int d = get<1>(cKVr(r, c));
      *reinterpret_cast<float2*>(stage_k + row * kD + d) = make_float2(dKVr(r, c) * p.scale, dKVr(r, c + 1) * p.scale);
      *reinterpret_cast<float2*>(stage_v + row * kD + d) = make_float2(dVr(r, c), dVr(r, c + 1));
    }
  }
  cutlass::arch::fence_view_async_shared();
  cutlass::arch::NamedBarrier::sync(128, bar_mine);
  if (lead) {
    for (int row = wt; row < 64; row += 32) {
      const int j = jw + row;
      if (j < T) {
        const int64_t off = (int64_t(bos + j) * p.HKV + hkv) * kD;
        bulk_add_f32(p.dk + off, stage_k + row * kD, kD * 4);
        bulk_add_f32(p.dv + off, stage_v + row * kD, kD * 4);
      }
    }
    tma_store_arrive();
    tma_store_wait<0>();  // shared memory stays until the reductions have read it
  }
#endif
}

// One band backward call, host side: q, dout [Tt, H, D], k, v [Tt, HKV, D] (input dtype, contiguous); ld [2, H,
// Tpad] fp32 (lse in the log2 domain, delta); dq [Tt, H, D], dk, dv [Tt, HKV, D] fp32, added to; cu [n_seq + 1]
template <class Element>
struct BwdProblem {
  Element const *q, *k, *v, *dout;
  float const* ld;
  float *dq, *dk, *dv;
  int Tt, Tpad, H, HKV, W;
  int const* cu;
  int n_seq, max_T;
};

template <class Element>
void launch_bwd(BwdProblem<Element> const& f, cudaStream_t stream) {
  using Traits = BandBwdTraits<Element>;
  constexpr int kD = Traits::kD;
  static_assert(sizeof(typename Traits::SharedStorage) <= 227 * 1024, "shared memory per CTA");
  typename Traits::Params p{};
  const auto sq = take<0, 2>(typename Traits::SmemLayoutQ{});
  const auto q_tile = Shape<Int<Traits::kBM>, Int<kD>>{};
  const auto k_tile = Shape<Int<Traits::kBN>, Int<kD>>{};
  p.tma_q = tma_rows(f.q, f.Tt, f.H, 1, sq, q_tile);
  p.tma_do = tma_rows(f.dout, f.Tt, f.H, 1, sq, q_tile);
  p.tma_k = tma_rows(f.k, f.Tt, f.HKV, 1, typename Traits::SmemLayoutK{}, k_tile);
  p.tma_v = tma_rows(f.v, f.Tt, f.HKV, 1, typename Traits::SmemLayoutK{}, k_tile);
  p.tma_l = make_tma_copy(SM90_TMA_LOAD{},
                          make_tensor(make_gmem_ptr(f.ld), make_shape(f.Tpad, f.H, 2),
                                      make_stride(_1{}, int64_t(f.Tpad), int64_t(f.Tpad) * f.H)),
                          Layout<Shape<Int<Traits::kLBox>>>{}, Shape<Int<Traits::kLBox>>{}, _1{});
  p.dq = f.dq, p.dk = f.dk, p.dv = f.dv;
  p.Tt = f.Tt, p.Tpad = f.Tpad, p.H = f.H, p.HKV = f.HKV, p.W = f.W, p.cu = f.cu;
  p.scale = float(1.0 / sqrt(double(kD)));
  p.scale_log2 = float(1.4426950408889634 / sqrt(double(kD)));
  auto kernel = band_bwd_kernel<Traits>;
  const int smem = sizeof(typename Traits::SharedStorage);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid((f.max_T + Traits::kBN - 1) / Traits::kBN, f.H, f.n_seq);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
}

}  // namespace ahn_sm90
