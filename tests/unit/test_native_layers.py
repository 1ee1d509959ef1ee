"""The C++ layer stack computes what the Python layer loop computes, for every kind of step the
engine makes: to rounding in fp32 (its one-pass kernels sum in a different order), bit for bit
where it runs plain ATen ops (fp64), and greedy decoding gives the same tokens.

These tests fail (not skip) when the extension does not build: the C++ stack is the default
runtime. Only `HISPEC_NATIVE=0`, the explicit choice of the Python loop, skips them."""

from __future__ import annotations

import pytest
import torch

from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.model.native import build_layer_stack, native_enabled
from tests.unit.tiny_checkpoints import VARIANTS, make_checkpoint

pytestmark = pytest.mark.skipif(not native_enabled(), reason="HISPEC_NATIVE=0: the Python layer loop was chosen")


@pytest.fixture(scope="module", autouse=True)
def module():
    """The extension; a failed build errors every test here with the compiler's output."""
    return build_layer_stack().module


def both_paths(directory, **kwargs):
    python, native = load_model(directory, native=False, **kwargs), load_model(directory, **kwargs)
    assert not python.native_layers and native.native_layers
    return python, native


# (slots, tokens per slot) after a prefill of every slot in `SLOTS`: each case is one branch of
# the layer code (rectangular write + view read, scattered write, gathered read, masked attention).
SLOTS = [0, 1, 2]
STEPS = {
    "decode, contiguous": ([0, 1, 2], 1),
    "verify block, contiguous": ([1, 2], 4),
    "decode, gathered slots": ([2, 0], 1),
    "ragged widths": ([0, 1, 2], [3, 1, 2]),
    "one sequence": ([1], 5),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(STEPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_step_kind_matches_python(tmp_path, variant, case, dtype):
    make_checkpoint(tmp_path, variant, num_layers=3)
    slots, counts = STEPS[case]
    generator = torch.Generator().manual_seed(0)
    results = []
    for model in both_paths(tmp_path):
        model.to(dtype)
        cache = model.new_cache(num_slots=4, capacity=48)
        hidden_states = []
        with torch.inference_mode():
            for slot, length in zip(SLOTS, (35, 3, 5)):  # different lengths: later steps are ragged
                ids = torch.randint(0, 101, (1, length), generator=torch.Generator().manual_seed(slot))
                model.forward_layers(model.embed(ids), model.plan(cache, [slot], length), cache, 0, 3)
            step = model.plan(cache, slots, counts)
            ids = torch.randint(0, 101, (len(slots), step.width), generator=generator.manual_seed(1))
            hidden_states.append(model.forward_layers(model.embed(ids), step, cache, 0, 1))
            hidden_states.append(model.forward_layers(hidden_states[-1], step, cache, 1, 3))  # a later range
            hidden_states.append(model.exit_logits(hidden_states[-1]))
        keys = [k.clone() for k in cache.keys] + [v.clone() for v in cache.values]
        results.append((hidden_states, keys, cache.lengths.copy()))
    (h_py, kv_py, len_py), (h_nat, kv_nat, len_nat) = results
    same = torch.equal if dtype == torch.float64 else lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert all(same(a, b) for a, b in zip(h_py, h_nat))
    assert all(same(a, b) for a, b in zip(kv_py, kv_nat))  # the same cache writes
    assert (len_py == len_nat).all()


def test_partial_model_and_cache_ranges(tmp_path):
    """A pipeline stage owning layers [2, 4) with a cache for [3, 4) only indexes its caches right."""
    make_checkpoint(tmp_path, "tied-gqa", num_layers=4)
    outputs = []
    for model in both_paths(tmp_path, layer_range=(2, 4), with_embeddings=False, with_head=False):
        cache = model.new_cache(num_slots=2, capacity=16, layer_range=(3, 4))
        hidden = torch.randn(2, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            outputs.append(model.forward_layers(hidden, model.plan(cache, [0, 1], 3), cache, 3, 4))
    assert torch.allclose(*outputs, rtol=1e-4, atol=1e-5)


def test_greedy_and_rebinding_after_to(tmp_path):
    make_checkpoint(tmp_path, "sharded-bias", num_layers=3)
    python, native = both_paths(tmp_path)
    prompt = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    assert greedy_generate(native, prompt, 20) == greedy_generate(python, prompt, 20)
    # .to() makes new parameter tensors: the stack must follow them, not keep the old ones.
    native.to(torch.float64)
    python.to(torch.float64)
    assert native.native_layers
    assert greedy_generate(native, prompt, 20) == greedy_generate(python, prompt, 20)


def test_switching_off(tmp_path):
    make_checkpoint(tmp_path, "tied-gqa", num_layers=2)
    model = load_model(tmp_path)
    assert model.native_layers
    assert model.use_native_layers(False) is False and not model.native_layers


def test_hispec_native_0_runs_the_python_loop_with_the_same_results(tmp_path, monkeypatch):
    """The deliberate fallback: with HISPEC_NATIVE=0 set, `load_model` (native by default) runs
    the Python loop, read when the model is loaded, and decodes the same tokens."""
    make_checkpoint(tmp_path, "sharded-bias", num_layers=3)
    native = load_model(tmp_path)
    with monkeypatch.context() as env:
        env.setenv("HISPEC_NATIVE", "0")
        python = load_model(tmp_path)
        assert not python.use_native_layers()  # asked for, still off
    assert native.native_layers and not python.native_layers
    prompt = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    assert greedy_generate(python, prompt, 20) == greedy_generate(native, prompt, 20)
    hidden = torch.randn(3, python.config.hidden_size, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(python.exit_logits(hidden), native.exit_logits(hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, T", [(4, 2, 1), (4, 2, 5), (8, 2, 3), (4, 4, 2)])
def test_attention_kernel_matches_sdpa(module, heads, kv_heads, T):
    """The fp32 attention kernel against torch's SDPA on the same cache rows: grouped heads,
    a causal mask with padding rows, sequences in non-adjacent slots."""
    g = torch.Generator().manual_seed(heads * 10 + T)
    B, D, cap, kv_len = 2, 16, 24, 11
    keys, values = (torch.randn(4, kv_heads, cap + 1, D, generator=g) for _ in range(2))
    q = torch.randn(B, T, heads, D, generator=g)
    slots = torch.tensor([3, 1])
    positions = torch.tensor([[kv_len - T + t for t in range(T)], [4 + min(t, 1) for t in range(T)]])
    mask = torch.arange(kv_len)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, kv_len]
    got = module.attention(q, keys, values, slots, kv_len, mask, kv_heads)  # [B, T, H * D]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys[slots, :, :kv_len], values[slots, :, :kv_len], attn_mask=mask,
        enable_gqa=heads != kv_heads,
    ).transpose(1, 2).reshape(B, T, heads * D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The causal rule from positions (how the layer stack masks) is the same mask.
    torch.testing.assert_close(module.attention(q, keys, values, slots, kv_len, None, kv_heads, positions), got)
    if T == 1:  # no mask: every key up to kv_len
        unmasked = module.attention(q, keys, values, slots, kv_len, None, kv_heads)
        torch.testing.assert_close(unmasked, module.attention(q, keys, values, slots, kv_len, torch.ones_like(mask), kv_heads))


def test_rms_norm_kernel_matches_torch(module):
    g = torch.Generator().manual_seed(0)
    for d in (256, 64, 40):  # 40: a width that is not a multiple of the vector length
        x, w = torch.randn(3, 5, d, generator=g), torch.randn(d, generator=g)
        torch.testing.assert_close(module.rms_norm_f32(x, w, 1e-5), torch.nn.functional.rms_norm(x, (d,), w, 1e-5))


# ---- packed small-row GEMMs (csrc/packed_gemm.h) -----------------------------------------------
@pytest.mark.parametrize("bf16_weights", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 16])
@pytest.mark.parametrize("n, k", [(32, 16), (100, 40), (8, 256)])  # whole panels, a ragged last panel, N < 32
def test_packed_linear_epilogues(module, bf16_weights, rows, n, k):
    """x W^T, + residual, and silu(gate) * up, against torch; bf16-exact weights take the bf16
    panels, others fp32 ones (same products either way)."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(2 * n, k, generator=g)
    if bf16_weights:
        w = w.bfloat16().float()
    assert module.packed_is_bf16(w) == bf16_weights
    x, residual = torch.randn(rows, k, generator=g), torch.randn(rows, 2 * n, generator=g)
    torch.testing.assert_close(module.packed_linear(x, w, "store"), x @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.packed_linear(x, w, "residual", residual), x @ w.T + residual, rtol=1e-4, atol=1e-4)
    gate, up = (x @ w.T).chunk(2, -1)
    torch.testing.assert_close(module.packed_linear(x, w, "silu_mul"), torch.nn.functional.silu(gate) * up,
                               rtol=1e-4, atol=1e-4)


def test_packed_rows_do_not_depend_on_the_batch(module):
    """Each output sums over k in order in one accumulator: a row gets the same bits alone, with 7
    others, or in the second pass of 16 rows."""
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(96, 64, generator=g).bfloat16().float(), torch.randn(16, 64, generator=g)
    together = module.packed_linear(x, w, "store")
    for r in (0, 5, 12):
        assert torch.equal(module.packed_linear(x[r : r + 1], w, "store"), together[r : r + 1])
    assert torch.equal(module.packed_linear(x[8:], w, "store"), together[8:])


def test_bf16_exact_checkpoint_runs_packed_and_matches_python(module, tmp_path):
    """The bundled checkpoint's case: bf16 weights loaded in fp32 take the bf16 panels; decode
    steps, verification blocks and a wide prefill (> 16 rows: MKL) match the Python loop."""
    make_checkpoint(tmp_path, "tied-gqa", num_layers=3)
    python, native = both_paths(tmp_path)
    for model in (python, native):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
        model.use_native_layers(model is native)
    assert module.packed_is_bf16(native.layers["0"].qkv_proj.weight)
    prompt = torch.randint(3, python.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    caches = [m.new_cache(num_slots=1, capacity=64) for m in (python, native)]
    for tokens in (prompt, prompt[:, :1], prompt[:, :5]):
        outs = []
        for model, cache in zip((python, native), caches):
            step = model.plan(cache, [0], tokens.shape[1])
            outs.append(model.forward_layers(model.embed(tokens), step, cache, 0, 3))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert greedy_generate(native, prompt[0].tolist(), 12) == greedy_generate(python, prompt[0].tolist(), 12)


def test_exit_head_argmax_and_vocabulary_prefix(tmp_path):
    """exit_head's argmax is the logits' first maximum; a vocabulary prefix is the full head's
    first columns, bit for bit; wide inputs (> 16 rows) take the ATen head with the same result."""
    make_checkpoint(tmp_path, "tied-gqa", num_layers=2)
    python, native = both_paths(tmp_path)
    g = torch.Generator().manual_seed(3)
    for rows in (1, 4, 20):
        hidden = torch.randn(rows, python.config.hidden_size, generator=g)
        logits, best = native.exit_head(hidden)
        assert best == logits.argmax(-1).tolist()
        torch.testing.assert_close(logits, python.exit_logits(hidden), rtol=1e-5, atol=1e-5)
        prefix, prefix_best = native.exit_head(hidden, 40)
        assert torch.equal(prefix, logits[:, :40]) and prefix_best == prefix.argmax(-1).tolist()


def test_bf16_load_counts_packed_forwards_only_for_steps_that_run_packed(tmp_path):
    """dtype="bfloat16" on CPU: every layer packed as bf16 panels; the stack's packed_forwards()
    counts the steps of <= 16 rows (decode, verify block), not a wider prefill (MKL); both match
    the Python loop on the same bf16-rounded fp32 weights."""
    make_checkpoint(tmp_path, "tied-gqa", num_layers=3)
    python, native = both_paths(tmp_path, dtype="bfloat16")
    stack = native.native_stack
    assert stack.bf16_layers() == 3 and native.native_exit_head().bf16()
    prompt = torch.randint(3, python.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    caches = [m.new_cache(num_slots=1, capacity=64) for m in (python, native)]
    for tokens, packed in ((prompt, False), (prompt[:, :5], True), (prompt[:, :1], True)):
        before = stack.packed_forwards()
        outs = []
        for model, cache in zip((python, native), caches):
            step = model.plan(cache, [0], tokens.shape[1])
            outs.append(model.forward_layers(model.embed(tokens), step, cache, 0, 3))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
        assert stack.packed_forwards() - before == int(packed)
