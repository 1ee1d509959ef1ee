// Small-batch CPU kernels for decode: a linear layer that reads bf16 weights and computes in
// fp32, and an fp32 RMSNorm. Both exist because, at a handful of rows, a decoder layer is
// bound by bytes moved and per-op overhead, not by FLOPs:
//  - linear_packed: checkpoints stored in bf16 hold weights that bf16 represents exactly, so
//    keeping them in bf16 halves the bytes a one-row GEMV streams while every product stays
//    the fp32 product of the same two numbers (only the summation order differs from MKL's).
//    Each output is summed over k in order, whatever the number of rows in the call: results
//    are batch-invariant.
//  - rms_norm_f32: at::rms_norm is a composite of ~6 ops on CPU (~25 us for one 256-wide row
//    here); this is one pass.
// Built with -march=native (the extension is compiled on the machine that runs it); without
// AVX-512 the scalar loops below compute the same sums.
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

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// Weights packed for linear_packed: column tiles of kTile outputs, each stored k-major
// ([tiles, K, kTile] bf16, zero-padded past N), so a tile streams contiguously and every
// output accumulates in its own vector lane (no horizontal sums).
constexpr int64_t kTile = 64;

inline Tensor pack_bf16_weights(const Tensor& w) {  // w [N, K] -> [ceil(N / kTile), K, kTile] bf16
  const int64_t N = w.size(0), K = w.size(1), tiles = (N + kTile - 1) / kTile;
  Tensor padded = at::zeros({tiles * kTile, K}, w.options().dtype(at::kBFloat16));
  padded.slice(0, 0, N).copy_(w);
  return padded.view({tiles, kTile, K}).transpose(1, 2).contiguous();
}

// out[m, n] = sum_{k = 0..K-1, in order} x[m, k] * w[n, k] (+ bias[n]), for rows [0, M) and
// tiles [t0, t1). Rows go 4 at a time, sharing each widened weight vector.
inline void linear_packed_tiles(const float* x, const uint16_t* packed, const float* bias, float* out, int64_t M,
                                int64_t K, int64_t N, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* tile = packed + t * K * kTile;
    const int64_t n0 = t * kTile, width = std::min<int64_t>(kTile, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t rows = std::min<int64_t>(4, M - m0);
#ifdef __AVX512F__
      __m512 acc[4][4];
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const uint16_t* wk = tile + k * kTile;
        __m512 wv[4];
        for (int j = 0; j < 4; ++j) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16 * j));
          wv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        }
        for (int64_t r = 0; r < rows; ++r) {
          const __m512 xv = _mm512_set1_ps(x[(m0 + r) * K + k]);
          for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* orow = out + (m0 + r) * N + n0;
        for (int j = 0; j < 4; ++j) {
          const int64_t left = width - 16 * j;
          if (left <= 0) break;
          const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
          __m512 v = acc[r][j];
          if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n0 + 16 * j));
          _mm512_mask_storeu_ps(orow + 16 * j, mask, v);
        }
      }
#else
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + (m0 + r) * K;
        for (int64_t c = 0; c < width; ++c) {
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k) s += xr[k] * bf16_to_float(tile[k * kTile + c]);
          out[(m0 + r) * N + n0 + c] = bias ? s + bias[n0 + c] : s;
        }
      }
#endif
    }
  }
}

// x [..., K] fp32, packed from pack_bf16_weights(w [N, K]), bias [N] fp32 or none -> [..., N].
inline Tensor linear_packed(const Tensor& x_in, const Tensor& packed, int64_t N, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 &&
                  packed.size(2) == kTile && x_in.size(-1) == packed.size(1),
              "linear_packed takes fp32 x [..., K] and weights from pack_bf16_weights");
  const Tensor x = x_in.contiguous();
  const int64_t K = packed.size(1), tiles = packed.size(0), M = x.numel() / K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  Tensor out = at::empty(out_shape, x.options());
  Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // Tiles split across threads: each thread streams its own share of the weights once.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { linear_packed_tiles(xp, wp, bp, op, M, K, N, t0, t1); });
  return out;
}

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
      const __mmask16 mask = d - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (d - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mask, xr + k);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(d) + static_cast<float>(eps));
    const __m512 scale = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < d; k += 16) {
      const __mmask16 mask = d - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (d - k)) - 1);
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

}  // namespace hispec
