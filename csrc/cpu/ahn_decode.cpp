// CPU implementation of torch.ops.ahn.decode_step: checks, then the three phases of
// csrc/ahn_decode_math.h with at::parallel_for over (sequence, head).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <vector>

#include "ahn_decode_check.h"
#include "ahn_decode_math.h"

namespace ahn {
namespace {

const float* fp32_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Optional per-head inputs in any float dtype, read as contiguous fp32 (a no-op when they are).
at::Tensor as_fp32(const std::optional<at::Tensor>& t, bool used) {
  return used && t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

template <typename T>
void run(DecodeParams<T> p) {
  // Phase 1 reads (S + W) * D cache values and 3 * D * D state values per (b, h); aim for at
  // least ~64k of them per task so that small batches do not drown in scheduling.
  const int64_t per_head = (p.S + p.W + 3 * p.D) * p.D;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_head);
  at::parallel_for(0, p.B * p.H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(p.S + p.W), buf(2 * p.D);
    for (int64_t i = begin; i < end; ++i) decode_head_attend(p, i / p.H, i % p.H, scores.data(), buf.data());
  });
  // Phase 2 needs every head of a sequence done (mamba2 normalises across heads).
  at::parallel_for(0, p.B * p.H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(p.D);
    for (int64_t i = begin; i < end; ++i) decode_head_project(p, i / p.H, i % p.H, buf.data());
  });
  // Phase 3 writes the ring slot that phase 1 read the leaving token from.
  for (int64_t b = 0; b < p.B; ++b) decode_write(p, b);
}

at::Tensor decode_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                           const at::Tensor& z, const std::optional<at::Tensor>& A_log,
                           const std::optional<at::Tensor>& dt_bias, const at::Tensor& norm_weight,
                           const at::Tensor& o_weight, at::Tensor& sink_k, at::Tensor& sink_v, at::Tensor& ring_k,
                           at::Tensor& ring_v, at::Tensor& gates, at::Tensor& state, at::Tensor& pos,
                           int64_t window, int64_t sinks, c10::string_view kind_name, bool overlap_prev) {
  (void)overlap_prev;  // a CUDA launch hint
  const std::string_view kind_sv(kind_name.data(), kind_name.size());
  const DecodeSizes s = check_decode_args(q, k, v, a, b, z, A_log, dt_bias, norm_weight, o_weight, sink_k, sink_v,
                                          ring_k, ring_v, gates, state, pos, window, sinks, kind_sv);
  if (s.B > 0) {
    const int64_t lowest = pos.min().item<int64_t>();
    if (lowest < 0) detail::value_error("ahn.decode_step: pos must be >= 0, got min(pos) = " + std::to_string(lowest));
  }

  const bool gated = s.kind != Kind::kDN, has_b = s.kind != Kind::kMamba2;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor a32 = as_fp32(a, gated), b32 = as_fp32(b, has_b), z32 = as_fp32(z, true);
  const at::Tensor A_log32 = as_fp32(A_log, gated), dt_bias32 = as_fp32(dt_bias, gated);
  const at::Tensor nw32 = as_fp32(norm_weight, true), ow32 = as_fp32(o_weight, true);
  at::Tensor out = at::empty({s.B, s.H, s.D}, q.options());
  at::Tensor scratch = at::empty({2, s.B, s.H, s.D}, q.options().dtype(at::kFloat));

  auto launch = [&](auto dummy) {
    using T = decltype(dummy);
    DecodeParams<T> p{};
    p.q = qc.data_ptr<T>();
    p.k = kc.data_ptr<T>();
    p.v = vc.data_ptr<T>();
    p.a = fp32_ptr(a32);
    p.b = fp32_ptr(b32);
    p.z = fp32_ptr(z32);
    p.A_log = fp32_ptr(A_log32);
    p.dt_bias = fp32_ptr(dt_bias32);
    p.norm_weight = fp32_ptr(nw32);
    p.o_weight = fp32_ptr(ow32);
    p.sink_k = sink_k.data_ptr<T>();
    p.sink_v = sink_v.data_ptr<T>();
    p.ring_k = ring_k.data_ptr<T>();
    p.ring_v = ring_v.data_ptr<T>();
    p.gates = gates.data_ptr<T>();
    p.state = state.data_ptr<float>();
    p.pos = pos.data_ptr<int64_t>();
    p.out = out.data_ptr<T>();
    p.o_win = scratch[0].data_ptr<float>();
    p.u = scratch[1].data_ptr<float>();
    p.B = s.B, p.H = s.H, p.HKV = s.HKV, p.D = s.D, p.W = s.W, p.S = s.S;
    p.kind = s.kind;
    run(p);
  };
  switch (q.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(at::Half{}); break;
    default: launch(at::BFloat16{}); break;  // the checks allow no other dtype
  }
  return out;
}

}  // namespace
}  // namespace ahn

TORCH_LIBRARY_IMPL(ahn, CPU, m) { m.impl("decode_step", &ahn::decode_step_cpu); }
