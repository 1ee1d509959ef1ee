// Small-batch CPU kernels for decode in fp32: RMSNorm, rotary + KV-cache write, and attention,
// each one pass. At a handful of rows a decoder layer is bound by per-op overhead, not FLOPs:
// at::rms_norm alone is a composite of ~6 ops on CPU (~25 us for one 256-wide row here), and
// rotary + cache write + attention is ~15 ATen ops. The projections stay with MKL (a packed
// bf16-weight GEMV was tried: slower than MKL's fp32 GEMV on this CPU at 1-16 rows).
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

// x [..., d] fp32 -> x * rsqrt(mean(x^2) + eps) * weight, one pass per row.
inline Tensor rms_norm_f32(const Tensor& x_in, const Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm_f32 takes fp32");
  const Tensor x = x_in.contiguous();
  const Tensor wt = weight.contiguous();
  const int64_t d = x.size(-1), rows = x.numel() / d;
  Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    float* orow = op + r * d;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes(d - k), xr + k);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(d) + static_cast<float>(eps));
    const __m512 scale = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < d; k += 16) {
      const __mmask16 mask = lanes(d - k);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + k), scale);
      _mm512_mask_storeu_ps(orow + k, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, wp + k), v));
    }
#else
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += xr[k] * xr[k];
    const float inv = 1.0f / std::sqrt(s / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t k = 0; k < d; ++k) orow[k] = wp[k] * (xr[k] * inv);
#endif
  }
  return out;
}

// Rotary embedding of q and k, and the cache write of k and v, in one pass over a step's
// fused projection output. qkv [B, T, (H + 2 Hkv) D] fp32; cos, sin [B, T, 1, D] (sin
// sign-folded, see rope.py: x * cos + roll(x, D/2) * sin); slots [B] cache rows; write_pos
// [B, T] cache columns (padding -> the scratch column). Caches [slots, Hkv, capacity + 1, D]
// contiguous. Returns the rotated q [B, T, H, D].
inline Tensor rope_and_store(const Tensor& qkv_in, const Tensor& cos_in, const Tensor& sin_in, Tensor& keys,
                             Tensor& values, const Tensor& slots_in, const Tensor& write_pos_in, int64_t H,
                             int64_t Hkv, int64_t D) {
  const Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const Tensor slots = slots_in.contiguous(), write_pos = write_pos_in.contiguous();
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "caches must be contiguous");
  const int64_t B = qkv.size(0), T = qkv.size(1), half = D / 2, width = (H + 2 * Hkv) * D;
  const int64_t cap1 = keys.size(2);
  Tensor q = at::empty({B, T, H, D}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* pos = write_pos.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  auto rotate = [&](const float* x, const float* c, const float* sn, float* out) {
    // roll(x, D/2)[i] = x[(i + D/2) mod D]: the two halves swap (two loops that vectorize).
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] + x[i + half] * sn[i];
    for (int64_t i = half; i < D; ++i) out[i] = x[i] * c[i] + x[i - half] * sn[i];
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t bt = b * T + t;
      const float* row = src + bt * width;
      const float* c = cp + bt * D;
      const float* sn = sp + bt * D;
      for (int64_t h = 0; h < H; ++h) rotate(row + h * D, c, sn, qp + (bt * H + h) * D);
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t at = ((slot[b] * Hkv + h) * cap1 + pos[bt]) * D;
        rotate(row + (H + h) * D, c, sn, kp + at);
        std::memcpy(vp + at, row + (H + Hkv + h) * D, D * sizeof(float));
      }
    }
  }
  return q;
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

// Attention of a step's queries to their cached keys. q [B, T, H, D] contiguous; caches
// [slots, Hkv, capacity + 1, D]; slots [B]; keys [0, kv_len) are read, those where mask
// [B, 1, T, kv_len] is true (none: all of them). Query head h reads KV head h / (H / Hkv).
// One work item is a (sequence, KV head): its T x (H / Hkv) queries share each key and value
// row read. Returns [B, T, H * D] (heads side by side: the o_proj input).
inline Tensor attention(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& slots_in,
                        int64_t kv_len, const std::optional<Tensor>& mask_in, int64_t Hkv) {
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous(), "attention takes contiguous tensors");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), G = H / Hkv;
  const int64_t cap1 = keys.size(2), rows = T * G;
  const Tensor slots = slots_in.contiguous();
  const Tensor mask = mask_in.has_value() ? mask_in->contiguous() : Tensor();
  TORCH_CHECK(kv_len <= cap1 && slots.numel() == B, "attention: bad kv_len or slots");
  Tensor out = at::empty({B, T, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(0 <= slot[b] && slot[b] < keys.size(0), "attention: slot out of range");
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(rows * kv_len * D, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t w0, int64_t w1) {
    std::vector<float> p(rows * kv_len);  // probabilities, [t, g, j]
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hkv, kvh = w % Hkv;
      const float* kbase = kp + (slot[b] * Hkv + kvh) * cap1 * D;
      const float* vbase = vp + (slot[b] * Hkv + kvh) * cap1 * D;
      for (int64_t t = 0; t < T; ++t) {
        const bool* allowed = mp ? mp + (b * T + t) * kv_len : nullptr;  // mask[b, 0, t, :]
        for (int64_t g = 0; g < G; ++g) {
          const float* qv = qp + ((b * T + t) * H + kvh * G + g) * D;
          float* pr = p.data() + (t * G + g) * kv_len;
          float top = -INFINITY;
          for (int64_t j = 0; j < kv_len; ++j) {
            pr[j] = allowed && !allowed[j] ? -INFINITY : dot_f32(qv, kbase + j * D, D) * scale;
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
  return out;
}

}  // namespace hispec
