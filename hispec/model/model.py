"""The early-exit model: a Llama decoder whose shared final norm + LM head (the exit head) can
read the hidden state after any layer.

A model instance may own only a layer range [lo, hi) and optionally the embeddings and/or the
head, so a pipeline stage holds exactly its share of the weights.

    cache = model.new_cache(num_slots=4, capacity=512)
    step = model.plan(cache, slots=[0], num_tokens=len(prompt))   # positions, mask, rope
    h = model.embed(ids)                                           # [B, T, d]
    h = model.forward_layers(h, step, cache, 0, 4)                 # layers [0, 4), writes KV
    logits = model.exit_logits(h)                                  # exit after layer 3
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hispec.config import ModelConfig
from hispec.kv.cache import KVCache
from hispec.model.layers import DecoderLayer, rms_norm
from hispec.model.native import layer_stack_module
from hispec.model.rope import RotaryTable, inverse_frequencies, rotary_cos_sin
from hispec.model.step import ForwardStep, plan_step


class EarlyExitModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_range: tuple[int, int] | None = None,
        *,
        with_embeddings: bool = True,
        with_head: bool = True,
    ) -> None:
        super().__init__()
        lo, hi = layer_range or (0, config.num_layers)
        if not 0 <= lo < hi <= config.num_layers:
            raise ValueError(f"layer range [{lo}, {hi}) is not within [0, {config.num_layers})")
        self.config = config
        self.layer_range = (lo, hi)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d) if with_embeddings else None
        # Keyed by the global layer index so parameter names say which layers a stage owns.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(lo, hi)})
        self.norm = nn.Parameter(torch.ones(d)) if with_head else None
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False) if with_head else None
        self.register_buffer(
            "inv_freq", inverse_frequencies(config.rope, config.head_dim), persistent=False
        )
        self._ordered_layers = list(self.layers.values())  # plain list: no dict lookups per step
        self._rotary: RotaryTable | None = None
        self._native = None  # the C++ layer loop, when use_native_layers() turned it on
        self._native_exit_head = None  # the C++ exit head, made on first use
        self._embedding_rows: torch.Tensor | None = None  # embed_ids' view of the embedding, made on first use
        # The precision the weights were rounded to (load_model's dtype); the parameters are held in
        # `dtype`, wider on CPU for bfloat16 (hispec.model.loading.compute_dtype). None: not loaded.
        self.weights_dtype: torch.dtype | None = None

    # ---- set-up --------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).qkv_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).qkv_proj.weight.device

    def new_cache(self, num_slots: int, capacity: int, layer_range: tuple[int, int] | None = None) -> KVCache:
        """A KV cache for this model's layers (or a sub-range of them)."""
        lo, hi = layer_range or self.layer_range
        if not self.layer_range[0] <= lo < hi <= self.layer_range[1]:
            raise ValueError(f"cache range [{lo}, {hi}) is outside the model's layers {self.layer_range}")
        return KVCache(
            layer_range=(lo, hi),
            num_slots=num_slots,
            capacity=capacity,
            num_kv_heads=self.config.num_key_value_heads,
            head_dim=self.config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def plan(
        self, cache: KVCache, slots: Sequence[int], num_tokens: Sequence[int] | int, layer: int | None = None
    ) -> ForwardStep:
        """Plan a step that appends `num_tokens` to `slots` after the cache length of `layer`
        (default: the cache's first layer)."""
        inv_freq = self._buffers["inv_freq"]  # not `self.inv_freq`: nn.Module's attribute fallback, per step
        if self._rotary is None or self._rotary.inv_freq is not inv_freq:
            self._rotary = RotaryTable(inv_freq, self.dtype)  # (re)built after loading; `_apply` drops it
        return plan_step(cache, cache.layer_lo if layer is None else layer, slots, num_tokens, self._rotary)

    # ---- forward pieces ------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, d] hidden states."""
        if self.embed_tokens is None:
            raise RuntimeError("this model part was loaded without embeddings")
        return self.embed_tokens(token_ids)

    def embed_ids(self, token_ids: list[list[int]]) -> torch.Tensor:
        """`embed` of [B][T] ids given as Python lists. One token (every draft step at batch size
        1) is a view of its embedding row: no index tensor, no gather."""
        rows = self._embedding_rows
        if rows is None:
            if self.embed_tokens is None:
                raise RuntimeError("this model part was loaded without embeddings")
            weight = self.embed_tokens.weight
            rows = self._embedding_rows = weight.view(weight.shape[0], 1, 1, weight.shape[1])  # [V, 1, 1, d]
        if len(token_ids) == 1 and len(token_ids[0]) == 1 and 0 <= token_ids[0][0] < rows.shape[0]:
            return rows[token_ids[0][0]]  # [1, 1, d], a view
        return self.embed(torch.tensor(token_ids, device=rows.device))

    def forward_layers(
        self, hidden: torch.Tensor, step: ForwardStep, cache: KVCache, lo: int, hi: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layers [lo, hi) on hidden [B, T, d] for `step`; append their K/V to `cache` and
        advance those layers' lengths to `step.ends`. `out` [B, T, d]: where the result is
        written (and returned), e.g. a buffer the caller keeps; by default a new tensor."""
        first, last = self.layer_range
        if not first <= lo < hi <= last:
            raise ValueError(f"layers [{lo}, {hi}) are not owned by this model part {self.layer_range}")
        if not cache.holds((lo, hi), step.slots, step.starts):
            held = [[cache.length(layer, slot) for slot in step.slots] for layer in range(lo, hi)]
            raise ValueError(
                f"cache lengths {held} of layers [{lo}, {hi}) do not match the step's starts "
                f"{step.starts.tolist()}: roll back or advance the layers first"
            )
        hidden = self._run_layers(hidden, step, cache, lo - first, hi - first, out)
        cache.set_lengths((lo, hi), step.slots, step.ends)
        return hidden

    def _run_layers(
        self, hidden: torch.Tensor, step: ForwardStep, cache: KVCache, start: int, stop: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        if self._native is not None:
            return self._run_layers_native(hidden, step, cache, start, stop, out)
        for layer in self._ordered_layers[start:stop]:
            hidden = layer(hidden, step, cache)
        return hidden if out is None else out.copy_(hidden)

    def _run_layers_native(
        self, hidden: torch.Tensor, step: ForwardStep, cache: KVCache, start: int, stop: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        rows = slice(self.layer_range[0] + start - cache.layer_lo, self.layer_range[0] + stop - cache.layer_lo)
        contiguous = isinstance(step.slot_read, slice)
        return self._native.forward(
            hidden, start, stop, cache.keys[rows], cache.values[rows], step.cos, step.sin, step.positions, step.masked,
            None if contiguous else step.slot_read,
            step.slot_read.start if contiguous else 0,
            -1 if step.uniform_columns is None else step.uniform_columns.start,
            step.slot_index, step.write_pos, step.kv_len, out,
        )

    def use_native_layers(self, enabled: bool = True) -> bool:
        """Run the layer loop and the exit head in C++ (`hispec.model.native`): the forward of
        `DecoderLayer` without the Python interpreter between ops (a decode step is ~25 small
        ops per layer). In fp32 on CPU the norms, rotary + KV write and attention are one-pass
        kernels, so results match the Python path to fp32 rounding; other dtypes and devices
        run the same ATen ops as the Python path, bit for bit.

        The stack holds references to the current parameters; `.to()` and
        `store_projections_input_major()` rebind it. Returns whether it is on (False when the
        extension cannot be built: the Python loop then runs)."""
        self._native = None
        self._native_exit_head = None  # it holds the current parameters: rebuilt on use
        if not enabled:
            return False
        module = layer_stack_module()
        if module is None:
            return False
        cfg = self.config
        self._native_module = module  # the exit head is made later from the same build (see _native_head)
        self._native = module.LayerStack(
            [layer.parameter_list() for layer in self._ordered_layers],
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
        )
        return True

    @property
    def native_layers(self) -> bool:
        return self._native is not None

    @property
    def native_stack(self):
        """The C++ `LayerStack` (None: the Python loop runs). Its `bf16_layers()` and
        `packed_forwards()` say how its weights are packed and which path its steps took."""
        return self._native

    def native_exit_head(self):
        """The C++ exit head (None: the Python head runs); `bf16()`: packed as bf16 panels."""
        return None if self._native is None else self._native_head()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._rotary = None  # the dtype or device may have changed
        self._native_exit_head = None
        self._embedding_rows = None
        if self._native is not None:  # parameters may be new tensors now
            self.use_native_layers()
        return module

    def store_projections_input_major(self) -> "EarlyExitModel":
        """Keep every projection weight [out, in] as a transposed view of [in, out] storage.

        Same tensors, same math; only the memory layout changes. MKL's fp32 GEMM runs x @ W^T
        faster on this layout once a forward carries several rows (a batch, or a verification
        block): 16 layers' projections at 8 rows take 2.0 ms instead of 3.0, at 24 rows 4.9
        instead of 6.3 (1 row: 1.7 vs 1.5). Measured on the 2-core CPU with the bundled model,
        the engine at 8 concurrent sequences went from 580 to 650 tokens/s (steady state, median
        of 3 alternating runs) and stayed at ~185 for one. The exit head, tied to the
        embeddings, keeps its layout.
        """
        for layer in self._ordered_layers:
            for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                proj.weight.data = proj.weight.data.t().contiguous().t()
        if self._native is not None:
            self.use_native_layers()
        return self

    def compile_layers(self) -> "EarlyExitModel":
        """Compile the layer loop with torch.compile (inductor), once per distinct layer range.

        At small batch, a decode step is bound by dispatching ~40 small ops per layer; fused
        kernels remove most of that. Shapes are dynamic (context length grows every step), so
        a range compiles once (tens of seconds on a CPU) and is reused. Off by default: tests
        and short jobs do not pay the compile.
        """
        self.use_native_layers(False)  # inductor compiles the Python loop
        self._run_layers = torch.compile(self._run_layers, dynamic=True)
        return self

    def exit_logits(self, hidden: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
        """The exit head (shared final norm + LM head) on hidden states [..., d] -> [..., vocab].

        `vocab_limit=n`: logits of tokens [0, n) only, [..., n] (the first n rows of the head, a
        view). For proposals below the target, where any distribution is lossless: a byte-level
        BPE vocabulary is numbered in merge order, so the lowest ids are the most frequent tokens,
        and a head that fits the CPU's L2 costs a fraction of the full one."""
        tokens = self._head_tokens(vocab_limit)
        if self._native is not None:
            return self._native_head().forward(hidden, tokens)
        return self._python_logits(hidden, tokens)

    def exit_head(self, hidden: torch.Tensor, vocab_limit: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """`exit_logits` of hidden [..., d] as [N, vocab] (N: the leading dims' rows) and each
        row's argmax on the host (the first maximum on ties): the greedy decision of every row.
        The C++ head finds it while the logits are in cache; a separate pass from Python costs
        ~30 us per call after a forward has streamed the weights through the caches."""
        tokens = self._head_tokens(vocab_limit)
        if self._native is not None:
            return self._native_head().forward_argmax(hidden, tokens)
        logits = self._python_logits(hidden, tokens)
        logits = logits.reshape(-1, logits.shape[-1])
        return logits, argmax_rows(logits)

    def _native_head(self):
        """The C++ exit head (final norm + LM head; in fp32 on CPU a packed copy of the head),
        made on first use."""
        if self._native_exit_head is None:
            self._require_head()
            self._native_exit_head = self._native_module.ExitHead(self.norm, self.lm_head.weight, self.config.rms_norm_eps)
        return self._native_exit_head

    def _python_logits(self, hidden: torch.Tensor, tokens: int) -> torch.Tensor:
        self._require_head()
        return F.linear(rms_norm(hidden, self.norm, self.config.rms_norm_eps), self.lm_head.weight[:tokens])

    def _require_head(self) -> None:
        if self.lm_head is None or self.norm is None:
            raise RuntimeError("this model part was loaded without the exit head")

    def _head_tokens(self, vocab_limit: int | None) -> int:
        """The vocabulary prefix the head scores (`vocab_limit`, at most the vocabulary)."""
        vocab = self.config.vocab_size
        if vocab_limit is None:
            return vocab
        if vocab_limit < 1:
            raise ValueError(f"vocab_limit must be in [1, {vocab}], got {vocab_limit}")
        return min(vocab_limit, vocab)

    def causal_hidden_states(self, token_ids: torch.Tensor, exits: Sequence[int]) -> list[torch.Tensor]:
        """Cache-free forward over whole sequences [B, T] from position 0 (training, scoring).

        Returns the hidden state [B, T, d] after each layer in `exits` (layer numbers counted
        from 1, so exit `L` is the final layer's output). Needs the full model.
        """
        wanted = set(exits)
        B, T = token_ids.shape
        positions = torch.arange(T, device=token_ids.device).expand(B, T)
        cos, sin = rotary_cos_sin(positions, self.inv_freq, self.dtype)
        hidden = self.embed(token_ids)
        outputs = []
        for layer in self._ordered_layers:
            hidden = layer.forward_causal(hidden, cos, sin)
            if layer.index + 1 in wanted:
                outputs.append(hidden)
        return outputs


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first maximum on ties, like torch), on the host. On CPU through
    numpy: ~2 us instead of torch's ~20-50 us for [1-5, 8192]."""
    if logits.device.type == "cpu":
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()  # host sync
