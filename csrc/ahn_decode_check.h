// Argument checks of torch.ops.ahn.decode_step, shared by the CPU and CUDA bindings. They run
// before anything is written, so a rejected call leaves the cache as it was. Wrong shapes and
// values raise ValueError, wrong dtypes TypeError; each message names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ahn_decode_math.h"

namespace ahn {

struct DecodeSizes {
  int64_t B, H, HKV, D, W, S;
  Kind kind;
};

namespace detail {

// Messages are built with std::string and std::to_string, not c10::str: on the device's torch
// 2.11 build every c10::str message that streamed an integer segfaulted, while
// messages made of strings alone raised properly; std::to_string avoids the ostream path.
inline std::string dims(c10::IntArrayRef shape) {
  std::string r = "[";
  for (size_t i = 0; i < shape.size(); ++i) r += (i ? ", " : "") + std::to_string(shape[i]);
  return r + "]";
}

[[noreturn]] inline void value_error(const std::string& msg) { C10_THROW_ERROR(ValueError, msg); }
[[noreturn]] inline void type_error(const std::string& msg) { C10_THROW_ERROR(TypeError, msg); }

inline std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

// B, H, D come from q, HKV from k, W = window, S = sinks.
inline void check_shape(const at::Tensor& t, const char* name, const char* dims_text, std::vector<int64_t> shape) {
  if (t.sizes() != c10::IntArrayRef(shape)) {
    value_error(std::string("ahn.decode_step: ") + name + " must have shape " + dims_text + " = " + dims(shape) +
                ", got " + dims(t.sizes()) + " (B, H, D from q, HKV from k, W = window, S = sinks)");
  }
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  if (t.scalar_type() != dtype) {
    type_error(std::string("ahn.decode_step: ") + name + " must be " + dtype_name(dtype) + ", got " +
               dtype_name(t.scalar_type()));
  }
}

inline void check_float(const at::Tensor& t, const char* name) {
  if (!at::isFloatingType(t.scalar_type())) {
    type_error(std::string("ahn.decode_step: ") + name + " must be a floating-point tensor, got " +
               dtype_name(t.scalar_type()));
  }
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  if (t.device() != device) {
    value_error(std::string("ahn.decode_step: ") + name + " is on " + t.device().str() + " but q is on " +
                device.str());
  }
}

inline void check_cache(const at::Tensor& t, const char* name, const char* dims, std::vector<int64_t> shape,
                        at::ScalarType dtype, const at::Device& device) {
  check_dtype(t, name, dtype);
  check_device(t, name, device);
  check_shape(t, name, dims, std::move(shape));
  if (!t.is_contiguous()) {
    value_error(std::string("ahn.decode_step: ") + name + " must be contiguous (it is updated in place)");
  }
}

// A per-head parameter: required for some kinds, unused (may be None) for the others.
inline void check_param(const std::optional<at::Tensor>& t, const char* name, const char* dims,
                        std::vector<int64_t> shape, bool required, std::string_view kind, const at::Device& device) {
  if (!required) return;
  if (!(t.has_value() && t->defined())) {
    value_error(std::string("ahn.decode_step: ") + name + " is required for kind=\"" + std::string(kind) + "\"");
  }
  check_float(*t, name);
  check_device(*t, name, device);
  check_shape(*t, name, dims, std::move(shape));
}

}  // namespace detail

inline Kind parse_kind(std::string_view kind) {
  if (kind == "gdn") return Kind::kGDN;
  if (kind == "dn") return Kind::kDN;
  if (kind != "mamba2") {
    detail::value_error("ahn.decode_step: kind must be \"gdn\", \"dn\" or \"mamba2\", got \"" + std::string(kind) +
                        "\"");
  }
  return Kind::kMamba2;
}

// Checks every argument of decode_step and returns the sizes. Device-independent: the CPU
// binding also checks pos >= 0, which on a GPU would cost a synchronisation.
inline DecodeSizes check_decode_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                                     const at::Tensor& z, const std::optional<at::Tensor>& A_log,
                                     const std::optional<at::Tensor>& dt_bias, const at::Tensor& norm_weight,
                                     const at::Tensor& o_weight, const at::Tensor& sink_k, const at::Tensor& sink_v,
                                     const at::Tensor& ring_k, const at::Tensor& ring_v, const at::Tensor& gates,
                                     const at::Tensor& state, const at::Tensor& pos, int64_t window, int64_t sinks,
                                     std::string_view kind_name) {
  using namespace detail;
  const Kind kind = parse_kind(kind_name);
  if (window < 1) value_error("ahn.decode_step: window must be >= 1, got " + std::to_string(window));
  if (sinks < 0) value_error("ahn.decode_step: sinks must be >= 0, got " + std::to_string(sinks));

  const auto dtype = q.scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16)) {
    type_error("ahn.decode_step: q must be float32, float16 or bfloat16, got " + dtype_name(dtype));
  }
  if (q.dim() != 3) value_error("ahn.decode_step: q must have shape [B, H, D], got " + dims(q.sizes()));
  if (k.dim() != 3) value_error("ahn.decode_step: k must have shape [B, HKV, D], got " + dims(k.sizes()));
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), HKV = k.size(1), W = window, S = sinks;
  if (!(D >= 1 && HKV >= 1 && H % HKV == 0)) {
    value_error("ahn.decode_step: the H = " + std::to_string(H) + " query heads of q must be a multiple of the HKV = " +
                std::to_string(HKV) + " key/value heads of k");
  }
  const auto device = q.device();

  check_dtype(k, "k", dtype);
  check_dtype(v, "v", dtype);
  check_device(k, "k", device);
  check_device(v, "v", device);
  check_shape(k, "k", "[B, HKV, D]", {B, HKV, D});
  check_shape(v, "v", "[B, HKV, D]", {B, HKV, D});
  const bool has_gates = kind != Kind::kDN;  // gdn, mamba2: a, A_log, dt_bias
  check_param(a, "a", "[B, H]", {B, H}, has_gates, kind_name, device);
  check_param(b, "b", "[B, H]", {B, H}, kind != Kind::kMamba2, kind_name, device);
  check_param(z, "z", "[B, H]", {B, H}, true, kind_name, device);
  check_param(A_log, "A_log", "[H]", {H}, has_gates, kind_name, device);
  check_param(dt_bias, "dt_bias", "[H]", {H}, has_gates, kind_name, device);
  if (kind == Kind::kMamba2) {
    check_param(norm_weight, "norm_weight", "[H * D]", {H * D}, true, kind_name, device);
  } else {
    check_param(norm_weight, "norm_weight", "[D]", {D}, true, kind_name, device);
  }
  check_param(o_weight, "o_weight", "[H, D, D]", {H, D, D}, true, kind_name, device);

  check_cache(sink_k, "sink_k", "[B, S, HKV, D]", {B, S, HKV, D}, dtype, device);
  check_cache(sink_v, "sink_v", "[B, S, HKV, D]", {B, S, HKV, D}, dtype, device);
  check_cache(ring_k, "ring_k", "[B, W, HKV, D]", {B, W, HKV, D}, dtype, device);
  check_cache(ring_v, "ring_v", "[B, W, HKV, D]", {B, W, HKV, D}, dtype, device);
  check_cache(gates, "gates", "[B, W, 2, H]", {B, W, 2, H}, dtype, device);
  check_cache(state, "state", "[B, H, D, D]", {B, H, D, D}, at::kFloat, device);
  check_cache(pos, "pos", "[B]", {B}, at::kLong, device);
  return {B, H, HKV, D, W, S, kind};
}

}  // namespace ahn
