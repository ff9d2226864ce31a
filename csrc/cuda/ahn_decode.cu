// CUDA binding of torch.ops.ahn.decode_step: input checks, grid sizing and the two launches of
// csrc/cuda/ahn_decode.cuh (kernel design there, and in benchmarks/NOTES_decode.md).
//
// Contiguity: the cache tensors (sink_k/v, ring_k/v, gates, state, pos) must be contiguous
// (they are updated in place; ValueError otherwise). q, k, v need a contiguous last dim and
// 16-byte aligned rows, else they are copied (a capture-safe allocation). a, b, z are read
// through their strides; the per-head parameters are made contiguous (a no-op for
// nn.Parameters). Inputs in float64 are converted to float32. D must be 64 or 128.
//
// Allocations: the output and one workspace tensor, both from the caching allocator, so a
// call can be captured in a CUDA graph. pos is read on the device only. Only c10_cuda and the
// CUDA runtime are linked (no libtorch_cuda symbols): device attributes via cudaDeviceGetAttribute.
//
// Debug / tuning switches: environment variables for tests and benchmarks, none needed in use. Read once,
// on the first call (Switches below); ahn_ops._C.reread_decode_switches() reads them again (tests and
// benchmarks that compare them within one process: ahn_ops._ext.decode_switches). Unset = the default.
//   AHN_DECODE_SIMT=1  attention on CUDA cores instead of tensor cores (fp16/bf16)
//   AHN_DECODE_PDL=0   no programmatic dependent launch of the second kernel on sm_90
//   AHN_OPS_POISON=1   fill the output and the workspace with NaN first (tests/conftest.py)
//   AHN_DECODE_SPLIT_KEYS=n  about n keys per split instead of the SM-count-based choice
//   AHN_DECODE_STAGES=3|4    cp.async stages per warp at D = 128 (default 2; fewer blocks per SM); the
//                      only way to the two template instances of 3 and 4 stages (kept for the sweep of
//                      benchmarks/profile_decode_op.py)
//   AHN_DECODE_MINB=2|3  D = 128, 2 stages: registers budgeted for 2 blocks per SM (255) or 3 (168);
//                      default 2 while the attention blocks fit 2 per SM (small B), else 3
//   AHN_DECODE_LAZY=x  log2 headroom of the lazy reference max in the tensor-core loop (0..12; 0 = the
//                      exact running max; default kDefaultLazy)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>

#include "ahn_decode.cuh"
#include "ahn_decode_check.h"

namespace ahn {
namespace {

namespace dk = ::ahn::decode;

// The tensor-core loop moves a row's reference max only when a score passes it by more than this
// (log2 units): softmax weights up to 2^8 (exact in fp32 sums, representable in bf16 and fp16), and
// the accumulators are rescaled on a few tiles per split instead of on most of them.
constexpr float kDefaultLazy = 8.f;

bool env_flag(const char* name, bool dflt) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return dflt;
  return s[0] != '0';
}

// The switches of the comment at the top of this file, parsed from the environment.
struct Switches {
  bool simt = false;                 // AHN_DECODE_SIMT
  bool pdl = true;                   // AHN_DECODE_PDL
  bool poison = false;               // AHN_OPS_POISON
  int split_keys = 0;                // AHN_DECODE_SPLIT_KEYS (0: the SM-count-based choice)
  int stages = 0;                    // AHN_DECODE_STAGES (3 or 4; else the default)
  std::optional<bool> two_blocks;    // AHN_DECODE_MINB: set = "2" or not; unset = by occupancy
  float lazy = kDefaultLazy;         // AHN_DECODE_LAZY, clamped to [0, 12] (NaN or junk: 0)

  static Switches from_env() {
    Switches s;
    s.simt = env_flag("AHN_DECODE_SIMT", false);
    s.pdl = env_flag("AHN_DECODE_PDL", true);
    s.poison = env_flag("AHN_OPS_POISON", false);
    if (const char* v = std::getenv("AHN_DECODE_SPLIT_KEYS")) s.split_keys = std::max(std::atoi(v), 0);
    if (const char* v = std::getenv("AHN_DECODE_STAGES")) s.stages = std::atoi(v);
    if (const char* v = std::getenv("AHN_DECODE_MINB")) s.two_blocks = std::atoi(v) == 2;
    if (const char* v = std::getenv("AHN_DECODE_LAZY")) {
      const float x = static_cast<float>(std::atof(v));
      s.lazy = x >= 0.f ? std::min(x, 12.f) : 0.f;
    }
    return s;
  }
};

Switches& switches_storage() {
  static Switches s = Switches::from_env();  // first use; thread-safe initialisation
  return s;
}

const Switches& switches() { return switches_storage(); }

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return dk::kF32;
    case at::kHalf: return dk::kF16;
    case at::kBFloat16: return dk::kBF16;
    default: return -1;
  }
}

// A small input the kernels read as scalars: float32/float16/bfloat16 as is, others as float32.
at::Tensor small_input(const std::optional<at::Tensor>& t, bool used, bool contiguous) {
  if (!used || !t.has_value() || !t->defined()) return at::Tensor();
  at::Tensor x = *t;
  if (dtype_code(x.scalar_type()) < 0) x = x.to(at::kFloat);
  return contiguous ? x.contiguous() : x;
}

// q, k, v rows are read with 16-byte vector copies: last dim contiguous, rows 16-byte aligned.
at::Tensor rows_aligned(const at::Tensor& x) {
  const int64_t vec = 16 / x.element_size();
  const bool ok = x.stride(2) == 1 && x.stride(0) % vec == 0 && x.stride(1) % vec == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// Sets p.nsplit, p.chunk and p.n_attn_blocks (launch 1's attention blocks) for a device of `sms` SMs.
void plan_split(dk::Params& p, int D, int sms, int split_keys) {
  // Split the key range so that there is about one attention block per SM at small B (B = 1,
  // HKV = 2, W = 32640: 64 splits of 512 keys; the state blocks take the other slots), and cap a
  // split at 1024 keys at large B so that the partials stay ~1% of the K/V bytes. One block per
  // SM beat filling every slot (two blocks of half the keys) on the H200: a block's
  // warps are latency-bound (few warps per scheduler either way), and fewer splits are fewer
  // prologues, merges and partials (benchmarks/NOTES_decode.md).
  const int64_t units = (int64_t(p.S) + p.W + dk::kSplitAlign - 1) / dk::kSplitAlign;
  const int64_t pairs = int64_t(p.B) * p.HKV * p.ngt;
  const int64_t want = std::max<int64_t>(int64_t(sms) / pairs, 1);
  int64_t nsplit = std::max<int64_t>(want, (units + 15) / 16);
  if (split_keys > 0) nsplit = (units * dk::kSplitAlign + split_keys - 1) / split_keys;  // AHN_DECODE_SPLIT_KEYS
  nsplit = std::min<int64_t>(std::max<int64_t>(nsplit, 1), units);
  const int64_t chunk_units = (units + nsplit - 1) / nsplit;
  nsplit = (units + chunk_units - 1) / chunk_units;
  const int64_t n_attn = pairs * nsplit;
  const int64_t n_state = int64_t(p.B) * p.H * (D / dk::kStateCols);
  TORCH_CHECK_VALUE(n_attn + n_state < INT_MAX, "ahn.decode_step: batch too large for one launch");
  p.nsplit = static_cast<int>(nsplit);
  p.chunk = static_cast<int>(chunk_units * dk::kSplitAlign);
  p.n_attn_blocks = static_cast<int>(n_attn);
}

template <typename T, int D, bool MMA, int NST = dk::MmaStages<D>::value, int MINB = (MMA ? 3 : 2)>
void launch(dk::Params& p, int device, bool pdl, cudaStream_t stream) {
  auto main_kernel = dk::decode_main_kernel<T, D, MMA, NST, MINB>;
  constexpr int smem = dk::MainSmem<T, D, MMA, NST>::kBytes;
  // once per instantiation and device: the >48 KB dynamic shared memory opt-in
  static std::atomic<uint64_t> attr_set{0};
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (!(attr_set.load() & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(main_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    attr_set.fetch_or(bit);
  }
  const int64_t n_attn = p.n_attn_blocks, nsplit = p.nsplit;  // from plan_split
  const int64_t n_state = int64_t(p.B) * p.H * (D / dk::kStateCols);

  // workspace: partials, readout, per-slice sums of m^2, t
  const int64_t BH = int64_t(p.B) * p.H;
  auto align = [](int64_t n) { return (n + 63) / 64 * 64; };  // in 4-byte words: 256-byte pieces
  const int64_t n_po = align(BH * nsplit * D), n_pm = align(BH * nsplit), n_m = align(BH * D);
  const int64_t n_m2 = align(BH * (D / dk::kStateCols)), n_t = align(2 * int64_t(p.B));
  at::Tensor ws = at::empty({n_po + 2 * n_pm + n_m + n_m2 + n_t},
                            at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
  if (switches().poison) ws.fill_(std::numeric_limits<float>::quiet_NaN());  // tests: unwritten -> NaN
  float* w = ws.data_ptr<float>();
  p.ws_po = w;
  p.ws_pm = w + n_po;
  p.ws_pl = p.ws_pm + n_pm;
  p.ws_m = p.ws_pl + n_pm;
  p.ws_m2 = p.ws_m + n_m;
  p.ws_t = reinterpret_cast<int64_t*>(p.ws_m2 + n_m2);

  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  // launch 1: with p.early, programmatic dependent launch after the previous kernel (see Params::early)
  cudaLaunchConfig_t cfg1 = {};
  cfg1.gridDim = dim3(static_cast<unsigned>(n_attn + n_state));
  cfg1.blockDim = dim3(dk::kThreads);
  cfg1.dynamicSmemBytes = smem;
  cfg1.stream = stream;
  cfg1.attrs = attr;
  cfg1.numAttrs = p.early ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg1, main_kernel, p));

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(BH * dk::kOutSplit));
  cfg.blockDim = dim3(dk::kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, dk::decode_finish_kernel<T, D>, p));
}

template <typename T>
void dispatch_d(dk::Params& p, int D, bool mma, int device, bool pdl, cudaStream_t stream) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const Switches& sw = switches();
  plan_split(p, D, sms, sw.split_keys);
  if constexpr (std::is_same_v<T, float>) {
    if (D == 64) launch<T, 64, false>(p, device, pdl, stream);
    else launch<T, 128, false>(p, device, pdl, stream);
  } else {
    if (mma) {
      const int nst = sw.stages;  // AHN_DECODE_STAGES: cp.async stages at D = 128
      // registers for 2 blocks per SM (255) while the attention blocks fit 2 per SM, else for 3 (168).
      // H200, graph us per layer-step 168 vs 255 registers: B=1 16.04-16.12 vs 15.93,
      // B=2 25.40-25.70 vs 25.29-25.33, B=4 45.83-45.89 vs 43.76-43.78, B=16 146.1-146.3 vs 151.0
      const bool two = sw.two_blocks.value_or(p.n_attn_blocks <= 2 * sms);  // AHN_DECODE_MINB forces it
      if (D == 64) launch<T, 64, true>(p, device, pdl, stream);
      else if (nst == 3) launch<T, 128, true, 3, 2>(p, device, pdl, stream);
      else if (nst == 4) launch<T, 128, true, 4, 1>(p, device, pdl, stream);
      else if (two) launch<T, 128, true, 2, 2>(p, device, pdl, stream);
      else launch<T, 128, true>(p, device, pdl, stream);
    } else {
      if (D == 64) launch<T, 64, false>(p, device, pdl, stream);
      else launch<T, 128, false>(p, device, pdl, stream);
    }
  }
}

at::Tensor decode_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                            const at::Tensor& z, const std::optional<at::Tensor>& A_log,
                            const std::optional<at::Tensor>& dt_bias, const at::Tensor& norm_weight,
                            const at::Tensor& o_weight, at::Tensor& sink_k, at::Tensor& sink_v, at::Tensor& ring_k,
                            at::Tensor& ring_v, at::Tensor& gates, at::Tensor& state, at::Tensor& pos,
                            int64_t window, int64_t sinks, c10::string_view kind_name, bool overlap_prev) {
  // ---- checks: all before anything is launched, so a rejected call leaves the cache as it was
  const std::string_view kind_sv(kind_name.data(), kind_name.size());
  const DecodeSizes s = check_decode_args(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, sink_k, sink_v,
                                          ring_k, ring_v, gates, state, pos, window, sinks, kind_sv);
  using detail::value_error;  // std::to_string messages: see ahn_decode_check.h
  if (!q.is_cuda()) value_error("ahn.decode_step (CUDA): q must be a CUDA tensor, got " + q.device().str());
  if (!(s.D == 64 || s.D == 128)) {
    value_error("ahn.decode_step (CUDA): head dim D (q.shape[2]) must be 64 or 128, got " + std::to_string(s.D));
  }
  if (s.W + s.S >= (int64_t{1} << 30)) {
    value_error("ahn.decode_step (CUDA): window + sinks must be < 2^30, got " + std::to_string(s.W + s.S));
  }
  if (s.B * s.H >= INT_MAX / 4) value_error("ahn.decode_step (CUDA): B * H too large, got " + std::to_string(s.B * s.H));

  // K/V rows are copied in 16-byte pieces (cp.async): the cache must start 16-byte aligned (a contiguous
  // view at an element offset that is not a multiple of 8 would fault inside the kernel)
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"sink_k", &sink_k}, {"sink_v", &sink_v},
                                {"ring_k", &ring_k}, {"ring_v", &ring_v}}) {
    if (t->numel() > 0 && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) {
      value_error(std::string("ahn.decode_step (CUDA): ") + name +
                  " must start at a 16-byte aligned address (a view at an odd element offset is not)");
    }
  }

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.B, s.H, s.D}, q.options());
  if (s.B == 0) return out;
  const Switches& sw = switches();
  if (sw.poison) out.fill_(std::numeric_limits<float>::quiet_NaN());

  const bool gated = s.kind != Kind::kDN, has_b = s.kind != Kind::kMamba2;
  const at::Tensor qc = rows_aligned(q), kc = rows_aligned(k), vc = rows_aligned(v);
  const at::Tensor at_ = small_input(a, gated, false), bt = small_input(b, has_b, false);
  const at::Tensor zt = small_input(z, true, false);
  const at::Tensor alog = small_input(A_log, gated, true), dtb = small_input(dt_bias, gated, true);
  const at::Tensor nw = small_input(norm_weight, true, true), ow = small_input(o_weight, true, true);

  dk::Params p = {};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.a = at_.defined() ? at_.data_ptr() : nullptr;
  p.b = bt.defined() ? bt.data_ptr() : nullptr;
  p.z = zt.data_ptr();
  p.A_log = alog.defined() ? alog.data_ptr() : nullptr;
  p.dt_bias = dtb.defined() ? dtb.data_ptr() : nullptr;
  p.norm_w = nw.data_ptr();
  p.o_w = ow.data_ptr();
  p.sink_k = sink_k.data_ptr();
  p.sink_v = sink_v.data_ptr();
  p.ring_k = ring_k.data_ptr();
  p.ring_v = ring_v.data_ptr();
  p.gates = gates.data_ptr();
  p.state = state.data_ptr<float>();
  p.pos = pos.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.B = static_cast<int>(s.B);
  p.H = static_cast<int>(s.H);
  p.HKV = static_cast<int>(s.HKV);
  p.G = static_cast<int>(s.H / s.HKV);
  p.W = static_cast<int>(s.W);
  p.S = static_cast<int>(s.S);
  p.ngt = (p.G + dk::kHeadTile - 1) / dk::kHeadTile;
  p.q_sb = qc.stride(0);
  p.q_sh = qc.stride(1);
  p.k_sb = kc.stride(0);
  p.k_sh = kc.stride(1);
  p.v_sb = vc.stride(0);
  p.v_sh = vc.stride(1);
  if (at_.defined()) {
    p.a_sb = at_.stride(0);
    p.a_sh = at_.stride(1);
    p.a_dt = dtype_code(at_.scalar_type());
  }
  if (bt.defined()) {
    p.b_sb = bt.stride(0);
    p.b_sh = bt.stride(1);
    p.b_dt = dtype_code(bt.scalar_type());
  }
  p.z_sb = zt.stride(0);
  p.z_sh = zt.stride(1);
  p.z_dt = dtype_code(zt.scalar_type());
  p.alog_dt = alog.defined() ? dtype_code(alog.scalar_type()) : 0;
  p.dtb_dt = dtb.defined() ? dtype_code(dtb.scalar_type()) : 0;
  p.nw_dt = dtype_code(nw.scalar_type());
  p.ow_dt = dtype_code(ow.scalar_type());
  p.kind = s.kind == Kind::kGDN ? dk::kGDN : (s.kind == Kind::kDN ? dk::kDN : dk::kMamba2);
  p.scale = 1.f / std::sqrt(static_cast<float>(s.D));
  p.lazy = sw.lazy;

  const int device = q.get_device();
  const bool mma = !sw.simt;
  int cc_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device));
  const bool pdl = sw.pdl && cc_major >= 9;
  // overlap_prev: the caller vouches that the kernel right before this op writes none of the cache (it
  // writes q, k, v: the fused projection of StaticDecoder, which also triggers its dependents early)
  p.early = overlap_prev && pdl ? 1 : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const int D = static_cast<int>(s.D);
  switch (q.scalar_type()) {
    case at::kFloat: dispatch_d<float>(p, D, mma, device, pdl, stream); break;
    case at::kHalf: dispatch_d<__half>(p, D, mma, device, pdl, stream); break;
    default: dispatch_d<__nv_bfloat16>(p, D, mma, device, pdl, stream); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ahn, CUDA, m) { m.impl("decode_step", &decode_step_cuda); }

// Declared in csrc/torch_bindings.cpp: ahn_ops._C.reread_decode_switches().
void reread_decode_switches() { switches_storage() = Switches::from_env(); }

}  // namespace ahn
