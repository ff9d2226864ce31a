// Window + sinks attention forward for sm_90a (H100 / H200): query t attends keys j <= t with t - W < j (the
// band) or j < S (the sinks).
//
// The Hopper forward engine (benchmarks/NOTES_prefill.md, "Our own kernel"): one CTA per
// (128-row query block, head, batch) with a producer warp that brings Q once and the band's K, V tiles
// through a two-stage TMA pipeline, and two consumer warpgroups of 64 rows each running wgmma: S = Q K^T
// from shared memory, the online softmax in registers, O += P V with P straight from the registers. Inside a
// warpgroup the next block's Q K^T is issued before this block's P V, so the softmax of one block runs
// while the tensor cores work on the other; with ping-pong (variants 1 and 2) the two warpgroups also take
// turns issuing their products (named barriers), so one's softmax runs under the other's GEMMs. Key blocks go from the diagonal
// (causal mask) down to the window's left edge (left mask), then the sink blocks below the band (masked);
// the blocks between need no mask.
//
// Out: o (the normalised attention output, [B, T, H, D], the input dtype) and lse ([B, H, T], fp32, natural
// log), what cuDNN's band gives the fused AHN forward on its default Hopper path.
//
// Sequences: one per batch row, or varlen (Params::cu): packed along the rows of one batch row, a CTA's rows
// counted from its sequence's first.
//
// kMemory: the AHN memory readout and epilogue in the consumer, what the Triton combine kernel does behind
// cuDNN's band. Each warpgroup's 64 rows are one memory chunk c: with the memory passes' gc (in-chunk cumsum
// of the log-decays), hs[c] (the state before the chunk) and v_new, mo = (q_n e^gc) hs[c] + ((q_n k_n^T) *
// e^(gc_i - gc_j), j <= i) v_new, where q_n is q normalised times mem_scale and k_n the normalised key of the
// token at position P + t - W (active when that is >= S); then (GDN / DN) out = o + (RMSNorm(mo) * nw *
// swish(z)) @ ow[h], or (Mamba2) the projection and the sum of squares its cross-head norm needs. The states
// (both chunks) come by TMA at the start (beside the memory passes: once their ready counters say so), o_weight,
// the chunk keys and v_new through the K / V stages the band has freed; the output rows leave through the Q tile.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "band_plan.h"

namespace ahn_sm90 {

using namespace cute;

template <class Element_, bool kMemory_ = false, int kBM_ = 128, int kBN_ = 128, int kD_ = 128, int kStages_ = 2>
struct BandTraits {
  using Element = Element_;
  static constexpr bool kMemory = kMemory_;
  static constexpr int kBM = kBM_, kBN = kBN_, kD = kD_, kStages = kStages_;
  static constexpr int kChunk = 64;  // the memory's chunk: one consumer warpgroup's rows
  static constexpr int kConsumerWGs = kBM / 64;
  static constexpr int kThreads = 128 * (kConsumerWGs + 1);
  // the memory path: one 64-row chunk per consumer warpgroup, two of them; v_new's kBM-row box goes through a V
  // stage, whose barrier expects kBN rows
  static_assert(!kMemory || (kBM == kBN && kConsumerWGs == 2), "the memory path wants kBM == kBN == 128");
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

  // the memory's products, one warpgroup each: q k_n^T (64 x 64, K = D); q hs and the new values' and the
  // projection's (64 x D, B operands [K, D] with D contiguous, read MN-major)
  using WG = Layout<Shape<_1, _1, _1>>;
  using MmaQKm = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, _64, Int<kD>>, GMMA::Major::K, GMMA::Major::K>(),
      WG{}));
  using MmaQH = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kD>, Int<kD>>, GMMA::Major::K, GMMA::Major::MN>(),
      WG{}));
  using MmaRS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kD>, Int<kD>>, GMMA::Major::K, GMMA::Major::MN>(),
      WG{}));
  // the two chunks' states [D, D] (rows: the key dimension), and seen as B operands (N = value dim, K = key dim)
  using SmemLayoutHs = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kD>, Int<kD>, _2>{}));
  using SmemLayoutHst = decltype(composition(
      SmemLayoutHs{}, make_ordered_layout(Shape<Int<kD>, Int<kD>, _2>{}, Step<_2, _1, _3>{})));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutV>> v;
    alignas(1024) cute::array_aligned<Element, kMemory ? cosize_v<SmemLayoutHs> : 8> hs;
    float row_q[2][kChunk];   // per chunk row: mem_scale / |q|
    float col_k[2][kChunk];   // per chunk key: 1 / |k|, 0 for an inactive key (t - W < S)
    float gcs[2][kChunk];     // gc
    alignas(16) uint64_t bar_q;
    alignas(16) uint64_t bar_h;
    int mem_ok;  // the producer's verdict on the memory's chunks (the ready counters), for the consumers
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
    TmaKV tma_k, tma_v, tma_sk, tma_sv;  // the key streams, the sink source
    Element* o;
    float* lse;
    int B, T, H, HKV, W, S;
    int k_rows, k_batch, s_rows;  // the key streams' (rows, batch rows), the sink source's rows per batch row
    float scale_log2;
    // varlen: sequences packed along T of one batch row (B = 1), sequence n the rows cu[n] .. cu[n + 1] - 1,
    // one per blockIdx.z; its memory chunks follow the earlier sequences' in hs, from chunk_start[n *
    // chunk_stride] (kMemory). nullptr: B rows of T each.
    int const* cu;
    int const* chunk_start;
    int64_t chunk_stride;
    // the cache path: sequence b's queries at positions pos[b] ..; nullptr: a prefill from position 0
    int64_t const* pos;
    // the grid's order: (heads, row blocks, sequences) instead of (row blocks, heads, sequences). CTAs start in
    // grid order, so the row blocks then advance through the sequence for all heads at once: the order the
    // state chain beside the kernel makes the memory's chunks ready in (Params::ready)
    bool rows_outer;
    // kMemory: v_new [B, T, H, D] (as Q), hs [hs_rows, H, D, D] and o_weight [H, D, D] as (D, D, H, rows)
    TmaQ tma_vn;
    TmaKV tma_hs, tma_ow;
    float const* gc;           // [B, T, H]
    Element const* z;          // [B, T, H]
    float const* nw;           // [D]
    float mem_scale;
    int NT;                    // chunks per batch row (equal lengths)
    int hs_rows;               // hs's chunks, all sequences'
    bool use_h0;               // the memory starts from an initial state: every row reads it
    // Mamba2 (yp != nullptr): its RMSNorm spans the token's H heads, so the kernel stops before it: o gets the
    // window's output alone, yp [B, T, H, D] the projection of x nw[h] (x = m swish(z)), ss [B, T, H] fp32 the
    // sum of x^2 over D (the norm kernel after it adds rsqrt(sum_h ss / (H D) + eps) yp); q, k F.normalized
    Element* yp;
    float* ss;
    // The memory passes beside the kernel: ready [chunks * H] counters (the state chain's, ready_target when
    // a chunk's hs and v_new are stored). A tile whose chunks are not ready when its band is done stores o
    // and lse and sets deferred[tile] (never waits: CTAs spinning on another kernel could hold every SM);
    // mem_only: a second launch, after the memory passes, that adds the memory to the deferred tiles only.
    int const* ready;
    int ready_target;
    uint8_t* deferred;
    bool mem_only;
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

// shared-memory accesses through a pointer computed by a swizzled layout, explicitly in the shared state space
// (through the generic one the compiler cannot prove them shared and emits generic loads and stores)
CUTE_DEVICE uint4 lds128(void const* ptr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(cast_smem_ptr_to_uint(ptr))
               : "memory");
  return v;
}

CUTE_DEVICE void sts32(void* ptr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(cast_smem_ptr_to_uint(ptr)), "r"(v) : "memory");
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

// P-like conversion: an fp32 accumulator ((2, 2, V), 1, 1) to input-dtype A-operand registers
template <class Element, class Acc, class Frag>
CUTE_DEVICE void acc_to_regs(Acc const& acc, Frag& frag) {
  constexpr int N = decltype(size(acc))::value;
  cutlass::NumericArrayConverter<Element, float, N> cvt;
  *reinterpret_cast<cutlass::Array<Element, N>*>(frag.data()) =
      cvt(*reinterpret_cast<cutlass::Array<float, N> const*>(acc.data()));
  warpgroup_fence_operand(frag);
}

// a TMA pipeline's parameters for this thread: warpgroup 0 produces (its thread 0 the leader), the rest consume
template <class Pipeline>
CUTE_DEVICE typename Pipeline::Params tma_pipe_params(uint32_t stage_bytes, int consumer_threads) {
  typename Pipeline::Params pp;
  pp.transaction_bytes = stage_bytes;
  pp.role = threadIdx.x < 128 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = consumer_threads;
  return pp;
}

// kVariant: 0, the warpgroups issue their products independently; 1, they take turns (ping-pong); 2, ping-pong with
// the softmax's row max and row sum in four interleaved partials (below)
template <class Traits, int kVariant>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    band_fwd_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  constexpr bool kPingPong = kVariant >= 1;
// wgmma, TMA and setmaxnreg exist only on sm_90a: the other targets of a multi-arch build get an empty kernel
// (the op refuses other devices before launching)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBM = Traits::kBM, kBN = Traits::kBN, kD = Traits::kD;
  using SS = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  extern __shared__ __align__(1024) char smem_raw[];  // the 128-byte swizzled tiles want 1024-byte alignment
  SS& ss = *reinterpret_cast<SS*>(smem_raw);

  const int m_block = p.rows_outer ? blockIdx.y : blockIdx.x, h = p.rows_outer ? blockIdx.x : blockIdx.y;
  const int n_mblocks = p.rows_outer ? gridDim.y : gridDim.x;
  const int seq = blockIdx.z;
  const int hkv = h / (p.H / p.HKV);
  const int W = p.W, S = p.S;
  const int row0 = m_block * kBM;
  // this CTA's sequence: q's batch row b, its rows bos .. bos + T - 1 of that row (rows t relative to bos)
  const int b = p.cu ? 0 : seq;
  const int bos = p.cu ? p.cu[seq] : 0;
  const int T = p.cu ? p.cu[seq + 1] - bos : p.T;
  if (row0 >= T) return;  // the grid covers the longest sequence
  const int64_t grow0 = int64_t(b) * p.T + bos;  // the sequence's first row in [B, T, ...] tensors
  // query t sits at position P + t. Its keys: key j (j <= t, t - W < j, P + j >= 0) of the sequence's key
  // stream at row k_bos + j of k's batch row kb; the sinks (position s < S, s <= P + t - W: outside the
  // window) at row s_bos + s of the sink source's batch row b. A prefill: P = 0, the stream and the sink
  // source are q's own rows in k; the cache path: the stream is the ring tail (j = -W .. -1) then the new
  // tokens, the sinks come from the cache's sink buffer.
  const int P = p.pos ? int(p.pos[seq]) : 0;
  const int kb = p.pos ? 0 : b;
  const int k_bos = p.pos ? seq * (W + T) + W : bos;
  const int s_bos = p.pos ? 0 : bos;
  // the band's key blocks from the diagonal down, then the sink blocks (band_plan.h)
  const FwdBlocks plan(row0, kBM, kBN, T, W, S, P);
  // kMemory: do rows up to t read the memory? Row t reads the memory token P + t - W when that is >= S, and
  // the initial state whatever its position. (This block: then the memory operands come; a chunk of 64 rows:
  // then its warpgroup reads them, and the producer waits for its state where the passes run beside.)
  auto reads_memory = [&](int t) { return Traits::kMemory && (p.use_h0 || P + t - W >= S); };
  const bool cta_mem = reads_memory(plan.t_hi);
  auto chunk_reads_memory = [&](int c) { return reads_memory(min(c * Traits::kChunk + Traits::kChunk - 1, T - 1)); };
  const int64_t tile = (int64_t(seq) * p.H + h) * n_mblocks + m_block;
  const bool mem_only = Traits::kMemory && p.mem_only;
  if (mem_only && !(cta_mem && p.deferred[tile])) return;
  const int n_run = mem_only ? 0 : plan.count();  // the key blocks this launch walks

  const int warp_group = threadIdx.x / 128;
  const auto pk = tma_pipe_params<Pipeline>(kBN * kD * sizeof(Element), Traits::kConsumerWGs * 128);
  Pipeline pipe_k(ss.pipe_k, pk, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pk, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_q, 1);
    cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_h, 1);
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
      Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.T, kD, p.H, p.B));
      Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.k_rows, kD, p.HKV, p.k_batch));
      Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.k_rows, kD, p.HKV, p.k_batch));
      Tensor mSK = p.tma_sk.get_tma_tensor(make_shape(p.s_rows, kD, p.HKV, p.B));
      Tensor mSV = p.tma_sv.get_tma_tensor(make_shape(p.s_rows, kD, p.HKV, p.B));
      // rows from the sequence's first (row 0 = its first query, key 0, sink 0): rows past its end (the next
      // sequence's under varlen) are masked or not stored; keys before its stream (j < -P) are never read
      auto from = [&](int r0, auto const& m) { return domain_offset(make_coord(r0, 0), m); };
      Tensor gQ = local_tile(from(bos, mQ(_, _, h, b)), Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));
      Tensor gK = local_tile(from(k_bos, mK(_, _, hkv, kb)), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      Tensor gV = local_tile(from(k_bos, mV(_, _, hkv, kb)), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      Tensor gSK = local_tile(from(s_bos, mSK(_, _, hkv, b)), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      Tensor gSV = local_tile(from(s_bos, mSV(_, _, hkv, b)), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tKg, tKs] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      auto [tSKg, tSKs] = tma_partition(p.tma_sk, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gSK));
      auto [tSVg, tSVs] = tma_partition(p.tma_sv, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gSV));
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_q, kBM * kD * sizeof(Element));
      copy(p.tma_q.with(ss.bar_q), tQg, tQs);
      // the two chunks' states (a chunk past the sequence's last reads that one: rows past T); at the start,
      // unless the memory passes run beside this launch (then after the ready counters were read)
      constexpr int kC = Traits::kChunk;
      int chunk0 = b * p.NT;  // the sequence's first chunk in hs
      if constexpr (Traits::kMemory) {
        if (p.cu) chunk0 = p.chunk_start[blockIdx.z * p.chunk_stride];
      }
      const int last = (T + kC - 1) / kC - 1;
      auto chunk_of = [&](int i) { return min(2 * m_block + i, last); };
      auto load_states = [&]() {
        Tensor mH = p.tma_hs.get_tma_tensor(make_shape(Int<kD>{}, Int<kD>{}, p.hs_rows * p.H, 1));
        Tensor sH = make_tensor(make_smem_ptr(ss.hs.data()), typename Traits::SmemLayoutHs{});
        auto [tHg, tHs] = tma_partition(p.tma_hs, _0{}, Layout<_1>{}, group_modes<0, 2>(sH),
                                        group_modes<0, 2>(mH(_, _, _, 0)));
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_h, 2 * kD * kD * sizeof(Element));
        for (int i = 0; i < 2; ++i) copy(p.tma_hs.with(ss.bar_h), tHg(_, (chunk0 + chunk_of(i)) * p.H + h), tHs(_, i));
      };
      // are the chunks the warpgroups read stored yet? (their ready counters, read with acquire; then the async
      // proxy's view of global memory ordered after those reads for the TMA loads of the chunks' data)
      auto chunks_ready = [&]() {
        bool ok = true;
        for (int i = 0; i < 2; ++i) {
          const int c = chunk_of(i);
          if (chunk_reads_memory(c)) {
            int n;
            asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(n) : "l"(p.ready + (chunk0 + c) * p.H + h)
                         : "memory");
            ok &= n >= p.ready_target;
          }
        }
        if (ok) asm volatile("fence.proxy.async.global;" ::: "memory");
        return ok;
      };
      // the states at the start without the passes beside the launch; beside them, as soon as the counters say
      // so: first once the first key blocks' loads are issued (the chain usually runs well ahead of the rows,
      // and a state load issued after the band's last loads arrived after the band: 64 KB from memory per CTA),
      // else after the band's loads
      bool h_loaded = false;
      auto states_early = [&]() {
        if (cta_mem && !h_loaded && (p.ready == nullptr || chunks_ready())) {
          load_states();
          h_loaded = true;
        }
      };
      if (p.ready == nullptr) states_early();
      PipelineState wk = cutlass::make_producer_start_state<Pipeline>();
      PipelineState wv = cutlass::make_producer_start_state<Pipeline>();
      for (int i = 0; i < n_run; ++i) {
        if (i == Traits::kStages) states_early();  // the producer would wait for a free stage here anyway
        const int n = plan.block(i);
        pipe_k.producer_acquire(wk);
        if (plan.is_band(i)) {
          copy(p.tma_k.with(*pipe_k.producer_get_barrier(wk)), tKg(_, n), tKs(_, wk.index()));
        } else {
          copy(p.tma_sk.with(*pipe_k.producer_get_barrier(wk)), tSKg(_, n), tSKs(_, wk.index()));
        }
        ++wk;
        pipe_v.producer_acquire(wv);
        if (plan.is_band(i)) {
          copy(p.tma_v.with(*pipe_v.producer_get_barrier(wv)), tVg(_, n), tVs(_, wv.index()));
        } else {
          copy(p.tma_sv.with(*pipe_v.producer_get_barrier(wv)), tSVg(_, n), tSVs(_, wv.index()));
        }
        ++wv;
      }
      if (cta_mem) {
        const bool ok = h_loaded || chunks_ready();  // (the counters read once more where they were not ready)
        ss.mem_ok = ok;  // before the o_weight stage's arrive, which releases it to the consumers
        // o_weight[h] into the next K stage; the chunks' keys (rows row0 - W .., negative rows read zeros) into
        // the one after; the chunks' v_new rows into the next V stage (not for a deferred tile)
        Tensor mO = p.tma_ow.get_tma_tensor(make_shape(Int<kD>{}, Int<kD>{}, p.H, 1));
        auto [tOg, tOs] = tma_partition(p.tma_ow, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                        group_modes<0, 2>(mO(_, _, h, 0)));
        pipe_k.producer_acquire(wk);
        copy(p.tma_ow.with(*pipe_k.producer_get_barrier(wk)), tOg, tOs(_, wk.index()));
        ++wk;
        if (!ok) return;
        if (!h_loaded) load_states();
        Tensor gKm = local_tile(from(k_bos + row0 - W, mK(_, _, hkv, kb)),
                                Shape<Int<kBN>, Int<kD>>{}, make_coord(0, 0));
        auto [tKmg, tKms] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                          group_modes<0, 2>(gKm));
        pipe_k.producer_acquire(wk);
        copy(p.tma_k.with(*pipe_k.producer_get_barrier(wk)), tKmg, tKms(_, wk.index()));
        ++wk;
        Tensor mVn = p.tma_vn.get_tma_tensor(make_shape(p.T, kD, p.H, p.B));
        Tensor gVn = local_tile(from(bos, mVn(_, _, h, b)), Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));
        auto [tVng, tVns] = tma_partition(p.tma_vn, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                          group_modes<0, 2>(gVn));
        pipe_v.producer_acquire(wv);
        copy(p.tma_vn.with(*pipe_v.producer_get_barrier(wv)), tVng, tVns(_, wv.index()));
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

  // mask the keys of the i-th key block that row t does not attend (band_plan.h, the rule the host checks run);
  // a band block inside every row's window, or a sink block below every row's window, needs none
  auto mask = [&](int i) {
    if (plan.whole(i)) return;
    const int key0 = plan.block(i) * kBN;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int t = row0 + get<0>(cSrc(r, 0));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        if (!plan.keep(i, t, key0 + get<1>(cSrc(r, c)))) Sacc(r, c) = -INFINITY;
      }
    }
  };
  // online softmax of the scores (in place: they become P); rescale gets the factors of the output so far
  // kVariant 2: the row max and the row sum over a thread's kCols columns in kPart interleaved partials. One running
  // max or sum is a chain of kCols dependent instructions per row and block, the softmax's largest stall in Nsight
  // Compute's samples (each FMNMX / FADD waiting on the one before) while the other warpgroup's products run
  constexpr int kPart = kVariant == 2 ? 4 : 1;
  static_assert(kCols % kPart == 0);
  auto softmax = [&](float (&rescale)[kRows]) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mp[kPart];
      CUTLASS_PRAGMA_UNROLL
      for (int a = 0; a < kPart; ++a) mp[a] = row_max[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) mp[c % kPart] = fmaxf(mp[c % kPart], Sacc(r, c));
      CUTLASS_PRAGMA_UNROLL
      for (int w = kPart / 2; w >= 1; w /= 2) {
        CUTLASS_PRAGMA_UNROLL
        for (int a = 0; a < w; ++a) mp[a] = fmaxf(mp[a], mp[a + w]);
      }
      const float mx = quad_max(mp[0]);
      const float m_scaled = mx == -INFINITY ? 0.f : mx * sl2;
      rescale[r] = fast_exp2(row_max[r] * sl2 - m_scaled);
      row_max[r] = mx;
      float sp[kPart];
      CUTLASS_PRAGMA_UNROLL
      for (int a = 0; a < kPart; ++a) sp[a] = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const float e = fast_exp2(Sacc(r, c) * sl2 - m_scaled);
        Sacc(r, c) = e;
        sp[c % kPart] += e;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int w = kPart / 2; w >= 1; w /= 2) {
        CUTLASS_PRAGMA_UNROLL
        for (int a = 0; a < w; ++a) sp[a] += sp[a + w];
      }
      row_sum[r] = row_sum[r] * rescale[r] + sp[0];
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
    if (wg == 1 && n_run > 0) cutlass::arch::NamedBarrier::arrive(256, 0);
  }

  // kMemory: the read gate z of this thread's two rows of the epilogue's products, an input, so loaded before
  // the band rather than on the epilogue's path
  float zrow[2] = {0.f, 0.f};
  if constexpr (Traits::kMemory) {
    if (cta_mem) {
      typename Traits::MmaQH mma_z;
      Tensor cZ = mma_z.get_thread_slice(tid % 128).partition_C(make_identity_tensor(Shape<_64, Int<kD>>{}));
      Tensor cZrc = make_tensor(cZ.data(), acc_rowcol(cZ.layout()));
      static_assert(decltype(size<0>(cZrc))::value == 2);
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int t = row0 + wg * Traits::kChunk + get<0>(cZrc(r, 0));
        if (t < T) zrow[r] = float(p.z[(grow0 + t) * p.H + h]);
      }
    }
  }

  clear(tOrO);
  PipelineState rk, rv;
  cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_q, 0);
  float rescale[kRows];

  if (n_run > 0) {  // the band (a memory-only launch has none)
  pipe_k.consumer_wait(rk);
  my_turn();
  wgmma<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), tSrS);
  your_turn(false);
  warpgroup_wait<0>();
  pipe_k.consumer_release(rk);
  ++rk;
  mask(0);
  softmax(rescale);
  to_p();
  for (int i = 1; i < n_run; ++i) {
    pipe_k.consumer_wait(rk);
    pipe_v.consumer_wait(rv);
    my_turn();
    wgmma<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), tSrS);
    wgmma<false, -1>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), tOrO);
    your_turn(false);
    warpgroup_wait<1>();
    pipe_k.consumer_release(rk);
    ++rk;
    mask(i);
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
  ++rv;
  }

  // o = acc / l (+ the memory's share), lse = m * scale + log l; rows past T are not stored
  float inv[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_sum[r] = quad_sum(row_sum[r]);
    inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
  }
  // [B, T, H, D] rows of this warpgroup (value(r, c) of the accumulator layout) through its own 64 rows of the
  // Q tile, which its products have finished reading, then to global memory 16 bytes a thread: stored from the
  // accumulator layout a warp writes 16 of every 32-byte sector it touches (a quad's column pairs of 8 rows)
  constexpr int kOCols = decltype(size<1>(O))::value;
  auto store_rows = [&](Element* dst, auto const& value) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int i = get<0>(cOrc(r, 0));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kOCols; c += 2) {
        cutlass::Array<Element, 2> v;
        v[0] = Element(value(r, c));
        v[1] = Element(value(r, c + 1));
        sts32(&sQ(i, get<1>(cOrc(r, c))), reinterpret_cast<uint32_t const&>(v));
      }
    }
    cutlass::arch::NamedBarrier::sync(128, 2 + wg);
    constexpr int kPieces = kD / 8;  // 16-byte pieces per row
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 64 * kPieces / 128; ++j) {
      const int k = j * 128 + tid % 128, i = wg * 64 + k / kPieces, d = k % kPieces * 8;
      if (row0 + i < T) {
        *reinterpret_cast<uint4*>(dst + ((grow0 + row0 + i) * p.H + h) * kD + d) = lds128(&sQ(i, d));
      }
    }
    cutlass::arch::NamedBarrier::sync(128, 2 + wg);  // read before the rows are staged again
  };
  // (a memory-only launch adds the memory's share to the o the first launch stored, and stores no lse)
  auto store = [&](auto const& extra) {
    const int lane = threadIdx.x % 32;
    if (!mem_only) store_rows(p.o, [&](int r, int c) { return O(r, c) * inv[r] + extra(r, c); });
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int t = row0 + get<0>(cOrc(r, 0));
      if (t < T) {
        if (mem_only) {
          Element* orow = p.o + ((grow0 + t) * p.H + h) * kD;
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < kOCols; c += 2) {
            auto& pair = *reinterpret_cast<cutlass::Array<Element, 2>*>(orow + get<1>(cOrc(r, c)));
            const cutlass::Array<Element, 2> old = pair;
            cutlass::Array<Element, 2> out;
            out[0] = Element(float(old[0]) + extra(r, c));
            out[1] = Element(float(old[1]) + extra(r, c + 1));
            pair = out;
          }
        }
        if (lane % 4 == 0 && !mem_only) {
          const float l = row_sum[r];
          p.lse[(int64_t(b) * p.H + h) * p.T + bos + t] =
              l > 0.f ? (row_max[r] * sl2 + log2f(l)) * 0.69314718055994531f : -INFINITY;
        }
      }
    }
  };
  if constexpr (!Traits::kMemory) {
    store([](int, int) { return 0.f; });
  } else {
    constexpr int kC = Traits::kChunk;
    const bool mamba2 = p.yp != nullptr;
    const int wt = tid % 128;  // thread in its warpgroup
    const int crow0 = row0 + wg * kC;
    const bool do_mem = chunk_reads_memory(2 * m_block + wg);
    Tensor Yacc = partition_fragment_C(typename Traits::MmaRS{}, Shape<_64, Int<kD>>{});
    clear(Yacc);
    float x2[kRows] = {};  // Mamba2: sum_D x^2 of the thread's rows
    bool deferred = false;
    if (cta_mem) {
      // the stages: o_weight, the chunk keys (K pipeline), v_new (V pipeline); the states. Past o_weight's
      // wait the producer's verdict on the chunks is visible: a deferred tile gets nothing more
      PipelineState r_ow = rk;
      pipe_k.consumer_wait(r_ow);
      ++rk;
      deferred = !ss.mem_ok;
      PipelineState r_km = rk;
      if (!deferred) {
      pipe_k.consumer_wait(r_km);
      ++rk;
      pipe_v.consumer_wait(rv);
      cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_h, 0);
      }
      if (do_mem && !deferred) {
        Tensor sQwg = local_tile(sQ, Shape<_64, Int<kD>>{}, make_coord(wg, _0{}));
        Tensor sKm = local_tile(sK(_, _, r_km.index()), Shape<_64, Int<kD>>{}, make_coord(wg, _0{}));
        Tensor sVnt = local_tile(sVt(_, _, rv.index()), Shape<Int<kD>, _64>{}, make_coord(_0{}, wg));
        Tensor sHst = make_tensor(make_smem_ptr(ss.hs.data()), typename Traits::SmemLayoutHst{})(_, _, wg);
        Tensor sOwt = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutVt{})(_, _, r_ow.index());
        typename Traits::MmaQKm mma_x;
        typename Traits::MmaQH mma_h;
        typename Traits::MmaRS mma_rs;
        auto thr_x = mma_x.get_thread_slice(wt);
        auto thr_h = mma_h.get_thread_slice(wt);
        auto thr_rs = mma_rs.get_thread_slice(wt);
        Tensor Xacc = partition_fragment_C(mma_x, Shape<_64, _64>{});
        Tensor Macc = partition_fragment_C(mma_h, Shape<_64, Int<kD>>{});
        // q k^T and q hs[c], raw: the normalisations and decays are row / column scales (issued first: the
        // norms below run while the tensor cores work; both only read the tiles)
        wgmma<true, -1>(mma_x, thr_x.partition_fragment_A(sQwg), thr_x.partition_fragment_B(sKm), Xacc);
        wgmma<true, -1>(mma_h, thr_h.partition_fragment_A(sQwg), thr_h.partition_fragment_B(sHst), Macc);
        // per row and per key: |q|, |k| (two threads per row, 64 columns each), gc
        {
          const int i = wt / 2, half = wt % 2;
          const int t = crow0 + i;
          // gc's load first: its latency runs under the norms' shared-memory reads
          const float gci = half == 0 && t < T ? p.gc[(grow0 + t) * p.H + h] : 0.f;
          float sq = 0.f, sk = 0.f;
          // 16-byte reads: the 128-byte swizzle moves whole 16-byte groups of 8 columns, so each group's
          // columns d .. d + 7 are contiguous from &tile(i, d)
          CUTLASS_PRAGMA_UNROLL
          for (int d = half * (kD / 2); d < (half + 1) * (kD / 2); d += 8) {
            const uint4 xr = lds128(&sQwg(i, d)), yr = lds128(&sKm(i, d));
            const auto& x = reinterpret_cast<cutlass::Array<Element, 8> const&>(xr);
            const auto& y = reinterpret_cast<cutlass::Array<Element, 8> const&>(yr);
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < 8; ++e) {
              sq += float(x[e]) * float(x[e]);
              sk += float(y[e]) * float(y[e]);
            }
          }
          sq += __shfl_xor_sync(0xffffffff, sq, 1);
          sk += __shfl_xor_sync(0xffffffff, sk, 1);
          if (half == 0) {
            // GDN / DN l2norm 1 / sqrt(sum x^2 + 1e-6); Mamba2 F.normalize 1 / max(|x|, 1e-12)
            auto inv_norm = [&](float x2) { return mamba2 ? 1.f / fmaxf(sqrtf(x2), 1e-12f) : rsqrtf(x2 + 1e-6f); };
            ss.row_q[wg][i] = p.mem_scale * inv_norm(sq);
            ss.col_k[wg][i] = (t < T && P + t - W >= S) ? inv_norm(sk) : 0.f;
            ss.gcs[wg][i] = gci;
          }
          // rows past the sequence's end (under varlen the next sequence's, whose v_new may be unwritten):
          // zeros, since their zero scores would not cancel a NaN in the product
          if (t >= T) {
            Tensor sVn = local_tile(sV(_, _, rv.index()), Shape<_64, Int<kD>>{}, make_coord(wg, _0{}));
            for (int d = half * (kD / 2); d < (half + 1) * (kD / 2); ++d) sVn(i, d) = Element(0.f);
          }
        }
        cutlass::arch::fence_view_async_shared();  // those stores, before the wgmma (async proxy) reads them
        cutlass::arch::NamedBarrier::sync(128, 2 + wg);
        warpgroup_wait<0>();
        Tensor X = make_tensor(Xacc.data(), acc_rowcol(Xacc.layout()));
        Tensor cX = thr_x.partition_C(make_identity_tensor(Shape<_64, _64>{}));
        Tensor cXrc = make_tensor(cX.data(), acc_rowcol(cX.layout()));
        Tensor M = make_tensor(Macc.data(), acc_rowcol(Macc.layout()));
        Tensor cM = thr_h.partition_C(make_identity_tensor(Shape<_64, Int<kD>>{}));
        Tensor cMrc = make_tensor(cM.data(), acc_rowcol(cM.layout()));
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < decltype(size<0>(X))::value; ++r) {
          const int i = get<0>(cXrc(r, 0));
          const float gi = ss.gcs[wg][i], qi = ss.row_q[wg][i];
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < decltype(size<1>(X))::value; ++c) {
            const int j = get<1>(cXrc(r, c));
            X(r, c) = j <= i ? X(r, c) * qi * ss.col_k[wg][j] * __expf(gi - ss.gcs[wg][j]) : 0.f;
          }
          const float a = qi * __expf(gi);
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < decltype(size<1>(M))::value; ++c) M(r, c) *= a;
        }
        // mo += s v_new
        Tensor rS = make_tensor<Element>(Xacc.layout());
        acc_to_regs<Element>(Xacc, rS);
        Tensor tSA = make_tensor(rS.data(), acc_to_a(Xacc.layout()));
        wgmma<false, 0>(mma_rs, tSA, thr_rs.partition_fragment_B(sVnt), Macc);
        // RMSNorm over D, swish read gate, norm weight; then the head's [D, D] projection. Mamba2: the gate,
        // its head's norm weight, and the sum of squares for the norm across heads
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < decltype(size<0>(M))::value; ++r) {
          float sq = 0.f;
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < decltype(size<1>(M))::value; ++c) sq += M(r, c) * M(r, c);
          sq = quad_sum(sq);
          const float z = zrow[r];  // (0 past the sequence's end)
          const float sw = z / (1.f + __expf(-z));
          const float g = mamba2 ? sw : rsqrtf(sq / kD + 1e-5f) * sw;
          x2[r] = sq * sw * sw;
          float const* nw = p.nw + (mamba2 ? h * kD : 0);
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < decltype(size<1>(M))::value; ++c) M(r, c) *= g * nw[get<1>(cMrc(r, c))];
        }
        Tensor rU = make_tensor<Element>(Macc.layout());
        acc_to_regs<Element>(Macc, rU);
        Tensor tUA = make_tensor(rU.data(), acc_to_a(Macc.layout()));
        wgmma<true, 0>(mma_rs, tUA, thr_rs.partition_fragment_B(sOwt), Yacc);
      }
      pipe_k.consumer_release(r_ow);
      if (!deferred) {
        pipe_k.consumer_release(r_km);
        pipe_v.consumer_release(rv);
      } else if (tid == 0) {
        p.deferred[tile] = 1;  // the memory-only launch finishes this tile
      }
    }
    Tensor Y = make_tensor(Yacc.data(), acc_rowcol(Yacc.layout()));
    if (!mamba2) {
      store([&](int r, int c) { return Y(r, c); });
    } else {  // every row's yp and ss (zeros where the rows read no memory)
      if (!mem_only) store([](int, int) { return 0.f; });
      store_rows(p.yp, [&](int r, int c) { return Y(r, c); });
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int t = row0 + get<0>(cOrc(r, 0));
        if (t < T && threadIdx.x % 4 == 0) p.ss[(grow0 + t) * p.H + h] = x2[r];
      }
    }
  }
#endif
}

// [B, T, heads, D] rows as (T, D, heads, B) for TMA, in boxes of `tile` rows into the shared memory layout `s`
// (the forward's and the backward's Q, K, V, dO streams)
template <class Element, class SLayout, int kRows, int kD>
auto tma_rows(Element const* x, int T, int heads, int B, SLayout const& s, Shape<Int<kRows>, Int<kD>> tile) {
  const int64_t row = int64_t(heads) * kD;
  return make_tma_copy(SM90_TMA_LOAD{},
                       make_tensor(make_gmem_ptr(x), make_shape(T, kD, heads, B), make_stride(row, _1{}, kD, row * T)),
                       s, tile, _1{});
}

// [n, D, D] matrices as (key row, value column, n, 1), one whole matrix per tile (kBN = D rows)
template <class Traits>
typename Traits::TmaKV tma_mats(typename Traits::Element const* x, int n) {
  constexpr int kD = Traits::kD;
  static_assert(Traits::kBN == kD);
  return make_tma_copy(SM90_TMA_LOAD{},
                       make_tensor(make_gmem_ptr(x), make_shape(kD, kD, n, 1),
                                   make_stride(int64_t(kD), _1{}, int64_t(kD) * kD, int64_t(kD) * kD * n)),
                       take<0, 2>(typename Traits::SmemLayoutK{}), Shape<Int<kD>, Int<kD>>{}, _1{});
}

// One forward call, host side (contiguous tensors, D = 128).
template <class Element>
struct Problem {
  Element const *q, *k, *v;  // q [B, T, H, D]; k, v the key streams: [B, T, HKV, D] (a prefill), or on a cache
                             // [1, B (W + T), HKV, D] (each sequence's W ring-tail rows, then its T new tokens)
  Element* o;                // [B, T, H, D]
  float* lse;                // [B, H, T], natural log
  int B, T, H, HKV, W, S;
  int const* cu = nullptr;   // varlen (B = 1): cu_seqlens [n_seq + 1] on the device
  int const* chunk_start = nullptr;  // and with the memory: [n_seq] (stride chunk_stride), the sequence's first
  int64_t chunk_stride = 1;          // chunk in hs
  int n_seq = 0, max_T = 0;  // sequences, the longest (B and T without cu)
  int64_t const* pos = nullptr;                              // the cache path: positions [B] on the device
  bool rows_outer = false;                                   // the grid's order (Params::rows_outer)
  Element const *sink_k = nullptr, *sink_v = nullptr;        // and its sink buffer [B, S, HKV, D]
  // the memory readout and epilogue (GDN / DN) behind the memory passes: v_new [B, T, H, D], hs [hs_rows, H,
  // D, D] (each sequence's ceil(T_n / 64) chunk states after the earlier sequences'), o_weight [H, D, D],
  // gc [B, T, H] fp32, z [B, T, H], norm_weight [D] fp32; vnew == nullptr: the attention alone
  Element const *vnew = nullptr, *hs = nullptr, *ow = nullptr, *z = nullptr;
  float const *gc = nullptr, *nw = nullptr;
  int hs_rows = 0;
  float mem_scale = 1.f;
  bool use_h0 = false;
  Element* yp = nullptr;     // Mamba2: yp [B, T, H, D] and ss [B, T, H] fp32 (Params::yp); norm_weight [H, D]
  float* ss = nullptr;
  // the memory passes beside the kernel (Params::ready): their ready counters, the tiles' deferred flags
  // [n_tiles(): zeros], and the memory-only launch after them
  int const* ready = nullptr;
  int ready_target = 0;
  uint8_t* deferred = nullptr;
  bool mem_only = false;
};

// the grid's tiles (row blocks x heads x sequences): the size of Problem::deferred
inline int64_t n_tiles(int max_T, int H, int n_seq) { return int64_t((max_T + 127) / 128) * H * n_seq; }

template <class Element, bool kMemory, int kVariant>
void launch(Problem<Element> const& f, cudaStream_t stream) {
  using Traits = BandTraits<Element, kMemory>;
  constexpr int kD = Traits::kD;
  static_assert(sizeof(typename Traits::SharedStorage) <= 227 * 1024, "shared memory per CTA");
  typename Traits::Params p{};
  const bool cache = f.pos != nullptr;
  p.k_rows = cache ? f.B * (f.W + f.T) : f.T;
  p.k_batch = cache ? 1 : f.B;
  const auto sq = typename Traits::SmemLayoutQ{};
  const auto skv = take<0, 2>(typename Traits::SmemLayoutK{});
  const auto q_tile = Shape<Int<Traits::kBM>, Int<kD>>{};
  const auto kv_tile = Shape<Int<Traits::kBN>, Int<kD>>{};
  p.tma_q = tma_rows(f.q, f.T, f.H, f.B, sq, q_tile);
  p.tma_k = tma_rows(f.k, p.k_rows, f.HKV, p.k_batch, skv, kv_tile);
  p.tma_v = tma_rows(f.v, p.k_rows, f.HKV, p.k_batch, skv, kv_tile);
  // the sinks: the cache's sink buffer (S = 0: never read, the stream stands in), else the key stream itself
  p.s_rows = cache && f.S ? f.S : p.k_rows;
  p.tma_sk = cache && f.S ? tma_rows(f.sink_k, f.S, f.HKV, f.B, skv, kv_tile) : p.tma_k;
  p.tma_sv = cache && f.S ? tma_rows(f.sink_v, f.S, f.HKV, f.B, skv, kv_tile) : p.tma_v;
  p.o = f.o, p.lse = f.lse, p.B = f.B, p.T = f.T, p.H = f.H, p.HKV = f.HKV, p.W = f.W, p.S = f.S;
  p.scale_log2 = float(1.4426950408889634 / sqrt(double(kD)));
  p.cu = f.cu, p.chunk_start = f.chunk_start, p.chunk_stride = f.chunk_stride, p.pos = f.pos;
  p.rows_outer = f.rows_outer;
  if constexpr (kMemory) {
    p.tma_vn = tma_rows(f.vnew, f.T, f.H, f.B, sq, q_tile);
    p.tma_hs = tma_mats<Traits>(f.hs, f.hs_rows * f.H);  // chunk c, head h: matrix c H + h
    p.tma_ow = tma_mats<Traits>(f.ow, f.H);
    p.gc = f.gc, p.z = f.z, p.nw = f.nw, p.mem_scale = f.mem_scale, p.hs_rows = f.hs_rows, p.use_h0 = f.use_h0;
    p.yp = f.yp, p.ss = f.ss;
    p.ready = f.ready, p.ready_target = f.ready_target, p.deferred = f.deferred, p.mem_only = f.mem_only;
    p.NT = (f.T + Traits::kChunk - 1) / Traits::kChunk;
  }
  auto kernel = band_fwd_kernel<Traits, kVariant>;
  const int smem = sizeof(typename Traits::SharedStorage);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const unsigned n_mblocks = (f.max_T + Traits::kBM - 1) / Traits::kBM;
  const dim3 grid = f.rows_outer ? dim3(f.H, n_mblocks, f.n_seq) : dim3(n_mblocks, f.H, f.n_seq);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
}

}  // namespace ahn_sm90
