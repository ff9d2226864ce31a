// torch.ops.ahn.band_bwd_sm90: the sm_90a window band backward (csrc/cuda/sm90/ahn_bwd_sm90.cuh) behind the op
// schema of csrc/torch_bindings.cpp. Built with the forward's kernel (setup.py, CMakeLists.txt);
// ahn_ops.ops.ahn_attention.backward calls it under CONFIG["band"] = "sm90".
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "sm90/sm90_op.h"
#include "sm90/ahn_bwd_sm90.cuh"

namespace {

void check_flat(const at::Tensor& x, const char* name, int64_t Tt, int64_t heads, int64_t D, at::ScalarType dtype,
                const at::Tensor& q) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == Tt && x.size(1) == heads && x.size(2) == D, "band_bwd_sm90: ", name,
              " must be [", Tt, ", ", heads, ", ", D, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "band_bwd_sm90: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == q.device(), "band_bwd_sm90: ", name, " must be on ", q.device(), ", got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "band_bwd_sm90: ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "band_bwd_sm90: ", name,
              " must start on a 16-byte boundary (TMA, bulk reductions)");
}

void band_bwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                   const at::Tensor& ld, int64_t window, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  TORCH_CHECK(q.dim() == 3, "band_bwd_sm90: q must be [tokens, H, D], got ", q.sizes());
  const int64_t Tt = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 128, "band_bwd_sm90: head_dim must be 128, got ", D);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "band_bwd_sm90: q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.is_cuda(), "band_bwd_sm90: q must be a CUDA tensor");
  TORCH_CHECK(Tt >= 1 && Tt < (int64_t(1) << 31), "band_bwd_sm90: tokens must be in [1, 2^31), got ", Tt);
  TORCH_CHECK(k.dim() == 3 && k.size(1) >= 1 && H % k.size(1) == 0, "band_bwd_sm90: k must be [tokens, HKV, D] ",
              "with H % HKV == 0, got ", k.sizes(), " for H = ", H);
  const int64_t HKV = k.size(1);
  TORCH_CHECK(window >= 1, "band_bwd_sm90: window must be >= 1, got ", window);
  check_flat(q, "q", Tt, H, D, q.scalar_type(), q);
  check_flat(k, "k", Tt, HKV, D, q.scalar_type(), q);
  check_flat(v, "v", Tt, HKV, D, q.scalar_type(), q);
  check_flat(dout, "dout", Tt, H, D, q.scalar_type(), q);
  check_flat(dq, "dq", Tt, H, D, at::kFloat, q);
  check_flat(dk, "dk", Tt, HKV, D, at::kFloat, q);
  check_flat(dv, "dv", Tt, HKV, D, at::kFloat, q);
  // ld [2, H, Tpad]: lse (log2 domain) and delta per head and row; rows of 16 bytes for TMA
  TORCH_CHECK(ld.dim() == 3 && ld.size(0) == 2 && ld.size(1) == H && ld.size(2) >= Tt && ld.size(2) % 4 == 0 &&
                  ld.scalar_type() == at::kFloat && ld.is_contiguous() && ld.device() == q.device(),
              "band_bwd_sm90: ld must be a contiguous float32 [2, ", H, ", Tpad] with Tpad >= ", Tt,
              " a multiple of 4 on ", q.device(), ", got ", ld.scalar_type(), " ", ld.sizes());
  // cu_seqlens: int32 [N + 1] from 0 to tokens, non-decreasing (the caller's promise), the longest max_seqlen
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2 && cu_seqlens.scalar_type() == at::kInt &&
                  cu_seqlens.is_contiguous() && cu_seqlens.device() == q.device(),
              "band_bwd_sm90: cu_seqlens must be a contiguous int32 [N + 1] (N >= 1) on ", q.device(), ", got ",
              cu_seqlens.scalar_type(), " ", cu_seqlens.sizes(), " on ", cu_seqlens.device());
  const int64_t n_seq = cu_seqlens.size(0) - 1;
  TORCH_CHECK(n_seq < 65536, "band_bwd_sm90: at most 65535 sequences, got ", n_seq);
  TORCH_CHECK(max_seqlen >= 1 && max_seqlen <= Tt, "band_bwd_sm90: max_seqlen must be in [1, ", Tt, "], got ",
              max_seqlen);
  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  ahn_sm90::require_sm90(device, "band_bwd_sm90");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  auto run = [&](auto element) {
    using E = decltype(element);
    auto ptr = [](const at::Tensor& x) { return reinterpret_cast<E const*>(x.data_ptr()); };
    ahn_sm90::BwdProblem<E> f;
    f.q = ptr(q), f.k = ptr(k), f.v = ptr(v), f.dout = ptr(dout);
    f.ld = ld.data_ptr<float>();
    f.dq = dq.data_ptr<float>(), f.dk = dk.data_ptr<float>(), f.dv = dv.data_ptr<float>();
    // a window past the longest sequence is the same band (every j <= t), and keeps the kernel's int sums small
    f.Tt = int(Tt), f.Tpad = int(ld.size(2)), f.H = int(H), f.HKV = int(HKV);
    f.W = int(std::min<int64_t>(window, max_seqlen));
    f.cu = cu_seqlens.data_ptr<int>(), f.n_seq = int(n_seq), f.max_T = int(max_seqlen);
    ahn_sm90::launch_bwd<E>(f, stream);
  };
  if (q.scalar_type() == at::kBFloat16) {
    run(cutlass::bfloat16_t{});
  } else {
    run(cutlass::half_t{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(ahn, CUDA, m) { m.impl("band_bwd_sm90", &band_bwd_sm90); }
