// A run of decoder layers in one call from Python: the forward of hispec/model/layers.py
// (DecoderLayer.forward), op for op, without the Python interpreter between ops: a decode step
// runs ~25 small ops per layer, and at small batch on a CPU each costs more to dispatch from
// Python (~5-10 us) than to compute. In fp32 on CPU the norms, rotary + cache write and
// attention are the one-pass kernels of cpu_kernels.h, so results match the Python path to
// fp32 rounding, not bit for bit; other dtypes and devices run the same ATen ops as layers.py.
// Shapes follow layers.py: x [B, T, d], caches [slots, Hkv, capacity + 1, D].
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu_kernels.h"

using at::Tensor;
using torch::indexing::Slice;

namespace {

// A linear layer; the residual, when given, is added inside the GEMM (addmm's beta = 1).
struct Linear {
  Tensor weight;
  std::optional<Tensor> bias;

  Tensor operator()(const Tensor& x, const Tensor& residual = Tensor()) const {
    if (!residual.defined()) return at::linear(x, weight, bias);
    if (bias.has_value() && bias->defined()) return residual + at::linear(x, weight, bias);
    const int64_t n = weight.size(0);
    return at::addmm(residual.reshape({-1, n}), x.reshape({-1, x.size(-1)}), weight.t()).view(residual.sizes());
  }
};

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  if (x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat) {
    return hispec::rms_norm_f32(x, weight, eps);
  }
  return at::rms_norm(x, {x.size(-1)}, weight, eps);
}

struct Layer {
  Tensor input_norm, post_norm;
  Linear qkv, o, gate_up, down;
};

// The per-step inputs every layer shares (hispec.model.step.ForwardStep, flattened).
struct Step {
  Tensor cos, sin;                 // [B, T, 1, D]
  std::optional<Tensor> mask;      // [B, 1, T, kv_len] bool, or none
  std::optional<Tensor> read_slots;  // [B] slot indices to gather, or none: slots are contiguous
  int64_t read_first;              // first slot when contiguous
  int64_t uniform_start;           // first cache column of a rectangular write, or -1: scatter
  Tensor slot_index, write_pos;    // [B, 1], [B, T]: scatter targets
  int64_t kv_len;
};

class LayerStack {
 public:
  LayerStack(std::vector<std::vector<std::optional<Tensor>>> layers, int64_t n_heads, int64_t n_kv_heads,
             int64_t head_dim, double eps)
      : n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim), eps_(eps) {
    for (auto& w : layers) {
      TORCH_CHECK(w.size() == 10, "a layer takes 10 tensors (weights and optional biases)");
      // [input_norm, qkv_w, qkv_b, o_w, o_b, post_norm, gate_up_w, gate_up_b, down_w, down_b]
      for (int i : {0, 1, 3, 5, 6, 8}) TORCH_CHECK(w[i].has_value(), "layer tensor ", i, " is required");
      auto linear = [&](int i) { return Linear{*w[i], w[i + 1]}; };
      layers_.push_back(Layer{*w[0], *w[5], linear(1), linear(3), linear(6), linear(8)});
    }
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // Layers [start, stop) of this stack; keys[i] / values[i] are the caches of layer start + i.
  Tensor forward(Tensor x, int64_t start, int64_t stop, const std::vector<Tensor>& keys,
                 const std::vector<Tensor>& values, Tensor cos, Tensor sin, std::optional<Tensor> mask,
                 std::optional<Tensor> read_slots, int64_t read_first, int64_t uniform_start, Tensor slot_index,
                 Tensor write_pos, int64_t kv_len) const {
    TORCH_CHECK(0 <= start && start < stop && stop <= size(), "layer range out of the stack");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == stop - start && keys.size() == values.size(),
                "one key and one value cache per layer");
    const Step step{cos, sin, mask, read_slots, read_first, uniform_start, slot_index, write_pos, kv_len};
    for (int64_t i = start; i < stop; ++i) {
      x = layer(layers_[i], x, step, keys[i - start], values[i - start]);
    }
    return x;
  }

 private:
  Tensor layer(const Layer& w, const Tensor& x, const Step& step, Tensor keys_cache, Tensor values_cache) const {
    if (x.device().is_cpu() && x.scalar_type() == at::kFloat && keys_cache.is_contiguous() &&
        values_cache.is_contiguous()) {
      return layer_cpu_f32(w, x, step, keys_cache, values_cache);
    }
    return layer_aten(w, x, step, keys_cache, values_cache);
  }

  // fp32 on CPU: the same forward with fused kernels (cpu_kernels.h) for the small ops.
  Tensor layer_cpu_f32(const Layer& w, const Tensor& x, const Step& step, Tensor keys_cache,
                       Tensor values_cache) const {
    const Tensor slots = step.slot_index.view({-1});
    Tensor qkv = w.qkv(hispec::rms_norm_f32(x, w.input_norm, eps_));
    Tensor q = hispec::rope_and_store(qkv, step.cos, step.sin, keys_cache, values_cache, slots, step.write_pos,
                                      n_heads_, n_kv_heads_, head_dim_);
    Tensor attn = hispec::attention(q, keys_cache, values_cache, slots, step.kv_len, step.mask, n_kv_heads_);
    Tensor h = w.o(attn, x);
    auto gate_up = w.gate_up(hispec::rms_norm_f32(h, w.post_norm, eps_)).chunk(2, -1);
    return w.down(at::silu(gate_up[0]) * gate_up[1], h);
  }

  // Any dtype and device: ATen ops, exactly as layers.py.
  Tensor layer_aten(const Layer& w, const Tensor& x, const Step& step, Tensor keys_cache, Tensor values_cache) const {
    const int64_t B = x.size(0), T = x.size(1);
    const int64_t H = n_heads_, Hkv = n_kv_heads_, D = head_dim_;
    // _project_qkv
    Tensor qkv = w.qkv(at::rms_norm(x, {x.size(-1)}, w.input_norm, eps_));
    auto parts = qkv.split_with_sizes({(H + Hkv) * D, Hkv * D}, -1);
    Tensor qk = parts[0].view({B, T, H + Hkv, D});
    qk = at::addcmul(qk * step.cos, qk.roll({D / 2}, {-1}), step.sin);
    auto q_k = qk.split_with_sizes({H, Hkv}, 2);
    const Tensor& q = q_k[0];
    const Tensor& k = q_k[1];
    Tensor v = parts[1].view({B, T, Hkv, D});
    // KVCache.write
    if (step.uniform_start >= 0) {
      keys_cache.slice(0, step.read_first, step.read_first + B)
          .slice(2, step.uniform_start, step.uniform_start + T)
          .copy_(k.transpose(1, 2));
      values_cache.slice(0, step.read_first, step.read_first + B)
          .slice(2, step.uniform_start, step.uniform_start + T)
          .copy_(v.transpose(1, 2));
    } else {
      keys_cache.index_put_({step.slot_index, Slice(), step.write_pos}, k);
      values_cache.index_put_({step.slot_index, Slice(), step.write_pos}, v);
    }
    // KVCache.read
    Tensor keys, values;
    if (step.read_slots.has_value()) {
      keys = keys_cache.slice(2, 0, step.kv_len).index_select(0, *step.read_slots);
      values = values_cache.slice(2, 0, step.kv_len).index_select(0, *step.read_slots);
    } else {
      keys = keys_cache.slice(0, step.read_first, step.read_first + B).slice(2, 0, step.kv_len);
      values = values_cache.slice(0, step.read_first, step.read_first + B).slice(2, 0, step.kv_len);
    }
    Tensor attn;
    if (!step.mask.has_value() && T == 1) {  // DecoderLayer._decode_attention
      Tensor qg = q.reshape({B, Hkv, H / Hkv, D});
      Tensor scores = at::matmul(qg, keys.transpose(-1, -2)) * std::pow(static_cast<double>(D), -0.5);
      attn = at::matmul(scores.softmax(-1, at::kFloat).to(values.scalar_type()), values).reshape({B, H, 1, D});
    } else {
      attn = at::scaled_dot_product_attention(q.transpose(1, 2), keys, values, step.mask, 0.0, false,
                                              std::nullopt, Hkv != H);
    }
    // _output_and_mlp
    Tensor h = x + w.o(attn.transpose(1, 2).reshape({B, T, -1}));
    auto gate_up = w.gate_up(at::rms_norm(h, {h.size(-1)}, w.post_norm, eps_)).chunk(2, -1);
    return h + w.down(at::silu(gate_up[0]) * gate_up[1]);
  }

  std::vector<Layer> layers_;
  int64_t n_heads_, n_kv_heads_, head_dim_;
  double eps_;
};

// The exit head (final norm + LM head) with the layers' norm kernel.
class ExitHead {
 public:
  ExitHead(Tensor norm, Tensor weight, double eps) : norm_(norm), head_{weight, std::nullopt}, eps_(eps) {}
  Tensor forward(const Tensor& hidden) const { return head_(rms_norm(hidden, norm_, eps_)); }

 private:
  Tensor norm_;
  Linear head_;
  double eps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels on their own, for tests and benchmarks.
  m.def("rms_norm_f32", &hispec::rms_norm_f32);
  m.def("attention", &hispec::attention);
  pybind11::class_<ExitHead>(m, "ExitHead")
      .def(pybind11::init<Tensor, Tensor, double>())
      .def("forward", &ExitHead::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<LayerStack>(m, "LayerStack")
      .def(pybind11::init<std::vector<std::vector<std::optional<Tensor>>>, int64_t, int64_t, int64_t, double>())
      .def("__len__", &LayerStack::size)
      .def("forward", &LayerStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
