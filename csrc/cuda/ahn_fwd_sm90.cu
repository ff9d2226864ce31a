// torch.ops.ahn.prefill_fwd_sm90: the sm_90a forward kernel (csrc/cuda/sm90/ahn_fwd_sm90.cuh) behind the
// op schema of csrc/torch_bindings.cpp. Built only where the CUTLASS headers are found and sm_90a is a target
// (setup.py, CMakeLists.txt); ahn_ops.ops.ahn_attention.prefill calls it under CONFIG["band"] = "sm90".
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "sm90/sm90_op.h"
#include "sm90/ahn_fwd_sm90.cuh"

namespace {

void check_rows(const at::Tensor& x, const char* name, int64_t B, int64_t T, int64_t heads, int64_t D,
                at::ScalarType dtype, const at::Tensor& q) {
  TORCH_CHECK(x.dim() == (D ? 4 : 3) && x.size(0) == B && x.size(1) == T && x.size(2) == heads &&
                  (!D || x.size(3) == D),
              "prefill_fwd_sm90: ", name, " must be [", B, ", ", T, ", ", heads, D ? ", " + std::to_string(D) : "",
              "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "prefill_fwd_sm90: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == q.device(), "prefill_fwd_sm90: ", name, " must be on ", q.device(), ", got ",
              x.device());
  TORCH_CHECK(x.is_contiguous(), "prefill_fwd_sm90: ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "prefill_fwd_sm90: ", name,
              " must start on a 16-byte boundary (TMA)");
}

std::tuple<at::Tensor, at::Tensor> prefill_fwd_sm90(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& v_new,
    const std::optional<at::Tensor>& hs, const std::optional<at::Tensor>& o_weight,
    const std::optional<at::Tensor>& gc, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& norm_weight, int64_t window, int64_t sinks, double mem_scale, int64_t variant,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, const std::optional<at::Tensor>& pos,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v, bool initial_state,
    const std::optional<at::Tensor>& yp, const std::optional<at::Tensor>& ss, const std::optional<at::Tensor>& ready,
    int64_t ready_target, const std::optional<at::Tensor>& deferred, bool memory_only,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& chunk_start, bool rows_outer) {
  TORCH_CHECK(q.dim() == 4, "prefill_fwd_sm90: q must be [B, T, H, D], got ", q.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 128, "prefill_fwd_sm90: head_dim must be 128, got ", D);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "prefill_fwd_sm90: q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.is_cuda(), "prefill_fwd_sm90: q must be a CUDA tensor");
  TORCH_CHECK(k.dim() == 4 && k.size(2) >= 1 && H % k.size(2) == 0, "prefill_fwd_sm90: k must be [B, T, HKV, D] ",
              "with H % HKV == 0, got ", k.sizes(), " for H = ", H);
  const int64_t HKV = k.size(2);
  TORCH_CHECK(window >= 1, "prefill_fwd_sm90: window must be >= 1, got ", window);
  TORCH_CHECK(sinks >= 0, "prefill_fwd_sm90: sinks must be >= 0, got ", sinks);
  TORCH_CHECK(variant >= 0 && variant <= 2, "prefill_fwd_sm90: variant must be 0, 1 or 2, got ", variant);
  TORCH_CHECK(T >= 1 && B * (T + window) < (int64_t(1) << 31), "prefill_fwd_sm90: T must be >= 1 and B (T + ",
              "window) < 2^31, got B = ", B, ", T = ", T);
  const bool varlen = cu_seqlens.has_value(), cache = pos.has_value();
  TORCH_CHECK(!(varlen && cache), "prefill_fwd_sm90: cu_seqlens and pos exclude each other");
  check_rows(q, "q", B, T, H, D, q.scalar_type(), q);
  // the key streams: q's own rows, or on a cache each sequence's W ring-tail rows then its T new tokens
  const int64_t kB = cache ? 1 : B, kT = cache ? B * (window + T) : T;
  check_rows(k, "k", kB, kT, HKV, D, q.scalar_type(), q);
  check_rows(v, "v", kB, kT, HKV, D, q.scalar_type(), q);
  // varlen: B = 1, sequence n the rows cu_seqlens[n] .. cu_seqlens[n + 1] - 1 (int32, on q's device, from 0 to
  // T, non-decreasing: the caller's promise, as flash-attention's), the longest max_seqlen
  int64_t n_seq = B, max_T = T;
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(B == 1, "prefill_fwd_sm90: with cu_seqlens, q must be [1, T, H, D], got ", q.sizes());
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2 && cu.scalar_type() == at::kInt && cu.is_contiguous() &&
                    cu.device() == q.device(),
                "prefill_fwd_sm90: cu_seqlens must be a contiguous int32 [N + 1] (N >= 1) on ", q.device(), ", got ",
                cu.scalar_type(), " ", cu.sizes(), " on ", cu.device());
    TORCH_CHECK(max_seqlen >= 1 && max_seqlen <= T, "prefill_fwd_sm90: max_seqlen must be in [1, ", T,
                "] with cu_seqlens, got ", max_seqlen);
    n_seq = cu.size(0) - 1;
    max_T = max_seqlen;
  }
  TORCH_CHECK(n_seq < 65536, "prefill_fwd_sm90: at most 65535 sequences, got ", n_seq);
  // rows_outer: the grid (heads, row blocks, sequences), whose second dimension stops at 65535 blocks of 128
  TORCH_CHECK(!rows_outer || (max_T + 127) / 128 < 65536, "prefill_fwd_sm90: rows_outer takes sequences of at most ",
              65535 * 128, " tokens, got ", max_T);
  // the cache path: positions pos [B] int64 (>= 0, below 2^31 - T: the caller's promise) on q's device, the
  // sinks in sink_k / sink_v [B, S, HKV, D] (absent for S = 0)
  if (cache) {
    TORCH_CHECK(pos->dim() == 1 && pos->size(0) == B && pos->scalar_type() == at::kLong && pos->is_contiguous() &&
                    pos->device() == q.device(),
                "prefill_fwd_sm90: pos must be a contiguous int64 [", B, "] on ", q.device(), ", got ",
                pos->scalar_type(), " ", pos->sizes(), " on ", pos->device());
    TORCH_CHECK(sink_k.has_value() == (sinks > 0) && sink_v.has_value() == (sinks > 0),
                "prefill_fwd_sm90: with pos, sink_k and sink_v are given exactly when sinks > 0");
    if (sinks > 0) {
      check_rows(*sink_k, "sink_k", B, sinks, HKV, D, q.scalar_type(), q);
      check_rows(*sink_v, "sink_v", B, sinks, HKV, D, q.scalar_type(), q);
    }
  } else {
    TORCH_CHECK(!sink_k.has_value() && !sink_v.has_value(),
                "prefill_fwd_sm90: sink_k and sink_v belong to the cache path (pos); a prefill's sinks are its "
                "first tokens");
  }
  const bool memory = v_new.has_value();
  TORCH_CHECK(hs.has_value() == memory && o_weight.has_value() == memory && gc.has_value() == memory &&
                  z.has_value() == memory && norm_weight.has_value() == memory,
              "prefill_fwd_sm90: v_new, hs, o_weight, gc, z and norm_weight come all together or not at all");
  TORCH_CHECK(memory || !initial_state, "prefill_fwd_sm90: initial_state needs the memory's buffers");
  // Mamba2: yp and ss (the kernel's outputs for the cross-head norm after it)
  const bool mamba2 = yp.has_value();
  TORCH_CHECK(ss.has_value() == mamba2 && (memory || !mamba2),
              "prefill_fwd_sm90: yp and ss (Mamba2) come together, with the memory's buffers");
  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  ahn_sm90::require_sm90(device, "prefill_fwd_sm90");
  // hs: each sequence's ceil(T_n / 64) chunk states after the earlier sequences' (at least ceil(T / 64) rows;
  // under varlen up to N - 1 more, which only cu_seqlens' values decide: rows past hs's own read as zeros)
  const int64_t NT = (T + 63) / 64;
  if (memory) {
    check_rows(*v_new, "v_new", B, T, H, D, q.scalar_type(), q);
    check_rows(*gc, "gc", B, T, H, 0, at::kFloat, q);
    check_rows(*z, "z", B, T, H, 0, q.scalar_type(), q);
    const int64_t hs_min = B * NT, hs_max = varlen ? NT + n_seq - 1 : hs_min;
    TORCH_CHECK(hs->dim() == 4 && hs->size(0) >= hs_min && hs->size(0) <= hs_max, "prefill_fwd_sm90: hs must be [",
                hs_min == hs_max ? std::to_string(hs_min) : std::to_string(hs_min) + ".." + std::to_string(hs_max),
                ", ", H, ", ", D, ", ", D, "], got ", hs->sizes());
    check_rows(*hs, "hs", hs->size(0), H, D, D, q.scalar_type(), q);
    check_rows(*o_weight, "o_weight", H, D, D, 0, q.scalar_type(), q);
    const int64_t nw_size = mamba2 ? H * D : D;  // Mamba2: one per head
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == nw_size &&
                    norm_weight->scalar_type() == at::kFloat && norm_weight->is_contiguous() &&
                    norm_weight->device() == q.device(),
                "prefill_fwd_sm90: norm_weight must be a contiguous float32 [", nw_size, "] on ", q.device());
    if (mamba2) {
      check_rows(*yp, "yp", B, T, H, D, q.scalar_type(), q);
      check_rows(*ss, "ss", B, T, H, 0, at::kFloat, q);
    }
  }
  // the memory passes beside the kernel: their ready counters (int32, one per chunk row of hs and head), the
  // tiles' deferred flags (uint8, zeros); memory_only: the launch after them, for the deferred tiles
  const int64_t tiles = ahn_sm90::n_tiles(int(max_T), int(H), int(n_seq));
  TORCH_CHECK(!(ready.has_value() || memory_only) || (memory && deferred.has_value()),
              "prefill_fwd_sm90: ready and memory_only need the memory's buffers and deferred");
  TORCH_CHECK(!(ready.has_value() && memory_only), "prefill_fwd_sm90: a memory_only launch reads no ready counters");
  TORCH_CHECK(out.has_value() == memory_only, "prefill_fwd_sm90: out (the first launch's output) comes with, and "
              "only with, memory_only");
  if (memory_only) check_rows(*out, "out", B, T, H, D, q.scalar_type(), q);
  if (ready.has_value()) {
    TORCH_CHECK(ready->scalar_type() == at::kInt && ready->is_contiguous() && ready->device() == q.device() &&
                    ready->numel() == hs->size(0) * H && ready_target >= 1,
                "prefill_fwd_sm90: ready must be a contiguous int32 tensor of ", hs->size(0) * H,
                " counters on ", q.device(), " and ready_target >= 1");
  }
  if (deferred.has_value()) {
    TORCH_CHECK(deferred->scalar_type() == at::kByte && deferred->is_contiguous() &&
                    deferred->device() == q.device() && deferred->numel() == tiles,
                "prefill_fwd_sm90: deferred must be a contiguous uint8 tensor of ", tiles, " flags on ", q.device());
  }
  // varlen with the memory: each sequence's first chunk in hs (the sum of ceil(T_m / 64) over the sequences
  // before it; prefill's sequence table holds it), so that a CTA needs no loop over the earlier sequences
  TORCH_CHECK(chunk_start.has_value() == (varlen && memory), "prefill_fwd_sm90: chunk_start comes with, and ",
              "only with, cu_seqlens and the memory's buffers");
  if (chunk_start.has_value()) {
    TORCH_CHECK(chunk_start->dim() == 1 && chunk_start->size(0) == n_seq && chunk_start->scalar_type() == at::kInt &&
                    chunk_start->device() == q.device(),
                "prefill_fwd_sm90: chunk_start must be an int32 [", n_seq, "] (any stride) on ", q.device(), ", got ",
                chunk_start->scalar_type(), " ", chunk_start->sizes(), " on ", chunk_start->device());
  }
  // a memory-only launch adds to out in place and returns two empty tensors
  auto o = memory_only ? *out : at::empty_like(q);
  auto lse = at::empty({memory_only ? 0 : B, H, T}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  auto run = [&](auto element, auto kind) {
    using E = decltype(element);
    constexpr int kV = decltype(kind)::value;
    auto ptr = [](const at::Tensor& x) { return reinterpret_cast<E const*>(x.data_ptr()); };
    ahn_sm90::Problem<E> f;
    f.q = ptr(q), f.k = ptr(k), f.v = ptr(v);
    f.o = reinterpret_cast<E*>(o.data_ptr()), f.lse = lse.data_ptr<float>();
    f.B = int(B), f.T = int(T), f.H = int(H), f.HKV = int(HKV), f.W = int(window), f.S = int(sinks);
    f.cu = varlen ? cu_seqlens->data_ptr<int>() : nullptr, f.n_seq = int(n_seq), f.max_T = int(max_T);
    f.rows_outer = rows_outer;
    if (chunk_start.has_value()) {
      f.chunk_start = chunk_start->data_ptr<int>(), f.chunk_stride = chunk_start->stride(0);
    }
    if (cache) {
      f.pos = pos->data_ptr<int64_t>();
      if (sinks > 0) f.sink_k = ptr(*sink_k), f.sink_v = ptr(*sink_v);
    }
    if (memory) {
      f.vnew = ptr(*v_new), f.hs = ptr(*hs), f.ow = ptr(*o_weight), f.z = ptr(*z);
      f.gc = gc->data_ptr<float>(), f.nw = norm_weight->data_ptr<float>();
      f.hs_rows = int(hs->size(0)), f.mem_scale = float(mem_scale), f.use_h0 = initial_state;
      if (mamba2) f.yp = reinterpret_cast<E*>(yp->data_ptr()), f.ss = ss->data_ptr<float>();
      if (ready.has_value()) f.ready = ready->data_ptr<int>(), f.ready_target = int(ready_target);
      if (deferred.has_value()) f.deferred = deferred->data_ptr<uint8_t>();
      f.mem_only = memory_only;
      ahn_sm90::launch<E, true, kV>(f, stream);
    } else {
      ahn_sm90::launch<E, false, kV>(f, stream);
    }
  };
  auto by_variant = [&](auto element) {
    if (variant == 0) run(element, cute::Int<0>{});
    else if (variant == 1) run(element, cute::Int<1>{});
    else run(element, cute::Int<2>{});
  };
  if (q.scalar_type() == at::kBFloat16) {
    by_variant(cutlass::bfloat16_t{});
  } else {
    by_variant(cutlass::half_t{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (memory_only) return {at::empty({0}, q.options()), lse};
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(ahn, CUDA, m) { m.impl("prefill_fwd_sm90", &prefill_fwd_sm90); }
