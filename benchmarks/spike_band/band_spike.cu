// C entry point of the sm_90a band spike for ctypes (benchmarks/spike_band.py compiles it with nvcc alone:
// no torch headers, so the build takes seconds). dtype 0 bf16, 1 fp16; variant 0 intra-warpgroup overlap
// only, 1 with the warpgroups' ping-pong.
#include "sm90/ahn_fwd_sm90.cuh"

template <class E>
static void launch(int variant, void const* q, void const* k, void const* v, void* o, float* lse, int B, int T,
                   int H, int HKV, int W, int S, long long qs, long long kvs, cudaStream_t st) {
  auto args = [&](auto fn) {
    fn(static_cast<E const*>(q), static_cast<E const*>(k), static_cast<E const*>(v), static_cast<E*>(o), lse, B, T,
       H, HKV, W, S, qs, kvs, st);
  };
  if (variant == 1) {
    args(ahn_sm90::band_fwd_launch<E, true>);
  } else {
    args(ahn_sm90::band_fwd_launch<E, false>);
  }
}

extern "C" int ahn_band_fwd(int dtype, int variant, void const* q, void const* k, void const* v, void* o, float* lse,
                            int B, int T, int H, int HKV, int W, int S, long long q_row_stride,
                            long long kv_row_stride, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (dtype == 0) {
    launch<cutlass::bfloat16_t>(variant, q, k, v, o, lse, B, T, H, HKV, W, S, q_row_stride, kv_row_stride, st);
  } else {
    launch<cutlass::half_t>(variant, q, k, v, o, lse, B, T, H, HKV, W, S, q_row_stride, kv_row_stride, st);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int ahn_fused_fwd(int dtype, int variant, void const* q, void const* k, void const* v, void const* vnew,
                             void const* hs, void const* ow, float const* gc, void const* z, float const* nw, void* o,
                             float* lse, int B, int T, int H, int HKV, int W, int S, float mem_scale, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  auto run = [&](auto e, auto pingpong) {
    using E = decltype(e);
    ahn_sm90::ahn_fwd_launch<E, decltype(pingpong)::value>(
        static_cast<E const*>(q), static_cast<E const*>(k), static_cast<E const*>(v), static_cast<E const*>(vnew),
        static_cast<E const*>(hs), static_cast<E const*>(ow), gc, static_cast<E const*>(z), nw, static_cast<E*>(o),
        lse, B, T, H, HKV, W, S, mem_scale, st);
  };
  if (dtype == 0) {
    variant == 1 ? run(cutlass::bfloat16_t{}, cute::true_type{}) : run(cutlass::bfloat16_t{}, cute::false_type{});
  } else {
    variant == 1 ? run(cutlass::half_t{}, cute::true_type{}) : run(cutlass::half_t{}, cute::false_type{});
  }
  return static_cast<int>(cudaGetLastError());
}
