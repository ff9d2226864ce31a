// CUDA kernels of torch.ops.ahn.decode_step (one AHN decode step for a batch of sequences).
// Knows nothing of torch: csrc/cuda/ahn_decode.cu checks the inputs, sizes the grid and
// launches. Math: docs/AHN_SPEC.md "Decode"; reference: ahn_decode_ref in
// ahn_ops/ops/ahn_attention/reference.py.
//
// Two launches per step:
//   1. decode_main_kernel, two kinds of block in one grid (roles by blockIdx.x):
//      - attention blocks, one per (b, kv head, head tile of <= 16 query heads, split of the
//        key range): flash-decoding over sinks + ring + the new token. The G query heads of a
//        kv group are processed together (they are the M rows of an m16n8k16 tensor-core MMA),
//        so each K/V byte is read once; the split makes B = 1 fill the GPU (W = 32640, HKV = 2:
//        64 splits of 512 keys per kv head, about one block per SM). Writes unnormalised
//        partial (o, max, sum) per split.
//      - state blocks, one per (b, head, 32 state columns): absorb the token leaving the window
//        into those columns of the fp32 state (GDN/DN's delta correction S^T k reduces over
//        rows, i.e. within a column, so column slices are independent), then read them out
//        (m = S^T qn, also a per-column reduction). The 2.1 MB state read+write at H=16, D=128
//        is spread over B*H*D/32 blocks.
//   2. decode_finish_kernel, 4 blocks per (b, head), each for D/4 output columns (so that the
//      64 split partials of B = 1 are combined by 64 blocks): write the new token into the cache
//      and advance pos (first: those stores drain while the block works), combine the splits,
//      norm/gate/project the readout (mamba2: RMSNorm over all H*D values, from per-column-slice
//      sums of m^2), out = o_win + y. All writes to the cache happen here, after every read of
//      launch 1. On sm_90 it is launched with programmatic dependent launch (griddepcontrol) so
//      that its launch latency overlaps launch 1.
// With overlap_prev (Params::early), launch 1 itself is a programmatic dependent launch after the
// kernel before the op (StaticDecoder's fused q/k/v projection, which lets it launch as it starts):
// its blocks read only the cache before griddepcontrol.wait (attention: the first cp.async stages when
// none holds the new token; state: the leaving key and the state columns), q / k / v after it; its
// blocks let launch 2 launch only once past the wait (launch 2 reads k / v / gate inputs before its own).
// pos is read on the device only: no host synchronisation, CUDA-graph capturable.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace ahn {
namespace decode {

constexpr int kThreads = 128;                     // every block of both launches
constexpr int kWarps = kThreads / 32;
constexpr int kTileKeys = 16;                     // keys per warp tile (two n8 MMA tiles)
constexpr int kSplitAlign = kWarps * kTileKeys;   // split lengths are multiples of this
constexpr int kHeadTile = 16;                     // query heads per attention block (MMA M)
constexpr int kStateCols = 32;                    // state columns per state block
constexpr int kOutSplit = 4;                      // launch-2 blocks per (b, head), by output column
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegBig = -1e30f;                 // finite "minus infinity" of the running max

enum Kind : int { kGDN = 0, kDN = 1, kMamba2 = 2 };
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct Params {
  // pointers: inputs (q, k, v in the activation type X; the rest any float type, see *_dt)
  const void* q;        // [B, H, D]   strides q_sb, q_sh, last dim contiguous
  const void* k;        // [B, HKV, D] strides k_sb, k_sh
  const void* v;        // [B, HKV, D] strides v_sb, v_sh
  const void* a;        // [B, H] strides a_sb, a_sh (gdn: a_proj(x), mamba2: dt_proj(x)); null for dn
  const void* b;        // [B, H] (gdn/dn: b_proj(x)); null for mamba2
  const void* z;        // [B, H]
  const void* A_log;    // [H], contiguous; null for dn
  const void* dt_bias;  // [H]
  const void* norm_w;   // [D] (mamba2: [H*D])
  const void* o_w;      // [H, D, D]
  // pointers: cache (contiguous)
  void* sink_k;         // [B, S, HKV, D] X
  void* sink_v;
  void* ring_k;         // [B, W, HKV, D] X
  void* ring_v;
  void* gates;          // [B, W, 2, H] X: each ring token's raw gate inputs a (row 0), b (row 1)
  float* state;         // [B, H, D, D]
  int64_t* pos;         // [B]
  void* out;            // [B, H, D] X, contiguous
  // pointers: workspace (fp32 unless noted)
  float* ws_po;         // [B, H, nsplit, D] unnormalised partial window outputs
  float* ws_pm;         // [B, H, nsplit]    running max (log2 domain, scaled scores)
  float* ws_pl;         // [B, H, nsplit]    running sum of exp2
  float* ws_m;          // [B, H, D]         memory readout m = S^T qn
  float* ws_m2;         // [B, H, D/32]      sum of m^2 per state column slice
  int64_t* ws_t;        // [B]               pos read by launch 1 (launch 2 advances pos)
  // sizes
  int B, H, HKV, G, W, S;
  int nsplit, chunk, ngt;  // splits per (b, kv head, head tile), keys per split, head tiles per group
  int n_attn_blocks;
  // strides (elements)
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  int64_t a_sb, a_sh, b_sb, b_sh, z_sb, z_sh;
  // meta
  int kind;
  int a_dt, b_dt, z_dt, alog_dt, dtb_dt, nw_dt, ow_dt;
  float scale;  // D^-0.5
  float lazy;   // MMA path: log2 headroom before a row's reference max moves (0: always the exact max)
  int early;    // launch 1 may start before the previous kernel ends (programmatic dependent launch): the
                // blocks read only the cache (sinks, ring, gates, state, pos) before griddepcontrol.wait
};

// ------------------------------------------------------------------------------------------
// small helpers
// ------------------------------------------------------------------------------------------
template <typename T>
struct TypeOps;
template <>
struct TypeOps<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <>
struct TypeOps<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// A scalar of a small input in any float dtype, as fp32.
__device__ __forceinline__ float ldf(const void* p, int64_t i, int dt) {
  if (dt == kF32) return reinterpret_cast<const float*>(p)[i];
  if (dt == kF16) return __half2float(reinterpret_cast<const __half*>(p)[i]);
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// 2^x on the SFU (ex2.approx.ftz: ~2 ulp, -inf -> 0), for the softmax weights only.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Ring slot of position t >= S: (t - S) mod W, in 32 bits while t - S fits (int64 division is a
// long software routine on the critical path of every block).
__device__ __forceinline__ int ring_slot(int64_t t, int S, int W) {
  const int64_t r = t - S;
  return r <= 0x7fffffff ? (int)((uint32_t)r % (uint32_t)W) : (int)(r % W);
}

__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }  // as torch

// Log-decay g and write strength w of head h from its raw projections a, b (the math of
// csrc/ahn_decode_math.h gate_values): made when the token leaves the window, from the ring's inputs.
__device__ __forceinline__ void gate_values(const Params& p, int h, float a, float b, float& g, float& w) {
  g = 0.f;
  if (p.kind == kMamba2) {
    w = softplus_f(a + ldf(p.dt_bias, h, p.dtb_dt));
    g = -expf(ldf(p.A_log, h, p.alog_dt)) * w;
  } else {
    if (p.kind == kGDN) g = -expf(ldf(p.A_log, h, p.alog_dt)) * softplus_f(a + ldf(p.dt_bias, h, p.dtb_dt));
    w = 1.f / (1.f + expf(-b));
  }
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }

// An opaque copy: the compiler must keep x in a register from here on instead of recomputing it at
// every use (it rematerialises cheap lane constants inside hot loops otherwise).
__device__ __forceinline__ void pin(uint32_t& x) { asm volatile("" : "+r"(x)); }
template <typename P>
__device__ __forceinline__ void pin(const P*& x) {
  uint64_t v = reinterpret_cast<uint64_t>(x);
  asm volatile("" : "+l"(v));
  x = reinterpret_cast<const P*>(v);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills (keys past the end).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}

// c[16x8] += a[16x16] b[16x8], fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90): launch 2 may start while launch 1 finishes; it waits
// here until launch 1 has completed and its writes are visible.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------------
// the keys of one sequence: index i in [0, L) -> sink i, ring position, or the new token
// ------------------------------------------------------------------------------------------
struct SeqKeys {
  int64_t t;  // position of the new token
  int nS;     // sinks present: min(S, t)
  int L;      // keys: nS + ring tokens [lo, t-1] + the new token
  int slot0;  // ring slot of position lo
};

__device__ __forceinline__ SeqKeys seq_keys(const Params& p, int b) {
  SeqKeys s;
  const int64_t t = p.pos[b];
  s.t = t;
  s.nS = (int)min((int64_t)p.S, t);
  const int64_t lo = max((int64_t)p.S, t - p.W + 1);
  s.L = s.nS + (int)max((int64_t)0, t - lo) + 1;
  s.slot0 = ring_slot(lo, p.S, p.W);
  return s;
}

// Row (D elements) of key index i for kv head hk of sequence b.
template <typename T, int D>
__device__ __forceinline__ const T* key_row(const Params& p, const T* sink, const T* ring, const T* new_row, int b,
                                            int hk, int i, const SeqKeys& s) {
  if (i < s.nS) return sink + (((int64_t)b * p.S + i) * p.HKV + hk) * D;
  if (i < s.L - 1) {
    int slot = s.slot0 + (i - s.nS);
    if (slot >= p.W) slot -= p.W;
    return ring + (((int64_t)b * p.W + slot) * p.HKV + hk) * D;
  }
  return new_row;
}

struct AttnBlock {
  int b, hk, h0, nh, split, k_begin, k_end;
  SeqKeys s;
};

__device__ __forceinline__ AttnBlock attn_block_coords(const Params& p, int blk) {
  AttnBlock a;
  a.split = blk % p.nsplit;
  int r = blk / p.nsplit;
  const int gt = r % p.ngt;
  r /= p.ngt;
  a.hk = r % p.HKV;
  a.b = r / p.HKV;
  a.h0 = a.hk * p.G + gt * kHeadTile;
  a.nh = min(kHeadTile, p.G - gt * kHeadTile);
  a.s = seq_keys(p, a.b);
  a.k_begin = a.split * p.chunk;
  a.k_end = min(a.k_begin + p.chunk, a.s.L);
  return a;
}

// CUDA-core path (the MMA path has merge_mma): merge the per-warp softmax partials in shared memory
// (mo [kWarps][16][D], mm, ml [kWarps][16]) into the block's partial for its split. The row threads
// first turn mm into each warp's weight exp2(m_w - M) (one exponential per warp and row, not per element).
template <int D>
__device__ __forceinline__ void merge_store(const Params& p, const AttnBlock& a, const float* mo, float* mm,
                                            const float* ml) {
  const int64_t base0 = ((int64_t)a.b * p.H + a.h0) * p.nsplit + a.split;  // row r: + r * nsplit
  if (threadIdx.x < a.nh) {
    const int row = threadIdx.x;
    float M = kNegBig;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, mm[w * kHeadTile + row]);
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2_fast(mm[w * kHeadTile + row] - M);
      l += ml[w * kHeadTile + row] * f;
      mm[w * kHeadTile + row] = f;
    }
    p.ws_pm[base0 + (int64_t)row * p.nsplit] = M;
    p.ws_pl[base0 + (int64_t)row * p.nsplit] = l;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < a.nh * D; idx += kThreads) {
    const int row = idx / D, d = idx % D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += mo[(w * kHeadTile + row) * D + d] * mm[w * kHeadTile + row];
    p.ws_po[(base0 + (int64_t)row * p.nsplit) * D + d] = o;
  }
}

// ------------------------------------------------------------------------------------------
// attention block, tensor cores (fp16/bf16). Each warp streams its own 16-key tiles of the
// split through a private NST-stage cp.async ring (no block barriers in the loop):
//   S[16 heads x 16 keys] = Q K^T   (2 x D/16 MMAs; Q fragments stay in registers)
//   online softmax on the accumulators (FA2), P re-packed in registers as the A operand
//   O[16 heads x D] += P V          (D/8 MMAs; V fragments via ldmatrix.trans)
// Rows >= G of the head tile are zero queries whose results are never stored.
// Shared tiles are [16 keys][D] with 16-byte chunk c of row r stored at c ^ (r & 7), so the
// 8 rows of each ldmatrix 8x8 matrix fall in 8 different bank groups.
// ------------------------------------------------------------------------------------------
template <int D, int NST>
struct MmaSmem {
  static constexpr int kTileElems = kTileKeys * D;
  static constexpr int kStageBytes = kWarps * NST * 2 * kTileElems * 2;
  static constexpr int kBytes = kStageBytes;  // the merge reuses each warp's stages (merge_mma)
};

template <int D>
struct MmaStages {
  static constexpr int value = D >= 128 ? 2 : 4;  // 64 KB of stages per block either way: 3 blocks/SM
};
// AHN_DECODE_STAGES (experiments, D = 128 only) picks 3 or 4 stages: 96 / 128 KB per block, so
// 2 / 1 blocks per SM and (by the grid sizing) fewer, longer splits.

// Merge of the 4 warps' softmax partials into the block's partial for its split (MMA path). Each
// warp writes into its own stage region (free once its cp.async groups are complete, so no barrier
// before the writes): first its row maxima; after one barrier every lane takes the block's max M of
// its two rows, scales its accumulators by exp2(m - M) and writes them, as float2 into rows padded to
// D + 8 floats (the 8 rows of an MMA fragment then fall in 4 different bank octets: 2 wavefronts per
// store instead of 8), with l * exp2(m - M); after a second barrier the threads sum the 4 warps' rows
// and store the partial as float4.
template <int D, int NST>
struct MergeRegion {
  static constexpr int kDP = D + 8;                                    // padded row, floats
  static constexpr int kFloats = MmaSmem<D, NST>::kStageBytes / kWarps / 4;  // a warp's stage region
  static constexpr int kM = kHeadTile * kDP;                           // [16] row maxima
  static constexpr int kL = kM + kHeadTile;                            // [16] l * exp2(m - M)
  static_assert(kL + kHeadTile <= kFloats, "merge rows must fit in a warp's stage region");
};

template <int D, int NST>
__device__ __forceinline__ void merge_mma(const Params& p, const AttnBlock& a, float* own, const float* all,
                                          float (&o)[D / 8][4], float m0, float m1, float l0, float l1) {
  using R = MergeRegion<D, NST>;
  constexpr int DP = R::kDP;
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  if (tig == 0) {
    own[R::kM + gid] = m0;
    own[R::kM + gid + 8] = m1;
  }
  __syncthreads();
  float M0 = kNegBig, M1 = kNegBig;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    M0 = fmaxf(M0, all[w * R::kFloats + R::kM + gid]);
    M1 = fmaxf(M1, all[w * R::kFloats + R::kM + gid + 8]);
  }
  const float f0 = exp2_fast(m0 - M0), f1 = exp2_fast(m1 - M1);
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int d = n * 8 + 2 * tig;
    *reinterpret_cast<float2*>(own + gid * DP + d) = make_float2(o[n][0] * f0, o[n][1] * f0);
    *reinterpret_cast<float2*>(own + (gid + 8) * DP + d) = make_float2(o[n][2] * f1, o[n][3] * f1);
  }
  if (tig == 0) {
    own[R::kL + gid] = l0 * f0;
    own[R::kL + gid + 8] = l1 * f1;
  }
  __syncthreads();
  const int64_t base0 = ((int64_t)a.b * p.H + a.h0) * p.nsplit + a.split;  // row r: + r * nsplit
  if (threadIdx.x < a.nh) {
    const int row = threadIdx.x;
    float M = kNegBig, l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      M = fmaxf(M, all[w * R::kFloats + R::kM + row]);
      l += all[w * R::kFloats + R::kL + row];
    }
    p.ws_pm[base0 + (int64_t)row * p.nsplit] = M;
    p.ws_pl[base0 + (int64_t)row * p.nsplit] = l;
  }
  constexpr int D4 = D / 4;
  for (int idx = threadIdx.x; idx < a.nh * D4; idx += kThreads) {
    const int row = idx / D4, d = (idx % D4) * 4;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(all + w * R::kFloats + row * DP + d);
      s.x += x.x;
      s.y += x.y;
      s.z += x.z;
      s.w += x.w;
    }
    *reinterpret_cast<float4*>(p.ws_po + (base0 + (int64_t)row * p.nsplit) * D + d) = s;
  }
}

template <typename T, int D, int NST>
__device__ __forceinline__ void attn_block_mma(const Params& p, int blk, char* smem) {
  using Ops = TypeOps<T>;
  constexpr int CH = D / 8;  // 16-byte chunks per row
  constexpr int TE = MmaSmem<D, NST>::kTileElems;
  constexpr int NKK = D / 16;
  constexpr int ND = D / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  static_assert(sizeof(T) == 2, "the MMA path takes fp16 / bf16 tiles");
  const AttnBlock a = attn_block_coords(p, blk);

  const T* sink_k = reinterpret_cast<const T*>(p.sink_k);
  const T* sink_v = reinterpret_cast<const T*>(p.sink_v);
  const T* ring_k = reinterpret_cast<const T*>(p.ring_k);
  const T* ring_v = reinterpret_cast<const T*>(p.ring_v);
  const T* new_k = reinterpret_cast<const T*>(p.k) + a.b * p.k_sb + a.hk * p.k_sh;
  const T* new_v = reinterpret_cast<const T*>(p.v) + a.b * p.v_sb + a.hk * p.v_sh;

  float o[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = kNegBig, m1 = kNegBig, l0 = 0.f, l1 = 0.f;  // rows gid, gid + 8
  const float sl2 = p.scale * kLog2e;
  const float lazy = p.lazy;

  T* wbuf = reinterpret_cast<T*>(smem) + warp * NST * 2 * TE;
  const int ntile = a.k_end > a.k_begin ? (a.k_end - a.k_begin + kTileKeys - 1) / kTileKeys : 0;
  const int nt = warp < ntile ? (ntile - warp + kWarps - 1) / kWarps : 0;

  // Lane l copies 16-byte chunk c = l % CH of rows l / CH + j * (32 / CH), j < 16 * CH / 32, of
  // the K and the V tile. A tile of 16 ring keys with no wrap (every tile of a long window but
  // ~2 per sequence) is one strided run of rows: one address per row, no per-key branches;
  // other tiles (sinks, the wrap, the new token, the split's end) go through key_row.
  constexpr int RPJ = 32 / CH;                     // rows per j
  constexpr int NJ = kTileKeys / RPJ;               // copies per lane, tile and matrix
  constexpr int PJ = 8 / RPJ < NJ ? 8 / RPJ : NJ;   // period in j of the swizzle (rows mod 8)
  constexpr uint32_t kTileBytes = TE * sizeof(T);
  const int lr0 = lane / CH, lc = lane % CH;
  const int rs = p.HKV * D;  // elements between consecutive ring slots
  // Lane constants, hoisted out of the tile loop (the issue was ~150 instructions per tile when
  // recomputed): the byte offsets in a tile of this lane's chunks for j < PJ (j + PJ is the same
  // swizzle 8 rows further: an immediate), and the lane's ring pointers at slot 0.
  uint32_t sj[PJ];
#pragma unroll
  for (int j = 0; j < PJ; ++j) {
    const int row = lr0 + j * RPJ;
    sj[j] = (uint32_t)(row * D + ((lc ^ (row & 7)) << 3)) * (uint32_t)sizeof(T);
    pin(sj[j]);
  }
  uint32_t wsm = smem_u32(wbuf);
  pin(wsm);
  const int64_t lane0 = ((int64_t)a.b * p.W * p.HKV + a.hk) * D + lr0 * rs + lc * 8;
  const T* rk0 = ring_k + lane0;
  const T* rv0 = ring_v + lane0;
  pin(rk0);
  pin(rv0);
  auto issue = [&](int it) {
    const int key0 = a.k_begin + (warp + it * kWarps) * kTileKeys;
    const uint32_t kdst = wsm + (uint32_t)(it % NST) * 2u * kTileBytes;
    int slot = a.s.slot0 + (key0 - a.s.nS);
    if (slot >= p.W) slot -= p.W;
    const bool run = key0 >= a.s.nS && key0 + kTileKeys <= a.s.L - 1 && key0 + kTileKeys <= a.k_end &&
                     slot + kTileKeys <= p.W;
    if (run) {
      const int64_t off = (int64_t)slot * rs;
      const T* kr = rk0 + off;
      const T* vr = rv0 + off;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const uint32_t d = kdst + sj[j % PJ] + (uint32_t)((j / PJ) * 8 * D * sizeof(T));
        cp_async16(d, kr + j * RPJ * rs, 16);
        cp_async16(d + kTileBytes, vr + j * RPJ * rs, 16);
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int key = key0 + lr0 + j * RPJ;
      const bool ok = key < a.k_end;
      const T* kr = ok ? key_row<T, D>(p, sink_k, ring_k, new_k, a.b, a.hk, key, a.s) : new_k;
      const T* vr = ok ? key_row<T, D>(p, sink_v, ring_v, new_v, a.b, a.hk, key, a.s) : new_v;
      const uint32_t d = kdst + sj[j % PJ] + (uint32_t)((j / PJ) * 8 * D * sizeof(T));
      cp_async16(d, kr + lc * 8, ok ? 16 : 0);
      cp_async16(d + kTileBytes, vr + lc * 8, ok ? 16 : 0);
    }
  };

  // With p.early (programmatic dependent launch after the kernel that wrote q, k, v), the first
  // stages of cache tiles are issued before griddepcontrol.wait when none of them holds the new token
  // (key L - 1, read from k / v): they stream while the previous kernel finishes. Q after the wait.
  const int npro = nt < NST - 1 ? nt : NST - 1;
  const bool pre = p.early && (npro == 0 || a.k_begin + (warp + (npro - 1) * kWarps + 1) * kTileKeys <= a.s.L - 1);
  if (!pre) pdl_wait();
#pragma unroll
  for (int it = 0; it < NST - 1; ++it) {
    if (it < nt) issue(it);
    cp_async_commit();
  }
  if (pre) pdl_wait();
  if (p.early) pdl_launch_dependents();
  // Q as the A operand: a0a1 (row gid, cols 2tig..), a2a3 (row gid+8), a4a5 (row gid, +8), a6a7
  uint32_t qa[NKK][4];
  {
    const T* qb = reinterpret_cast<const T*>(p.q) + a.b * p.q_sb + (int64_t)a.h0 * p.q_sh;
    const bool r0 = gid < a.nh, r1 = gid + 8 < a.nh;
    const T* q0 = qb + (int64_t)gid * p.q_sh;
    const T* q1 = qb + (int64_t)(gid + 8) * p.q_sh;
#pragma unroll
    for (int kk = 0; kk < NKK; ++kk) {
      const int c = kk * 16 + 2 * tig;
      // two adjacent elements as one 32-bit word (rows are 16-byte aligned, c is even)
      qa[kk][0] = r0 ? *reinterpret_cast<const uint32_t*>(q0 + c) : 0u;
      qa[kk][1] = r1 ? *reinterpret_cast<const uint32_t*>(q1 + c) : 0u;
      qa[kk][2] = r0 ? *reinterpret_cast<const uint32_t*>(q0 + c + 8) : 0u;
      qa[kk][3] = r1 ? *reinterpret_cast<const uint32_t*>(q1 + c + 8) : 0u;
    }
  }

  for (int it = 0; it < nt; ++it) {
    if (it + NST - 1 < nt) issue(it + NST - 1);
    cp_async_commit();
    cp_async_wait<NST - 1>();
    __syncwarp();
    const T* kb = wbuf + (it % NST) * 2 * TE;
    const T* vb = kb + TE;
    const int key0 = a.k_begin + (warp + it * kWarps) * kTileKeys;

    // S = Q K^T: ldmatrix x4 -> (keys 0-7, d lo), (keys 0-7, d hi), (keys 8-15, d lo), (keys 8-15, d hi)
    float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
    {
      const int mi = lane >> 3, r8 = lane & 7;
      const int row = (mi >> 1) * 8 + r8;
#pragma unroll
      for (int kk = 0; kk < NKK; ++kk) {
        const int c = 2 * kk + (mi & 1);
        uint32_t b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3, smem_u32(kb + row * D + ((c ^ (row & 7)) << 3)));
        mma16816<T>(s0, qa[kk], b0, b1);
        mma16816<T>(s1, qa[kk], b2, b3);
      }
    }
    // online softmax in log2 units (rows gid and gid + 8): the running max m is kept scaled, the
    // scores are scaled inside the exponent (one FFMA each); keys past the split's end (the last
    // tile only) are -inf
    if (key0 + kTileKeys > a.k_end) {
      const int kc = key0 + 2 * tig;
      const float NEG = -INFINITY;
      if (kc >= a.k_end) s0[0] = s0[2] = NEG;
      if (kc + 1 >= a.k_end) s0[1] = s0[3] = NEG;
      if (kc + 8 >= a.k_end) s1[0] = s1[2] = NEG;
      if (kc + 9 >= a.k_end) s1[1] = s1[3] = NEG;
    }
    float mx0 = fmaxf(fmaxf(s0[0], s0[1]), fmaxf(s1[0], s1[1]));
    float mx1 = fmaxf(fmaxf(s0[2], s0[3]), fmaxf(s1[2], s1[3]));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // lazy reference max: a row's m moves only when a score exceeds it by more than p.lazy (log2
    // units), so the weights stay <= 2^lazy and the accumulators are rescaled on few tiles (the
    // first, and when the scores climb); lazy = 0 moves m whenever the max grows (the exact max)
    const float c0 = mx0 * sl2, c1 = mx1 * sl2;
    const bool up0 = c0 > m0 + lazy, up1 = c1 > m1 + lazy;
    if (__any_sync(0xffffffffu, up0 || up1)) {
      const float mn0 = up0 ? c0 : m0, mn1 = up1 ? c1 : m1;
      const float al0 = exp2_fast(m0 - mn0), al1 = exp2_fast(m1 - mn1);
      l0 *= al0;
      l1 *= al1;
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        o[n][0] *= al0;
        o[n][1] *= al0;
        o[n][2] *= al1;
        o[n][3] *= al1;
      }
      m0 = mn0;
      m1 = mn1;
    }
    const float mn0 = m0, mn1 = m1;
    s0[0] = exp2_fast(fmaf(s0[0], sl2, -mn0));
    s0[1] = exp2_fast(fmaf(s0[1], sl2, -mn0));
    s1[0] = exp2_fast(fmaf(s1[0], sl2, -mn0));
    s1[1] = exp2_fast(fmaf(s1[1], sl2, -mn0));
    s0[2] = exp2_fast(fmaf(s0[2], sl2, -mn1));
    s0[3] = exp2_fast(fmaf(s0[3], sl2, -mn1));
    s1[2] = exp2_fast(fmaf(s1[2], sl2, -mn1));
    s1[3] = exp2_fast(fmaf(s1[3], sl2, -mn1));
    l0 += (s0[0] + s0[1]) + (s1[0] + s1[1]);
    l1 += (s0[2] + s0[3]) + (s1[2] + s1[3]);
    // P as the A operand: the C fragments of the two key tiles are its (k lo, k hi) halves
    uint32_t pa[4];
    pa[0] = Ops::pack(s0[0], s0[1]);
    pa[1] = Ops::pack(s0[2], s0[3]);
    pa[2] = Ops::pack(s1[0], s1[1]);
    pa[3] = Ops::pack(s1[2], s1[3]);
    // O += P V: ldmatrix x4 trans -> (keys 0-7, d blk 2np), (keys 8-15, 2np), (0-7, 2np+1), (8-15, 2np+1)
    {
      const int mi = lane >> 3, r8 = lane & 7;
      const int row = (mi & 1) * 8 + r8;
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        const int c = 2 * np + (mi >> 1);
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(b0, b1, b2, b3, smem_u32(vb + row * D + ((c ^ (row & 7)) << 3)));
        mma16816<T>(o[2 * np], pa, b0, b1);
        mma16816<T>(o[2 * np + 1], pa, b2, b3);
      }
    }
    __syncwarp();  // this stage is refilled by the next iteration's issue
  }
  cp_async_wait<0>();
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);

  merge_mma<D, NST>(p, a, reinterpret_cast<float*>(wbuf), reinterpret_cast<const float*>(smem), o, m0, m1, l0, l1);
}

// ------------------------------------------------------------------------------------------
// attention block, CUDA cores (any X; the fp32 path, and a cross-check of the MMA path).
// Each warp takes every kWarps-th key of the split; lane owns D/32 elements of a row.
// ------------------------------------------------------------------------------------------
template <int D>
struct SimtSmem {
  static constexpr int kBytes = (kWarps * kHeadTile * D + 2 * kWarps * kHeadTile) * 4;
};

template <typename T, int D>
__device__ __forceinline__ void attn_block_simt(const Params& p, int blk, char* smem) {
  using Ops = TypeOps<T>;
  constexpr int EPL = D / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const AttnBlock a = attn_block_coords(p, blk);
  const T* sink_k = reinterpret_cast<const T*>(p.sink_k);
  const T* sink_v = reinterpret_cast<const T*>(p.sink_v);
  const T* ring_k = reinterpret_cast<const T*>(p.ring_k);
  const T* ring_v = reinterpret_cast<const T*>(p.ring_v);
  const T* new_k = reinterpret_cast<const T*>(p.k) + a.b * p.k_sb + a.hk * p.k_sh;
  const T* new_v = reinterpret_cast<const T*>(p.v) + a.b * p.v_sb + a.hk * p.v_sh;
  const float sl2 = p.scale * kLog2e;

  pdl_wait();  // q first (this path issues nothing before it)
  if (p.early) pdl_launch_dependents();
  float qr[kHeadTile][EPL], o[kHeadTile][EPL], m[kHeadTile], l[kHeadTile];
  const T* qb = reinterpret_cast<const T*>(p.q) + a.b * p.q_sb + (int64_t)a.h0 * p.q_sh;
#pragma unroll
  for (int g = 0; g < kHeadTile; ++g) {
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      qr[g][e] = g < a.nh ? Ops::to_f(qb[(int64_t)g * p.q_sh + lane * EPL + e]) * sl2 : 0.f;
      o[g][e] = 0.f;
    }
    m[g] = kNegBig;
    l[g] = 0.f;
  }
  for (int key = a.k_begin + warp; key < a.k_end; key += kWarps) {
    const T* kr = key_row<T, D>(p, sink_k, ring_k, new_k, a.b, a.hk, key, a.s) + lane * EPL;
    const T* vr = key_row<T, D>(p, sink_v, ring_v, new_v, a.b, a.hk, key, a.s) + lane * EPL;
    float kf[EPL], vf[EPL];
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      kf[e] = Ops::to_f(kr[e]);
      vf[e] = Ops::to_f(vr[e]);
    }
#pragma unroll
    for (int g = 0; g < kHeadTile; ++g) {
      if (g < a.nh) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) s += qr[g][e] * kf[e];
        s = warp_sum(s);
        const float mn = fmaxf(m[g], s);
        const float al = exp2f(m[g] - mn), pp = exp2f(s - mn);
        l[g] = l[g] * al + pp;
#pragma unroll
        for (int e = 0; e < EPL; ++e) o[g][e] = o[g][e] * al + pp * vf[e];
        m[g] = mn;
      }
    }
  }
  float* mo = reinterpret_cast<float*>(smem);
  float* mm = mo + kWarps * kHeadTile * D;
  float* ml = mm + kWarps * kHeadTile;
#pragma unroll
  for (int g = 0; g < kHeadTile; ++g) {
#pragma unroll
    for (int e = 0; e < EPL; ++e) mo[(warp * kHeadTile + g) * D + lane * EPL + e] = o[g][e];
    if (lane == 0) {
      mm[warp * kHeadTile + g] = m[g];
      ml[warp * kHeadTile + g] = l[g];
    }
  }
  __syncthreads();
  merge_store<D>(p, a, mo, mm, ml);
}

// ------------------------------------------------------------------------------------------
// state block: columns [c*32, c*32+32) of state[b, h] (all D rows).
// Thread (rg, cq) holds rows rg + 16 r (r < D/16) of 4 adjacent columns as float4.
// ------------------------------------------------------------------------------------------
constexpr int kStateSmemBytes = (2 * 128 + 16 * kStateCols + 4) * 4;

template <typename T, int D>
__device__ __forceinline__ void state_block(const Params& p, int sb, char* smem) {
  using Ops = TypeOps<T>;
  constexpr int NCH = D / kStateCols;
  constexpr int TPR = kStateCols / 4;  // threads per row
  constexpr int RG = kThreads / TPR;   // row groups
  constexpr int RPT = D / RG;          // rows per thread
  float* sq = reinterpret_cast<float*>(smem);
  float* sk = sq + D;
  float* red = sk + D;  // [RG][kStateCols]
  float* scal = red + RG * kStateCols;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cq = tid % TPR, rg = tid / TPR;
  const int c = sb % NCH;
  const int r = sb / NCH;
  const int h = r % p.H, b = r / p.H, hk = h / p.G;
  const int64_t t = p.pos[b];
  const bool absorb = t - p.W >= p.S;  // token t - W leaves the window
  const int slot = absorb ? ring_slot(t, p.S, p.W) : 0;
  const int64_t kvrow = (((int64_t)b * p.W + slot) * p.HKV + hk) * D;

  // the cache (the leaving key, the state columns below) is read before griddepcontrol.wait, q after it
  const T* krow = reinterpret_cast<const T*>(p.ring_k) + kvrow;
  for (int i = tid; i < D; i += kThreads) sk[i] = absorb ? Ops::to_f(krow[i]) : 0.f;
  const bool mamba = p.kind == kMamba2;
  const int col = c * kStateCols + cq * 4;
  float* st_base = p.state + ((int64_t)b * p.H + h) * D * D + col;
  float4 st[RPT];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) st[rr] = *reinterpret_cast<const float4*>(st_base + (int64_t)(rg + RG * rr) * D);
  pdl_wait();
  if (p.early) pdl_launch_dependents();
  if (h == 0 && c == 0 && tid == 0) p.ws_t[b] = t;
  const T* qrow = reinterpret_cast<const T*>(p.q) + b * p.q_sb + (int64_t)h * p.q_sh;
  for (int i = tid; i < D; i += kThreads) sq[i] = Ops::to_f(qrow[i]);
  __syncthreads();
  if (warp < 2) {
    const float* src = warp == 0 ? sq : sk;
    float s = 0.f;
    for (int i = lane; i < D; i += 32) s += src[i] * src[i];
    s = warp_sum(s);
    if (lane == 0) scal[warp] = s;
  }
  __syncthreads();

  if (absorb) {
    const T* gin = reinterpret_cast<const T*>(p.gates) + ((int64_t)b * p.W + slot) * 2 * p.H + h;
    float g, w;
    gate_values(p, h, Ops::to_f(gin[0]), Ops::to_f(gin[p.H]), g, w);
    const float eg = expf(g);
    const float ik = mamba ? 1.f / fmaxf(sqrtf(scal[1]), 1e-12f) : rsqrtf(scal[1] + 1e-6f);
    const T* vrow = reinterpret_cast<const T*>(p.ring_v) + kvrow + col;
    float4 upd = make_float4(Ops::to_f(vrow[0]), Ops::to_f(vrow[1]), Ops::to_f(vrow[2]), Ops::to_f(vrow[3]));
    if (!mamba) {  // delta rule: upd = v - (exp(g) S)^T kn
      float4 part = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) {
        const float kn = sk[rg + RG * rr] * ik;
        part.x += st[rr].x * kn;
        part.y += st[rr].y * kn;
        part.z += st[rr].z * kn;
        part.w += st[rr].w * kn;
      }
      *reinterpret_cast<float4*>(red + rg * kStateCols + cq * 4) = part;
      __syncthreads();
      float4 rs = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < RG; ++j) {
        const float4 x = *reinterpret_cast<const float4*>(red + j * kStateCols + cq * 4);
        rs.x += x.x;
        rs.y += x.y;
        rs.z += x.z;
        rs.w += x.w;
      }
      upd.x -= eg * rs.x;
      upd.y -= eg * rs.y;
      upd.z -= eg * rs.z;
      upd.w -= eg * rs.w;
      __syncthreads();  // red is reused by the readout
    }
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      const int i = rg + RG * rr;
      const float wk = w * (sk[i] * ik);
      st[rr].x = eg * st[rr].x + wk * upd.x;
      st[rr].y = eg * st[rr].y + wk * upd.y;
      st[rr].z = eg * st[rr].z + wk * upd.z;
      st[rr].w = eg * st[rr].w + wk * upd.w;
      *reinterpret_cast<float4*>(st_base + (int64_t)i * D) = st[rr];
    }
  }
  // readout m = S^T qn for these columns
  const float iq = mamba ? 1.f / fmaxf(sqrtf(scal[0]), 1e-12f) : rsqrtf(scal[0] + 1e-6f) * rsqrtf((float)D);
  float4 part = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    const float qn = sq[rg + RG * rr] * iq;
    part.x += st[rr].x * qn;
    part.y += st[rr].y * qn;
    part.z += st[rr].z * qn;
    part.w += st[rr].w * qn;
  }
  *reinterpret_cast<float4*>(red + rg * kStateCols + cq * 4) = part;
  __syncthreads();
  if (rg == 0) {  // threads 0..TPR-1 of warp 0
    float4 mv = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int j = 0; j < RG; ++j) {
      const float4 x = *reinterpret_cast<const float4*>(red + j * kStateCols + cq * 4);
      mv.x += x.x;
      mv.y += x.y;
      mv.z += x.z;
      mv.w += x.w;
    }
    const int64_t bh = (int64_t)b * p.H + h;
    *reinterpret_cast<float4*>(p.ws_m + bh * D + col) = mv;
    float s2 = mv.x * mv.x + mv.y * mv.y + mv.z * mv.z + mv.w * mv.w;
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) s2 += __shfl_xor_sync((1u << TPR) - 1u, s2, o);
    if (cq == 0) p.ws_m2[bh * NCH + c] = s2;
  }
}

// ------------------------------------------------------------------------------------------
// launch 1
// ------------------------------------------------------------------------------------------
template <typename T, int D, bool MMA, int NST = MmaStages<D>::value>
struct MainSmem {
  static constexpr int kAttn = MMA ? MmaSmem<D, NST>::kBytes : SimtSmem<D>::kBytes;
  static constexpr int kBytes = kAttn > kStateSmemBytes ? kAttn : kStateSmemBytes;
};

// MINB: blocks per SM the register budget is sized for (3: 168 registers, the default with 64 KB of
// stages; 2: 255 registers, for 3 stages, or as an experiment when the grid fits 2 blocks per SM)
template <typename T, int D, bool MMA, int NST = MmaStages<D>::value, int MINB = (MMA ? 3 : 2)>
__global__ void __launch_bounds__(kThreads, MINB) decode_main_kernel(const Params p) {
  extern __shared__ __align__(16) char smem[];
  // launch 2 reads the new k / v and the gate inputs before its own wait: with p.early (the kernel that
  // wrote them may still run) each block lets it launch only once past griddepcontrol.wait
  if (!p.early) pdl_launch_dependents();
  const int blk = blockIdx.x;
  if (blk < p.n_attn_blocks) {
    if constexpr (MMA) {
      attn_block_mma<T, D, NST>(p, blk, smem);
    } else {
      attn_block_simt<T, D>(p, blk, smem);
    }
  } else {
    state_block<T, D>(p, blk - p.n_attn_blocks, smem);
  }
}

// ------------------------------------------------------------------------------------------
// launch 2: kOutSplit blocks per (b, h)
// ------------------------------------------------------------------------------------------
// o_weight[h][d0 + i*dstep, e] for i < N, as fp32 (loaded before the grid dependency wait).
template <typename W_, int D, int N>
__device__ __forceinline__ void load_w_col(const W_* w, int e, int d0, int dstep, float (&wr)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) wr[i] = TypeOps<W_>::to_f(w[(d0 + i * dstep) * D + e]);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_finish_kernel(const Params p) {
  using Ops = TypeOps<T>;
  constexpr int EC = D / kOutSplit;    // output columns of this block
  constexpr int LR = EC / 4;           // threads per partial row (float4 each)
  constexpr int RP = kThreads / LR;    // partial rows combined in parallel
  constexpr int NCH = D / kStateCols;
  constexpr int PARTS = kThreads / EC; // adjacent lanes per output column in step 4 (4 at D = 128)
  constexpr int RPL = RP / PARTS;      // combined rows per lane in step 4
  static_assert(32 % PARTS == 0 && RP % PARTS == 0, "step 4 reduces within a warp");
  // rows padded by 32 / PARTS floats: the PARTS lanes of a column read rows r, r + 1, ... in
  // different banks (float4 row writes stay 16-byte aligned)
  constexpr int SO = EC + 32 / PARTS;
  __shared__ __align__(16) float s_o[RP][SO];
  __shared__ float s_l[RP], s_m[RP];
  __shared__ float s_u[D];
  __shared__ float s_red[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int es = blockIdx.x % kOutSplit;
  const int bh = blockIdx.x / kOutSplit;
  const int b = bh / p.H, h = bh % p.H, hk = h / p.G, g = h % p.G;
  const int e0 = es * EC;
  const int64_t base = (int64_t)bh * p.nsplit;

  // Everything that does not depend on launch 1 is loaded before the dependency wait: with
  // programmatic dependent launch this overlaps launch 1's tail.
  const int e = tid / PARTS, prt = tid % PARTS;  // step 4: column e, rows prt + i * PARTS
  float wr[D / PARTS];
  {
    const int64_t ow = (int64_t)h * D * D + e0;
    if (p.ow_dt == kF32) {
      load_w_col<float, D>(reinterpret_cast<const float*>(p.o_w) + ow, e, prt, PARTS, wr);
    } else if (p.ow_dt == kF16) {
      load_w_col<__half, D>(reinterpret_cast<const __half*>(p.o_w) + ow, e, prt, PARTS, wr);
    } else {
      load_w_col<__nv_bfloat16, D>(reinterpret_cast<const __nv_bfloat16*>(p.o_w) + ow, e, prt, PARTS, wr);
    }
  }
  const float zt = ldf(p.z, b * p.z_sb + h * p.z_sh, p.z_dt);
  const float gate = silu_f(zt);
  float nwv[(D + kThreads - 1) / kThreads];
#pragma unroll
  for (int i = 0; i < (D + kThreads - 1) / kThreads; ++i) {
    const int d = tid + i * kThreads;
    nwv[i] = d < D ? ldf(p.norm_w, p.kind == kMamba2 ? (int64_t)h * D + d : d, p.nw_dt) : 0.f;
  }
  float zz_all = 0.f;  // mamba2: silu(z) of head tid
  if (p.kind == kMamba2 && tid < p.H) zz_all = silu_f(ldf(p.z, b * p.z_sb + tid * p.z_sh, p.z_dt));
  float ga = 0.f, gb = 0.f;  // the new token's gate inputs (thread 0 of the slice-0 block)
  if (es == 0 && tid == 0) {
    if (p.kind != kDN) ga = ldf(p.a, b * p.a_sb + h * p.a_sh, p.a_dt);
    if (p.kind != kMamba2) gb = ldf(p.b, b * p.b_sb + h * p.b_sh, p.b_dt);
  }
  const T* kin = reinterpret_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vin = reinterpret_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  constexpr int KPT = (D + kThreads - 1) / kThreads;
  T kv_k[KPT], kv_v[KPT];
  const bool writer = es == 0 && g == 0;
#pragma unroll
  for (int i = 0; i < KPT; ++i) {
    const int d = tid + i * kThreads;
    if (writer && d < D) {
      kv_k[i] = kin[d];
      kv_v[i] = vin[d];
    }
  }

  pdl_wait();  // launch 1 complete and its writes visible
  // Every load of launch 1's results is issued before any is used (one L2 round trip): t, the readout
  // and its sums of squares, and the first kBatch partials of each thread for the combine (step 1)
  const int64_t t = p.ws_t[b];
  float mv[(D + kThreads - 1) / kThreads];
#pragma unroll
  for (int i = 0; i < (D + kThreads - 1) / kThreads; ++i) {
    const int d = tid + i * kThreads;
    mv[i] = d < D ? p.ws_m[(int64_t)bh * D + d] : 0.f;
  }
  float ss = 0.f;
  if (p.kind != kMamba2) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) ss += p.ws_m2[(int64_t)bh * NCH + c];
  }
  constexpr int kBatch = 4;
  const int c4 = tid % LR, rp = tid / LR;
  float pm[kBatch], pl[kBatch];
  float4 po[kBatch];
  auto load_partials = [&](int s0) {  // splits s0, s0 + RP, ... (kBatch of them) of columns c4 * 4..
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int sp = s0 + j * RP;
      const bool ok = sp < p.nsplit;
      pm[j] = ok ? p.ws_pm[base + sp] : kNegBig;
      pl[j] = ok ? p.ws_pl[base + sp] : 0.f;
      po[j] = ok ? *reinterpret_cast<const float4*>(p.ws_po + (base + sp) * D + e0 + c4 * 4)
                 : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  load_partials(rp);

  // the new token into the cache (launch 1 has read everything it needed): these stores drain while
  // the block combines
  if (es == 0) {
    if (writer) {
      T* dk_ = reinterpret_cast<T*>(t < p.S ? p.sink_k : p.ring_k);
      T* dv_ = reinterpret_cast<T*>(t < p.S ? p.sink_v : p.ring_v);
      const int64_t row = t < p.S ? (((int64_t)b * p.S + t) * p.HKV + hk) * D
                                  : (((int64_t)b * p.W + ring_slot(t, p.S, p.W)) * p.HKV + hk) * D;
#pragma unroll
      for (int i = 0; i < KPT; ++i) {
        const int d = tid + i * kThreads;
        if (d < D) {
          dk_[row + d] = kv_k[i];
          dv_[row + d] = kv_v[i];
        }
      }
    }
    if (t >= p.S && tid == 0) {
      T* gp = reinterpret_cast<T*>(p.gates) + ((int64_t)b * p.W + ring_slot(t, p.S, p.W)) * 2 * p.H + h;
      gp[0] = Ops::from_f(ga);
      gp[p.H] = Ops::from_f(gb);
    }
    if (h == 0 && tid == 0) p.pos[b] = t + 1;
  }

  // 1. combine the splits for columns [e0, e0 + EC): thread (rp, c4) folds splits rp, rp + RP, ...,
  //    kBatch at a time (one max and one rescale per batch); the RP rows are merged in step 4 with
  //    weights from the block's max
  {
    float ml = kNegBig, l = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = rp; s0 < p.nsplit; s0 += kBatch * RP) {
      if (s0 != rp) load_partials(s0);
      float mn = ml;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) mn = fmaxf(mn, pm[j]);
      const float al = exp2_fast(ml - mn);
      l *= al;
      o.x *= al;
      o.y *= al;
      o.z *= al;
      o.w *= al;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float f = exp2_fast(pm[j] - mn);
        l += pl[j] * f;
        o.x += po[j].x * f;
        o.y += po[j].y * f;
        o.z += po[j].z * f;
        o.w += po[j].w * f;
      }
      ml = mn;
    }
    *reinterpret_cast<float4*>(&s_o[rp][c4 * 4]) = o;
    if (c4 == 0) {
      s_l[rp] = l;
      s_m[rp] = ml;
    }
  }
  // 2. the sums of squares for the RMSNorm
  float part = 0.f;
  if (p.kind == kMamba2) {  // RMSNorm over all H*D values of m * silu(z) of sequence b
    for (int hh = tid; hh < p.H; hh += kThreads) {
      const float zz = hh < kThreads ? zz_all : silu_f(ldf(p.z, b * p.z_sb + hh * p.z_sh, p.z_dt));
      float q2 = 0.f;
#pragma unroll
      for (int c = 0; c < NCH; ++c) q2 += p.ws_m2[((int64_t)b * p.H + hh) * NCH + c];
      part += zz * zz * q2;
    }
    part = warp_sum(part);
    if (lane == 0) s_red[warp] = part;
    __syncthreads();
  }
  if (p.kind == kMamba2) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) ss += s_red[w];
    ss /= (float)(p.H * D);
  } else {
    ss /= (float)D;
  }
  const float rms = rsqrtf(ss + 1e-5f);

  // 3. u = norm(m) * weight * gate, all D values (the projection mixes them)
#pragma unroll
  for (int i = 0; i < (D + kThreads - 1) / kThreads; ++i) {
    const int d = tid + i * kThreads;
    if (d < D) s_u[d] = mv[i] * rms * nwv[i] * gate;
  }
  __syncthreads();
  // 4. y = u @ o_weight[h][:, e0:e0+EC]; out = o_win + y. The PARTS adjacent lanes of column e split
  //    the projection's rows and the RP combined rows (weights exp2(m_r - M), M the block's max) and
  //    reduce with shuffles: no barrier after step 3's
  {
    float y = 0.f;
#pragma unroll
    for (int i = 0; i < D / PARTS; ++i) y += s_u[prt + i * PARTS] * wr[i];
    float M = kNegBig;
#pragma unroll
    for (int j = 0; j < RPL; ++j) M = fmaxf(M, s_m[prt + j * PARTS]);
#pragma unroll
    for (int o = PARTS / 2; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float oo = 0.f, ll = 0.f;
#pragma unroll
    for (int j = 0; j < RPL; ++j) {
      const int r = prt + j * PARTS;
      const float f = exp2_fast(s_m[r] - M);
      oo += s_o[r][e] * f;
      ll += s_l[r] * f;
    }
#pragma unroll
    for (int o = PARTS / 2; o > 0; o >>= 1) {
      y += __shfl_xor_sync(0xffffffffu, y, o);
      oo += __shfl_xor_sync(0xffffffffu, oo, o);
      ll += __shfl_xor_sync(0xffffffffu, ll, o);
    }
    if (prt == 0) reinterpret_cast<T*>(p.out)[(int64_t)bh * D + e0 + e] = Ops::from_f(oo / ll + y);
  }
}

}  // namespace decode
}  // namespace ahn
