// y[M, N] = x[M, K] W^T for a handful of rows (decode steps, verification blocks), from weights
// packed once into panels of 32 outputs. At a few rows a projection is bound by streaming its
// weights from L3 (the bundled model's 46 MB of layers do not fit the 2 x 2 MB of L2), so:
//  - a panel is [K, 32] contiguous: each k reads one or two whole cache lines, in order;
//  - weights that are exactly bf16 (the bundled checkpoint is bf16) are kept as bf16: half the
//    bytes read, and widening bf16 -> fp32 is exact, so every product is the fp32 one;
//  - every row of x reuses each weight vector read (M FMAs per load);
//  - panels are split across the intra-op threads (the extension is built with OpenMP, which
//    resolves to torch's own runtime: one thread pool).
// Each output is one fp32 accumulator summed over k in order, so a row's result does not depend
// on how many rows share the call or how panels are split across threads.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace hispec {

using at::Tensor;

enum class Epilogue {
  kStore,        // y = x W^T
  kAddResidual,  // y = x W^T + residual
  kSiluMul,      // paired weights [gate; up]: y = silu(x Wg^T) * (x Wu^T), N / 2 outputs
};

class PackedLinear {
 public:
  static constexpr int64_t kWidth = 32;   // outputs per panel
  static constexpr int64_t kMaxRows = 8;  // rows per pass over the weights (accumulators in registers)

  PackedLinear() = default;

  // w [N, K] (fp32, any layout). paired: w is [gate; up] stacked (N = 2 n); panel p then holds
  // gate rows [16p, 16p + 16) in its first 16 outputs and the matching up rows in the last 16.
  static PackedLinear pack(const Tensor& w, bool paired) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "PackedLinear packs a 2-d fp32 weight");
    TORCH_CHECK(!paired || w.size(0) % 2 == 0, "paired weights stack gate and up: an even row count");
    PackedLinear p;
    p.k_ = w.size(1);
    p.paired_ = paired;
    p.n_ = paired ? w.size(0) / 2 : w.size(0);
    const int64_t per_panel = paired ? kWidth / 2 : kWidth;
    const int64_t panels = (p.n_ + per_panel - 1) / per_panel;
    Tensor rows = at::zeros({panels * kWidth, p.k_}, w.options().device(at::kCPU));  // panel-major rows
    const Tensor src = w.detach().to(at::kCPU);
    if (paired) {
      Tensor view = rows.view({panels, 2, per_panel, p.k_});
      for (int64_t half = 0; half < 2; ++half) {
        Tensor part = src.slice(0, half * p.n_, (half + 1) * p.n_);
        Tensor padded = at::zeros({panels * per_panel, p.k_}, rows.options());
        padded.slice(0, 0, p.n_).copy_(part);
        view.select(1, half).copy_(padded.view({panels, per_panel, p.k_}));
      }
    } else {
      rows.slice(0, 0, p.n_).copy_(src);
    }
    Tensor panel = rows.view({panels, kWidth, p.k_}).transpose(1, 2);  // [P, K, 32]
    p.bf16_ = at::equal(src.to(at::kBFloat16).to(at::kFloat), src);
    if (p.bf16_) {
      // One 64-byte load holds a k-row's 32 bf16: output j at lane 2j (j < 16) or 2(j - 16) + 1,
      // so a shift and a mask widen it into outputs [0, 16) and [16, 32).
      panel = panel.reshape({panels, p.k_, 2, 16}).transpose(2, 3).reshape({panels, p.k_, kWidth});
      p.data_ = panel.to(at::kBFloat16).contiguous();
    } else {
      p.data_ = panel.contiguous();
    }
    return p;
  }

  bool defined() const { return data_.defined(); }
  int64_t in_features() const { return k_; }
  int64_t out_features() const { return n_; }
  bool bf16() const { return bf16_; }

  // y[m, :n] for m < M (row stride ldy) from x [M, K] (contiguous rows); residual [M, ldy] for
  // kAddResidual. n_limit: the first outputs only (a vocabulary-limited head), default all.
  void run(const float* x, int64_t M, float* y, int64_t ldy, Epilogue epilogue, const float* residual = nullptr,
           int64_t n_limit = -1) const {
    TORCH_CHECK(defined(), "PackedLinear used before pack()");
    TORCH_CHECK((epilogue == Epilogue::kSiluMul) == paired_, "the SiLU-mul epilogue needs paired weights");
    const int64_t n = n_limit < 0 ? n_ : std::min(n_limit, n_);
    const int64_t per_panel = paired_ ? kWidth / 2 : kWidth;
    const int64_t panels = (n + per_panel - 1) / per_panel;
    const int64_t panel_elems = k_ * kWidth;
    // Small projections: at least a few panels per thread, or the fork costs more than it saves.
    at::parallel_for(0, panels, 4, [&](int64_t p0, int64_t p1) {
      alignas(64) float acc[kMaxRows * kWidth];
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, M - m0);
        for (int64_t p = p0; p < p1; ++p) {
          if (bf16_) {
            panel_kernel<true>(rows, x + m0 * k_, k_, static_cast<const uint16_t*>(data_.data_ptr()) + p * panel_elems, acc);
          } else {
            panel_kernel<false>(rows, x + m0 * k_, k_, data_.data_ptr<float>() + p * panel_elems, acc);
          }
          const int64_t c0 = p * per_panel, width = std::min(per_panel, n - c0);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t m = m0 + r;
            finish(epilogue, acc + r * kWidth, y + m * ldy + c0, residual ? residual + m * ldy + c0 : nullptr, width);
          }
        }
      }
    });
  }

 private:
  static void finish(Epilogue epilogue, const float* acc, float* out, const float* residual, int64_t width) {
    switch (epilogue) {
      case Epilogue::kStore:
        std::memcpy(out, acc, width * sizeof(float));
        break;
      case Epilogue::kAddResidual:
        for (int64_t i = 0; i < width; ++i) out[i] = acc[i] + residual[i];
        break;
      case Epilogue::kSiluMul:
        for (int64_t i = 0; i < width; ++i) out[i] = acc[i] / (1.0f + std::exp(-acc[i])) * acc[i + kWidth / 2];
        break;
    }
  }

  template <bool kBf16>
  static void panel_kernel(int64_t rows, const float* x, int64_t K, const void* w, float* acc) {
    switch (rows) {
      case 1: return kernel<1, kBf16>(x, K, w, acc);
      case 2: return kernel<2, kBf16>(x, K, w, acc);
      case 3: return kernel<3, kBf16>(x, K, w, acc);
      case 4: return kernel<4, kBf16>(x, K, w, acc);
      case 5: return kernel<5, kBf16>(x, K, w, acc);
      case 6: return kernel<6, kBf16>(x, K, w, acc);
      case 7: return kernel<7, kBf16>(x, K, w, acc);
      default: return kernel<8, kBf16>(x, K, w, acc);
    }
  }

  // acc[r, 0:32] = sum over k in order of x[r, k] * panel[k, 0:32], for r < M (x rows K apart).
  template <int M, bool kBf16>
  static void kernel(const float* x, int64_t K, const void* w, float* acc) {
#ifdef __AVX512F__
    __m512 lo[M], hi[M];  // outputs [0, 16) and [16, 32) of each row
    for (int r = 0; r < M; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      __m512 w0, w1;
      if constexpr (kBf16) {
        const __m512i v = _mm512_loadu_si512(static_cast<const uint16_t*>(w) + k * kWidth);
        w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                            // even lanes
        w1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF0000)));  // odd lanes
      } else {
        const float* row = static_cast<const float*>(w) + k * kWidth;
        w0 = _mm512_loadu_ps(row);
        w1 = _mm512_loadu_ps(row + 16);
      }
      for (int r = 0; r < M; ++r) {
        const __m512 xr = _mm512_set1_ps(x[r * K + k]);
        lo[r] = _mm512_fmadd_ps(xr, w0, lo[r]);
        hi[r] = _mm512_fmadd_ps(xr, w1, hi[r]);
      }
    }
    for (int r = 0; r < M; ++r) {
      _mm512_store_ps(acc + r * kWidth, lo[r]);
      _mm512_store_ps(acc + r * kWidth + 16, hi[r]);
    }
#else
    for (int r = 0; r < M; ++r) std::fill(acc + r * kWidth, acc + (r + 1) * kWidth, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < kWidth; ++j) {
        float wk;
        if constexpr (kBf16) {
          // lane order of the packing: output j sits at lane 2j (j < 16) or 2(j - 16) + 1
          const uint16_t bits = static_cast<const uint16_t*>(w)[k * kWidth + (j < 16 ? 2 * j : 2 * (j - 16) + 1)];
          const uint32_t widened = static_cast<uint32_t>(bits) << 16;
          std::memcpy(&wk, &widened, sizeof(wk));
        } else {
          wk = static_cast<const float*>(w)[k * kWidth + j];
        }
        for (int r = 0; r < M; ++r) acc[r * kWidth + j] += x[r * K + k] * wk;
      }
    }
#endif
  }

  Tensor data_;
  int64_t n_ = 0, k_ = 0;
  bool bf16_ = false, paired_ = false;
};

}  // namespace hispec
