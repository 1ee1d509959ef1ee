// Small-batch CPU kernels for decode in fp32: RMSNorm, rotary + KV-cache write, and attention,
// each one pass, on raw pointers (the Tensor forms wrap them for tests and the general path). At
// a handful of rows a decoder layer is bound by per-op overhead, not FLOPs: at::rms_norm alone is
// a composite of ~6 ops on CPU (~25 us for one 256-wide row here), and rotary + cache write +
// attention is ~15 ATen ops. The projections are packed_gemm.h.
// Built with -march=native (the extension is compiled on the machine that runs it); without
// AVX-512 the scalar loops compute the same formulas.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace hispec {

using at::Tensor;

#ifdef __AVX512F__
// Lanes of a 16-wide vector step that hold data when `left` values remain.
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
#endif

// rows x [rows, d] fp32 -> x * rsqrt(mean(x^2) + eps) * weight, one pass per row.
inline void rms_norm_rows(const float* xp, const float* wp, float* op, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    float* orow = op + r * d;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes(d - k), xr + k);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(d) + eps);
    const __m512 scale = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < d; k += 16) {
      const __mmask16 mask = lanes(d - k);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + k), scale);
      _mm512_mask_storeu_ps(orow + k, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, wp + k), v));
    }
#else
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += xr[k] * xr[k];
    const float inv = 1.0f / std::sqrt(s / static_cast<float>(d) + eps);
    for (int64_t k = 0; k < d; ++k) orow[k] = wp[k] * (xr[k] * inv);
#endif
  }
}

// x [..., d] fp32 -> RMSNorm(x) * weight, a new tensor.
inline Tensor rms_norm_f32(const Tensor& x_in, const Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm_f32 takes fp32");
  const Tensor x = x_in.contiguous();
  const Tensor wt = weight.contiguous();
  const int64_t d = x.size(-1);
  Tensor out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), wt.data_ptr<float>(), out.data_ptr<float>(), x.numel() / d, d,
                static_cast<float>(eps));
  return out;
}

// The shapes of one step, as the pointer-level kernels take them: B sequences of T rows each,
// H query / Hkv KV heads of size D; caches [slots, Hkv, cap1 = capacity + 1, D] contiguous;
// slot [B] cache rows, write_pos [B, T] cache columns (padding -> the scratch column).
struct StepShape {
  int64_t B, T, H, Hkv, D, cap1;
  const int64_t* slot;
  const int64_t* write_pos;
};

// Rotary embedding of q and k, and the cache write of k and v, in one pass over a step's fused
// projection output qkv [B, T, (H + 2 Hkv) D]; cos, sin [B, T, D] (sin sign-folded, see rope.py:
// x * cos + roll(x, D/2) * sin). Writes the rotated q to q_out [B, T, H, D].
inline void rope_and_store_into(const StepShape& s, const float* qkv, const float* cp, const float* sp, float* keys,
                                float* values, float* q_out) {
  const int64_t D = s.D, half = D / 2, width = (s.H + 2 * s.Hkv) * D;
  auto rotate = [&](const float* x, const float* c, const float* sn, float* out) {
    // roll(x, D/2)[i] = x[(i + D/2) mod D]: the two halves swap (two loops that vectorize).
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] + x[i + half] * sn[i];
    for (int64_t i = half; i < D; ++i) out[i] = x[i] * c[i] + x[i - half] * sn[i];
  };
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t bt = b * s.T + t;
      const float* row = qkv + bt * width;
      const float* c = cp + bt * D;
      const float* sn = sp + bt * D;
      for (int64_t h = 0; h < s.H; ++h) rotate(row + h * D, c, sn, q_out + (bt * s.H + h) * D);
      for (int64_t h = 0; h < s.Hkv; ++h) {
        const int64_t at = ((s.slot[b] * s.Hkv + h) * s.cap1 + s.write_pos[bt]) * D;
        rotate(row + (s.H + h) * D, c, sn, keys + at);
        std::memcpy(values + at, row + (s.H + s.Hkv + h) * D, D * sizeof(float));
      }
    }
  }
}

// The Tensor form: qkv [B, T, (H + 2 Hkv) D]; cos, sin [B, T, 1, D]; slots [B]; write_pos [B, T].
// Returns the rotated q [B, T, H, D].
inline Tensor rope_and_store(const Tensor& qkv_in, const Tensor& cos_in, const Tensor& sin_in, Tensor& keys,
                             Tensor& values, const Tensor& slots_in, const Tensor& write_pos_in, int64_t H,
                             int64_t Hkv, int64_t D) {
  const Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const Tensor slots = slots_in.contiguous(), write_pos = write_pos_in.contiguous();
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "caches must be contiguous");
  const int64_t B = qkv.size(0), T = qkv.size(1);
  Tensor q = at::empty({B, T, H, D}, qkv.options());
  const StepShape shape{B, T, H, Hkv, D, keys.size(2), slots.data_ptr<int64_t>(), write_pos.data_ptr<int64_t>()};
  rope_and_store_into(shape, qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                      keys.data_ptr<float>(), values.data_ptr<float>(), q.data_ptr<float>());
  return q;
}

// Index of the first maximum of x [n] (NaN compares false: skipped, unlike torch).
inline int64_t argmax_f32(const float* x, int64_t n) {
  int64_t best = 0;
  float top = n ? x[0] : 0.f;
#ifdef __AVX512F__
  // Vector pass for the maximum value, then a scan for its first index.
  if (n >= 16) {
    __m512 m = _mm512_loadu_ps(x);
    int64_t i = 16;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    top = _mm512_reduce_max_ps(m);
    for (; i < n; ++i) top = std::max(top, x[i]);
    for (int64_t j = 0; j < n; ++j)
      if (x[j] == top) return j;
  }
#endif
  for (int64_t j = 1; j < n; ++j) {
    if (x[j] > top) {
      top = x[j];
      best = j;
    }
  }
  return best;
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
#else
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
#endif
}

// Attention of a step's queries q [B, T, H, D] to their cached keys [0, kv_len): key j is read by
// query (b, t) when j <= positions[b, t] (causal; nullptr: no limit) and mask[b, t, j] is true
// (nullptr: no mask). Query head h reads KV head h / (H / Hkv).
// One work item is a (sequence, KV head): its T x (H / Hkv) queries share each key and value
// row read. Writes out [B, T, H * D] (heads side by side: the o_proj input).
inline void attention_into(const StepShape& s, const float* qp, const float* kp, const float* vp, int64_t kv_len,
                           const int64_t* positions, const bool* mp, float* op) {
  const int64_t B = s.B, T = s.T, H = s.H, Hkv = s.Hkv, D = s.D, G = H / Hkv, cap1 = s.cap1, rows = T * G;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(rows * kv_len * D, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t w0, int64_t w1) {
    std::vector<float> p(rows * kv_len);  // probabilities, [t, g, j]
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hkv, kvh = w % Hkv;
      const float* kbase = kp + (s.slot[b] * Hkv + kvh) * cap1 * D;
      const float* vbase = vp + (s.slot[b] * Hkv + kvh) * cap1 * D;
      for (int64_t t = 0; t < T; ++t) {
        const bool* allowed = mp ? mp + (b * T + t) * kv_len : nullptr;  // mask[b, t, :]
        const int64_t visible = positions ? std::min(kv_len, positions[b * T + t] + 1) : kv_len;  // keys [0, visible)
        for (int64_t g = 0; g < G; ++g) {
          const float* qv = qp + ((b * T + t) * H + kvh * G + g) * D;
          float* pr = p.data() + (t * G + g) * kv_len;
          float top = -INFINITY;
          for (int64_t j = 0; j < kv_len; ++j) {
            pr[j] = j >= visible || (allowed && !allowed[j]) ? -INFINITY : dot_f32(qv, kbase + j * D, D) * scale;
            top = std::max(top, pr[j]);
          }
          float total = 0.f;
          for (int64_t j = 0; j < kv_len; ++j) {
            pr[j] = std::exp(pr[j] - top);  // exp(-inf) = 0: masked keys drop out
            total += pr[j];
          }
          const float inv = 1.0f / total;
          for (int64_t j = 0; j < kv_len; ++j) pr[j] *= inv;
          float* o = op + ((b * T + t) * H + kvh * G + g) * D;
          std::fill(o, o + D, 0.f);
        }
      }
      // out[t, g] += p[t, g, j] * v[j], each value row read once for all T x G queries.
      for (int64_t j = 0; j < kv_len; ++j) {
        const float* vv = vbase + j * D;
        for (int64_t r = 0; r < rows; ++r) {
          const float weight = p[r * kv_len + j];
          if (weight == 0.f) continue;
          const int64_t t = r / G, g = r % G;
          float* o = op + ((b * T + t) * H + kvh * G + g) * D;
          for (int64_t i = 0; i < D; ++i) o[i] += weight * vv[i];
        }
      }
    }
  });
}

// The Tensor form: q [B, T, H, D] contiguous; caches [slots, Hkv, capacity + 1, D]; slots [B];
// mask [B, 1, T, kv_len] or none. Returns [B, T, H * D].
inline Tensor attention(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& slots_in,
                        int64_t kv_len, const std::optional<Tensor>& mask_in, int64_t Hkv,
                        const std::optional<Tensor>& positions_in = std::nullopt) {
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous(), "attention takes contiguous tensors");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const Tensor slots = slots_in.contiguous();
  const Tensor mask = mask_in.has_value() ? mask_in->contiguous() : Tensor();
  TORCH_CHECK(kv_len <= keys.size(2) && slots.numel() == B, "attention: bad kv_len or slots");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(0 <= slot[b] && slot[b] < keys.size(0), "attention: slot out of range");
  Tensor out = at::empty({B, T, H * D}, q.options());
  const StepShape shape{B, T, H, Hkv, D, keys.size(2), slot, nullptr};
  const Tensor positions = positions_in.has_value() ? positions_in->contiguous() : Tensor();
  attention_into(shape, q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), kv_len,
                 positions.defined() ? positions.data_ptr<int64_t>() : nullptr,
                 mask.defined() ? mask.data_ptr<bool>() : nullptr, out.data_ptr<float>());
  return out;
}

}  // namespace hispec
