// A run of decoder layers in one call from Python: the forward of hispec/model/layers.py
// (DecoderLayer.forward), op for op, without the Python interpreter between ops: a decode step
// runs ~25 small ops per layer, and at small batch on a CPU each costs more to dispatch from
// Python (~5-10 us) than to compute. In fp32 on CPU the norms, rotary + cache write and
// attention are the one-pass kernels of cpu_kernels.h, and at up to kPackedRows rows (decode
// steps, verification blocks) the projections are the packed GEMMs of packed_gemm.h, with the
// residual adds and SiLU-mul in their epilogues and no ATen op between kernels; results match
// the Python path to fp32 rounding, not bit for bit. Other dtypes and devices run the same ATen
// ops as layers.py. Shapes follow layers.py: x [B, T, d], caches [slots, Hkv, capacity + 1, D].
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"
#include "packed_gemm.h"

using at::Tensor;
using torch::indexing::Slice;

namespace {

using hispec::Epilogue;
using hispec::PackedLinear;

// Rows (B x T) up to which fp32 CPU projections run packed; wider steps (prefill, large
// batches) use MKL's GEMM, which is faster once the weights are reused by many rows.
constexpr int64_t kPackedRows = 16;

// Whether a weight can be packed: fp32 on CPU (the packed copy is made once, at construction).
bool packable(const Tensor& w) { return w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2; }

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
  // The same projections packed (fp32 CPU weights without biases; else undefined).
  PackedLinear qkv_p, o_p, gate_up_p, down_p;

  bool packed() const { return qkv_p.defined(); }
};

// The per-step inputs every layer shares (hispec.model.step.ForwardStep, flattened).
struct Step {
  Tensor cos, sin;                 // [B, T, 1, D]
  Tensor positions;                // [B, T] int64: query positions; key j is visible when j <= position
  std::optional<Tensor> mask;      // [B, 1, T, kv_len] bool, made from positions when the ATen path needs one
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
      Layer layer{*w[0], *w[5], linear(1), linear(3), linear(6), linear(8)};
      bool can_pack = true;
      for (int i : {0, 5}) can_pack = can_pack && w[i]->device().is_cpu() && w[i]->scalar_type() == at::kFloat && w[i]->is_contiguous();
      for (int i : {1, 3, 6, 8}) can_pack = can_pack && packable(*w[i]) && !(w[i + 1].has_value() && w[i + 1]->defined());
      if (can_pack) {
        layer.qkv_p = PackedLinear::pack(*w[1], false);
        layer.o_p = PackedLinear::pack(*w[3], false);
        layer.gate_up_p = PackedLinear::pack(*w[6], true);
        layer.down_p = PackedLinear::pack(*w[8], false);
      }
      layers_.push_back(std::move(layer));
    }
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // Layers whose four projections are packed as bf16 panels (bf16-exact fp32 weights).
  int64_t bf16_layers() const {
    int64_t n = 0;
    for (const Layer& w : layers_) n += w.packed() && w.qkv_p.bf16() && w.o_p.bf16() && w.gate_up_p.bf16() && w.down_p.bf16();
    return n;
  }

  // Forward calls that ran on the packed path so far (tests: which path a step took).
  int64_t packed_forwards() const { return packed_forwards_.load(std::memory_order_relaxed); }

  // Layers [start, stop) of this stack; keys[i] / values[i] are the caches of layer start + i.
  // masked: whether any query may not see every key [0, kv_len) (ForwardStep.masked).
  // out: where the result goes (e.g. a view into the engine's hidden-state ring), or a new tensor.
  Tensor forward(Tensor x, int64_t start, int64_t stop, const std::vector<Tensor>& keys,
                 const std::vector<Tensor>& values, Tensor cos, Tensor sin, Tensor positions, bool masked,
                 std::optional<Tensor> read_slots, int64_t read_first, int64_t uniform_start, Tensor slot_index,
                 Tensor write_pos, int64_t kv_len, std::optional<Tensor> out) const {
    Tensor result = run_layers(x, start, stop, keys, values, cos, sin, positions, masked, read_slots, read_first,
                                uniform_start, slot_index, write_pos, kv_len, out);
    if (out.has_value() && !result.is_same(*out)) return out->copy_(result);
    return result;
  }

 private:
  // `forward` without the final copy: the packed path writes into `out` itself when it can.
  Tensor run_layers(Tensor x, int64_t start, int64_t stop, const std::vector<Tensor>& keys,
                    const std::vector<Tensor>& values, Tensor cos, Tensor sin, Tensor positions, bool masked,
                    std::optional<Tensor> read_slots, int64_t read_first, int64_t uniform_start, Tensor slot_index,
                    Tensor write_pos, int64_t kv_len, const std::optional<Tensor>& out) const {
    TORCH_CHECK(0 <= start && start < stop && stop <= size(), "layer range out of the stack");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == stop - start && keys.size() == values.size(),
                "one key and one value cache per layer");
    Step step{cos, sin, positions, std::nullopt, read_slots, read_first, uniform_start, slot_index, write_pos, kv_len};
    if (runs_packed(x, start, stop, keys, values)) {
      packed_forwards_.fetch_add(1, std::memory_order_relaxed);
      return forward_packed(x, start, stop, keys, values, step, out);
    }
    if (masked) {  // ForwardStep.mask: key j visible to the query at position p when j <= p
      step.mask = at::arange(kv_len, positions.options()).view({1, 1, 1, kv_len}) <=
                  positions.view({positions.size(0), 1, positions.size(1), 1});
    }
    for (int64_t i = start; i < stop; ++i) {
      x = layer(layers_[i], x, step, keys[i - start], values[i - start]);
    }
    return x;
  }

  bool runs_packed(const Tensor& x, int64_t start, int64_t stop, const std::vector<Tensor>& keys,
                   const std::vector<Tensor>& values) const {
    if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || x.size(0) * x.size(1) > kPackedRows) return false;
    for (int64_t i = start; i < stop; ++i) {
      const Tensor& k = keys[i - start];
      const Tensor& v = values[i - start];
      if (!layers_[i].packed() || !k.is_contiguous() || !v.is_contiguous() || k.scalar_type() != at::kFloat ||
          v.scalar_type() != at::kFloat)
        return false;
    }
    return true;
  }

  // fp32 on CPU at a few rows: every layer on raw pointers into one scratch allocation; the
  // hidden state is updated in place in the returned tensor.
  Tensor forward_packed(const Tensor& x, int64_t start, int64_t stop, const std::vector<Tensor>& keys,
                        const std::vector<Tensor>& values, const Step& step, const std::optional<Tensor>& dst) const {
    const int64_t B = x.size(0), T = x.size(1), R = B * T, d = x.size(2);
    const int64_t H = n_heads_, Hkv = n_kv_heads_, D = head_dim_;
    const int64_t qkv_width = (H + 2 * Hkv) * D, inter = layers_[start].gate_up_p.out_features();
    // The hidden state is updated in place: in `dst` when it can hold it (contiguous fp32, not
    // the input), else in a copy of x.
    const bool in_dst = dst.has_value() && dst->is_contiguous() && dst->scalar_type() == at::kFloat &&
                        dst->sizes() == x.sizes() && dst->data_ptr() != x.data_ptr();
    Tensor out = in_dst ? dst->copy_(x) : x.contiguous().clone();
    Tensor scratch = at::empty({R * (2 * d + qkv_width + 2 * H * D + inter)}, x.options());
    float* normed = scratch.data_ptr<float>();  // [R, d]
    float* qkv = normed + R * d;                 // [R, (H + 2 Hkv) D]
    float* q = qkv + R * qkv_width;              // [R, H D] rotated queries
    float* attn = q + R * H * D;                 // [R, H D]
    float* h = attn + R * H * D;                 // [R, d] after attention + residual
    float* act = h + R * d;                      // [R, inter] silu(gate) * up
    const Tensor cos = step.cos.contiguous(), sin = step.sin.contiguous();
    const Tensor slots = step.slot_index.contiguous(), write_pos = step.write_pos.contiguous();
    const Tensor positions = step.positions.contiguous();
    const hispec::StepShape shape{B, T, H, Hkv, D, keys[0].size(2), slots.data_ptr<int64_t>(),
                                  write_pos.data_ptr<int64_t>()};
    const float eps = static_cast<float>(eps_);
    float* hidden = out.data_ptr<float>();
    for (int64_t i = start; i < stop; ++i) {
      const Layer& w = layers_[i];
      float* kc = keys[i - start].data_ptr<float>();
      float* vc = values[i - start].data_ptr<float>();
      hispec::rms_norm_rows(hidden, w.input_norm.data_ptr<float>(), normed, R, d, eps);
      w.qkv_p.run(normed, R, qkv, qkv_width, Epilogue::kStore);
      hispec::rope_and_store_into(shape, qkv, cos.data_ptr<float>(), sin.data_ptr<float>(), kc, vc, q);
      hispec::attention_into(shape, q, kc, vc, step.kv_len, positions.data_ptr<int64_t>(), nullptr, attn);
      w.o_p.run(attn, R, h, d, Epilogue::kAddResidual, hidden);
      hispec::rms_norm_rows(h, w.post_norm.data_ptr<float>(), normed, R, d, eps);
      w.gate_up_p.run(normed, R, act, inter, Epilogue::kSiluMul);
      w.down_p.run(act, R, hidden, d, Epilogue::kAddResidual, h);
    }
    return out;
  }

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
    Tensor attn = hispec::attention(q, keys_cache, values_cache, slots, step.kv_len, std::nullopt, n_kv_heads_,
                                    step.positions);
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
  mutable std::atomic<int64_t> packed_forwards_{0};
};

// The exit head (final norm + LM head) with the layers' kernels; forward(hidden, n) scores
// tokens [0, n) only (n < 0: all), a prefix of the head's rows.
class ExitHead {
 public:
  ExitHead(Tensor norm, Tensor weight, double eps) : norm_(norm), weight_(weight), eps_(eps) {
    if (packable(weight) && norm.scalar_type() == at::kFloat) packed_ = PackedLinear::pack(weight, false);
  }

  // Whether the head is packed as bf16 panels.
  bool bf16() const { return packed_.defined() && packed_.bf16(); }

  Tensor forward(const Tensor& hidden, int64_t vocab_limit) const {
    const int64_t vocab = weight_.size(0), n = vocab_limit < 0 ? vocab : std::min(vocab_limit, vocab);
    const int64_t d = hidden.size(-1), rows = hidden.numel() / d;
    if (packed_.defined() && hidden.device().is_cpu() && hidden.scalar_type() == at::kFloat && rows <= kPackedRows) {
      Tensor normed = hispec::rms_norm_f32(hidden, norm_, eps_);
      std::vector<int64_t> shape(hidden.sizes().begin(), hidden.sizes().end());
      shape.back() = n;
      Tensor logits = at::empty(shape, hidden.options());
      packed_.run(normed.data_ptr<float>(), rows, logits.data_ptr<float>(), n, Epilogue::kStore, nullptr, n);
      return logits;
    }
    return at::linear(rms_norm(hidden, norm_, eps_), weight_.slice(0, 0, n));
  }

  // The logits [rows, n] of hidden [..., d] (rows = all leading dims) and each row's argmax (the
  // first maximum, as torch and numpy pick), read on the host: the greedy decision without
  // another pass from Python.
  std::tuple<Tensor, std::vector<int64_t>> forward_argmax(const Tensor& hidden, int64_t vocab_limit) const {
    Tensor logits = forward(hidden, vocab_limit);
    const int64_t n = logits.size(-1), rows = logits.numel() / std::max<int64_t>(n, 1);
    std::vector<int64_t> best(rows, 0);
    if (logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous()) {
      const float* lp = logits.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) best[r] = hispec::argmax_f32(lp + r * n, n);
    } else {
      const Tensor top = logits.reshape({rows, n}).argmax(-1).cpu();  // host sync
      std::memcpy(best.data(), top.data_ptr<int64_t>(), rows * sizeof(int64_t));
    }
    return {logits.reshape({rows, n}), best};
  }

 private:
  Tensor norm_, weight_;
  double eps_;
  PackedLinear packed_;
};

}  // namespace

// packed_gemm.h on its own (tests): pack w [N, K] (paired: [gate; up]) and run it on x [M, K].
// epilogue: "store", "residual" (adds residual [M, N]) or "silu_mul" (paired).
Tensor packed_linear(const Tensor& x_in, const Tensor& w, const std::string& epilogue, const std::optional<Tensor>& residual) {
  const bool paired = epilogue == "silu_mul";
  TORCH_CHECK(paired || epilogue == "store" || epilogue == "residual", "unknown epilogue ", epilogue);
  const PackedLinear packed = PackedLinear::pack(w, paired);
  const Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), N = packed.out_features();
  Tensor out = at::empty({M, N}, x.options());
  Tensor res;
  if (epilogue == "residual") {
    TORCH_CHECK(residual.has_value(), "the residual epilogue needs a residual");
    res = residual->contiguous();
  }
  packed.run(x.data_ptr<float>(), M, out.data_ptr<float>(), N,
             paired ? Epilogue::kSiluMul : res.defined() ? Epilogue::kAddResidual : Epilogue::kStore,
             res.defined() ? res.data_ptr<float>() : nullptr);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels on their own, for tests and benchmarks.
  m.def("rms_norm_f32", &hispec::rms_norm_f32);
  m.def("packed_linear", &packed_linear, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("epilogue"),
        pybind11::arg("residual") = std::nullopt);
  m.def("packed_is_bf16", [](const Tensor& w) { return PackedLinear::pack(w, false).bf16(); });
  m.def("attention", &hispec::attention, pybind11::arg("q"), pybind11::arg("keys"), pybind11::arg("values"),
        pybind11::arg("slots"), pybind11::arg("kv_len"), pybind11::arg("mask"), pybind11::arg("n_kv_heads"),
        pybind11::arg("positions") = std::nullopt);
  pybind11::class_<ExitHead>(m, "ExitHead")
      .def(pybind11::init<Tensor, Tensor, double>())
      .def("bf16", &ExitHead::bf16)
      .def("forward", &ExitHead::forward, pybind11::arg("hidden"), pybind11::arg("vocab_limit") = -1,
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("forward_argmax", &ExitHead::forward_argmax, pybind11::arg("hidden"), pybind11::arg("vocab_limit") = -1,
           pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<LayerStack>(m, "LayerStack")
      .def(pybind11::init<std::vector<std::vector<std::optional<Tensor>>>, int64_t, int64_t, int64_t, double>())
      .def("__len__", &LayerStack::size)
      .def("bf16_layers", &LayerStack::bf16_layers)
      .def("packed_forwards", &LayerStack::packed_forwards)
      .def("forward", &LayerStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
