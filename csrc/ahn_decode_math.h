// One AHN decode step, as plain loops: the math of docs/AHN_SPEC.md "Decode" for one (sequence,
// head) at a time. Knows nothing of torch: T is the activation and KV-cache type (float, or a
// 16-bit type convertible to and from float); everything else is fp32. Used by
// csrc/cpu/ahn_decode.cpp, which checks the inputs and runs the three phases below in order,
// each in parallel:
//   1. decode_head_attend  per (b, h): absorb the token leaving the window into state[b, h],
//      window attention -> o_win, state readout -> u (gdn/dn: final; mamba2: before its norm)
//   2. decode_head_project per (b, h): mamba2's RMSNorm over all H*D values of sequence b,
//      then y = u @ o_weight[h], out = o_win + y
//   3. decode_write        per b: the new token into the cache, pos[b] += 1
// Phase 3 runs after every read of phase 1: the token leaving the window sits in the ring slot
// that the new token takes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ahn {

enum class Kind : int { kGDN = 0, kDN = 1, kMamba2 = 2 };

// All arrays contiguous, in the layouts given.
template <typename T>
struct DecodeParams {
  // pointers: inputs
  const T* q;                // [B, H, D]
  const T* k;                // [B, HKV, D]
  const T* v;                // [B, HKV, D]
  const float* a;            // [B, H]  gdn: a_proj(x), mamba2: dt_proj(x); null for dn
  const float* b;            // [B, H]  gdn/dn: b_proj(x); null for mamba2
  const float* z;            // [B, H]  g_proj(x)
  const float* A_log;        // [H]     null for dn
  const float* dt_bias;      // [H]     null for dn
  const float* norm_weight;  // [D], mamba2 [H * D]
  const float* o_weight;     // [H, D, D]
  // pointers: cache, read and written
  T* sink_k;                 // [B, S, HKV, D]  token j < S at row j
  T* sink_v;
  T* ring_k;                 // [B, W, HKV, D]  token p >= S at row (p - S) % W
  T* ring_v;
  T* gates;                  // [B, W, 2, H]    gate inputs of each ring token: row 0 a, row 1 b (0 where
                             //                 the kind has none); the gates are made from them on absorb
  float* state;              // [B, H, D, D]    memory, [key dim, value dim]
  int64_t* pos;              // [B]             tokens already seen = position of the new one
  // pointers: outputs and fp32 scratch
  T* out;                    // [B, H, D]
  float* o_win;              // [B, H, D]
  float* u;                  // [B, H, D]
  // sizes
  int64_t B, H, HKV, D, W, S;
  Kind kind;
};

inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // as torch
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// Log-decay g and write strength w of head h from its raw projections a, b (docs/AHN_SPEC.md, "Compressed
// long-term memory: the AHN").
template <typename T>
inline void gate_values(const DecodeParams<T>& p, int64_t h, float a, float b, float& g, float& w) {
  g = 0.f;
  if (p.kind == Kind::kMamba2) {
    w = softplus(a + p.dt_bias[h]);
    g = -std::exp(p.A_log[h]) * w;
  } else {
    if (p.kind == Kind::kGDN) g = -std::exp(p.A_log[h]) * softplus(a + p.dt_bias[h]);
    w = sigmoid(b);
  }
}

// 1 / norm of x[0:n]: gdn/dn l2norm 1 / sqrt(sum x^2 + 1e-6); mamba2 1 / max(||x||, 1e-12).
template <typename T>
inline float inv_norm(const T* x, int64_t n, Kind kind) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float xi = static_cast<float>(x[i]);
    ss += xi * xi;
  }
  return kind == Kind::kMamba2 ? 1.f / std::max(std::sqrt(ss), 1e-12f) : 1.f / std::sqrt(ss + 1e-6f);
}

template <typename T>
inline float dot(const float* x, const T* y, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * static_cast<float>(y[i]);
  return acc;
}

// Phase 1 for sequence b, head h. scores: S + W floats; buf: 2 * D floats.
template <typename T>
void decode_head_attend(const DecodeParams<T>& p, int64_t b, int64_t h, float* scores, float* buf) {
  const int64_t H = p.H, HKV = p.HKV, D = p.D, W = p.W, S = p.S;
  const int64_t hk = h / (H / HKV);  // the kv head that query head h reads
  const int64_t t = p.pos[b];
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  float* st = p.state + (b * H + h) * D * D;  // [D, D]
  float* x = buf;                             // [D] normalised key, later query
  float* r = buf + D;                         // [D]

  // 1. token t - W leaves the window: S = exp(g) S, then the delta rule (gdn/dn) or a plain
  //    write (mamba2) with its cached key, value and gates.
  if (t - W >= S) {
    const int64_t slot = (t - S) % W;
    const T* kk = p.ring_k + ((b * W + slot) * HKV + hk) * D;
    const T* vv = p.ring_v + ((b * W + slot) * HKV + hk) * D;
    const T* gi = p.gates + (b * W + slot) * 2 * H;
    float g, w;
    gate_values(p, h, static_cast<float>(gi[h]), static_cast<float>(gi[H + h]), g, w);
    const float decay = std::exp(g);
    const float inv = inv_norm(kk, D, p.kind);
    for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(kk[i]) * inv;
    if (p.kind == Kind::kMamba2) {
      for (int64_t i = 0; i < D; ++i) {
        const float wk = w * x[i];
        for (int64_t j = 0; j < D; ++j) st[i * D + j] = decay * st[i * D + j] + wk * static_cast<float>(vv[j]);
      }
    } else {
      std::fill(r, r + D, 0.f);  // r = (exp(g) S)^T k^, what the memory predicts for k^
      for (int64_t i = 0; i < D; ++i) {
        for (int64_t j = 0; j < D; ++j) {
          st[i * D + j] *= decay;
          r[j] += st[i * D + j] * x[i];
        }
      }
      for (int64_t j = 0; j < D; ++j) r[j] = static_cast<float>(vv[j]) - r[j];
      for (int64_t i = 0; i < D; ++i) {
        const float wk = w * x[i];
        for (int64_t j = 0; j < D; ++j) st[i * D + j] += wk * r[j];
      }
    }
  }

  // 2. softmax attention over sinks [0, min(S, t)), ring tokens [max(S, t - W + 1), t) and
  //    the new token t, which comes from k, v (it is written to the cache in phase 3).
  const T* q = p.q + (b * H + h) * D;
  for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(q[i]) * scale;
  const int64_t n_sink = std::min(S, t), ring_lo = std::max(S, t - W + 1);
  const int64_t n_ring = std::max<int64_t>(t - ring_lo, 0);
  auto key = [&](int64_t n) -> const T* {
    if (n < n_sink) return p.sink_k + ((b * S + n) * HKV + hk) * D;
    if (n < n_sink + n_ring) return p.ring_k + ((b * W + (ring_lo + n - n_sink - S) % W) * HKV + hk) * D;
    return p.k + (b * HKV + hk) * D;
  };
  auto value = [&](int64_t n) -> const T* {
    if (n < n_sink) return p.sink_v + ((b * S + n) * HKV + hk) * D;
    if (n < n_sink + n_ring) return p.ring_v + ((b * W + (ring_lo + n - n_sink - S) % W) * HKV + hk) * D;
    return p.v + (b * HKV + hk) * D;
  };
  const int64_t n_keys = n_sink + n_ring + 1;
  float mx = -INFINITY;
  for (int64_t n = 0; n < n_keys; ++n) {
    scores[n] = dot(x, key(n), D);
    mx = std::max(mx, scores[n]);
  }
  float denom = 0.f;
  for (int64_t n = 0; n < n_keys; ++n) {
    scores[n] = std::exp(scores[n] - mx);
    denom += scores[n];
  }
  float* o = p.o_win + (b * H + h) * D;
  std::fill(o, o + D, 0.f);
  for (int64_t n = 0; n < n_keys; ++n) {
    const T* vn = value(n);
    const float pn = scores[n] / denom;
    for (int64_t j = 0; j < D; ++j) o[j] += pn * static_cast<float>(vn[j]);
  }

  // 3. readout m = S^T q^ from the updated state.
  const float q_inv = p.kind == Kind::kMamba2 ? inv_norm(q, D, p.kind) : inv_norm(q, D, p.kind) * scale;
  for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(q[i]) * q_inv;
  float* m = p.u + (b * H + h) * D;
  std::fill(m, m + D, 0.f);
  for (int64_t i = 0; i < D; ++i) {
    for (int64_t j = 0; j < D; ++j) m[j] += st[i * D + j] * x[i];
  }

  // 4. output gate silu(z); gdn/dn also their per-head RMSNorm (mamba2's spans all heads: phase 2).
  const float zz = p.z[b * H + h];
  const float gate = zz * sigmoid(zz);
  if (p.kind == Kind::kMamba2) {
    for (int64_t j = 0; j < D; ++j) m[j] *= gate;
  } else {
    float ss = 0.f;
    for (int64_t j = 0; j < D; ++j) ss += m[j] * m[j];
    const float rs = 1.f / std::sqrt(ss / static_cast<float>(D) + 1e-5f);
    for (int64_t j = 0; j < D; ++j) m[j] = m[j] * rs * p.norm_weight[j] * gate;
  }
}

// Phase 2 for sequence b, head h. buf: D floats.
template <typename T>
void decode_head_project(const DecodeParams<T>& p, int64_t b, int64_t h, float* buf) {
  const int64_t H = p.H, D = p.D;
  const float* u = p.u + (b * H + h) * D;
  if (p.kind == Kind::kMamba2) {
    const float* ub = p.u + b * H * D;  // RMSNorm over the H * D values of sequence b
    float ss = 0.f;
    for (int64_t i = 0; i < H * D; ++i) ss += ub[i] * ub[i];
    const float rs = 1.f / std::sqrt(ss / static_cast<float>(H * D) + 1e-5f);
    for (int64_t j = 0; j < D; ++j) buf[j] = u[j] * rs * p.norm_weight[h * D + j];
    u = buf;
  }
  const float* o_win = p.o_win + (b * H + h) * D;
  const float* ow = p.o_weight + h * D * D;  // [D, D]
  T* out = p.out + (b * H + h) * D;
  for (int64_t e = 0; e < D; ++e) {
    float y = 0.f;
    for (int64_t d = 0; d < D; ++d) y += u[d] * ow[d * D + e];
    out[e] = static_cast<T>(o_win[e] + y);
  }
}

// Phase 3 for sequence b: the new token's k, v (and gate inputs a, b) into the cache, then pos[b] += 1.
template <typename T>
void decode_write(const DecodeParams<T>& p, int64_t b) {
  const int64_t H = p.H, HKV = p.HKV, D = p.D, W = p.W, S = p.S;
  const int64_t t = p.pos[b];
  const T* k = p.k + b * HKV * D;
  const T* v = p.v + b * HKV * D;
  if (t < S) {
    std::copy(k, k + HKV * D, p.sink_k + (b * S + t) * HKV * D);
    std::copy(v, v + HKV * D, p.sink_v + (b * S + t) * HKV * D);
  } else {
    const int64_t slot = (t - S) % W;
    std::copy(k, k + HKV * D, p.ring_k + (b * W + slot) * HKV * D);
    std::copy(v, v + HKV * D, p.ring_v + (b * W + slot) * HKV * D);
    T* gi = p.gates + (b * W + slot) * 2 * H;  // the raw inputs: the gates are made on absorb
    for (int64_t h = 0; h < H; ++h) {
      gi[h] = static_cast<T>(p.kind != Kind::kDN ? p.a[b * H + h] : 0.f);
      gi[H + h] = static_cast<T>(p.kind != Kind::kMamba2 ? p.b[b * H + h] : 0.f);
    }
  }
  p.pos[b] = t + 1;
}

}  // namespace ahn
