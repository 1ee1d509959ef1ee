"""The LayerSkip-style training recipe: early-exit losses through the shared exit head plus
layer dropout, on a small Llama trained from scratch on CPU.

    loss = CE(final) + exit_weight(step) * sum_e s_e * [(1 - a) CE(exit_e) + a KL(final || exit_e)]

where s_e (summing to 1 over the exits supervised at this step) sets how the early-exit budget
is spread over layers ("early" favours the first layers, whose agreement with the final layer
is what speculative drafting needs), exit_weight can ramp up over training as in LayerSkip's
curriculum, and a = `exit_distill` optionally pulls each exit towards the (detached) final
distribution, i.e. directly towards the agreement metric.

Each exit costs a full LM-head matmul, which for a small model with an 8k+ vocabulary is
several decoder layers' worth of compute; `exit_token_fraction` (exit losses on a random
subset of positions) and `exit_rotation` (LayerSkip's rotational curriculum: a rotating subset
of exits per step) keep that overhead down.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hispec.config import ModelConfig, RopeConfig
from hispec.model.model import EarlyExitModel
from hispec.model.rope import rotary_cos_sin
from hispec.train import checkpointing as ckpt
from hispec.train import data as data_mod
from hispec.train.tokenizer import load_tokenizer, special_ids, train_tokenizer

EXIT_SHAPES = ("constant", "early")
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    # model shape
    layers: int = 16
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    vocab_size: int = 8192
    seq_len: int = 256
    max_positions: int = 0  # config.json max_position_embeddings; 0 -> seq_len
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    # optimisation
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # early exits
    exit_layers: tuple[int, ...] = ()  # supervised early exits (1-based); () -> every layer < L
    exit_weight: float = 1.0  # total weight of the early-exit losses relative to the final CE
    exit_shape: str = "early"  # how exit_weight is spread over exits: constant | early (∝ L - e)
    exit_ramp_fraction: float = 0.0  # exit weight grows linearly from 0 over this fraction of steps
    exit_distill: float = 0.0  # mix of KL(final || exit) into each exit loss, in [0, 1]
    exit_token_fraction: float = 1.0  # fraction of positions the exit losses are computed on
    exit_rotation: int = 1  # exit e supervised at step s iff (e + s) % exit_rotation == 0
    layer_dropout: float = 0.0  # max skip rate (last layer); layer l skipped w.p. p * l / (L - 1)
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    bf16: bool = True  # bf16 autocast for the matmuls (master weights stay fp32)
    threads: int = 2
    save_dtype: str = "bfloat16"  # dtype of the final weights
    data_pattern: str = "*.py"

    def __post_init__(self) -> None:
        positive = ("layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len", "steps", "batch_size",
                    "checkpoint_every", "keep_checkpoints", "log_every", "threads", "exit_rotation")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, heads a multiple of kv_heads")
        if (self.hidden // self.heads) % 2:
            raise ValueError("head dim must be even (rotary embeddings)")
        if self.vocab_size < 260:
            raise ValueError("vocab_size must hold 256 bytes + 4 special tokens")
        if not all(1 <= e < self.layers for e in self.exit_layers):
            raise ValueError(f"exit_layers must be within [1, {self.layers - 1}], got {self.exit_layers}")
        if self.exit_shape not in EXIT_SHAPES:
            raise ValueError(f"exit_shape must be one of {EXIT_SHAPES}")
        for name in ("exit_ramp_fraction", "exit_distill", "layer_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not 0.0 < self.exit_token_fraction <= 1.0:
            raise ValueError("exit_token_fraction must be in (0, 1]")
        if self.lr <= 0 or self.exit_weight < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive, exit_weight and weight_decay non-negative")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError("warmup_steps must be in [0, steps)")
        if self.save_dtype not in ("bfloat16", "float32"):
            raise ValueError("save_dtype must be bfloat16 or float32")

    @property
    def early_exits(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.exit_layers))) if self.exit_layers else tuple(range(1, self.layers))

    @property
    def display_exits(self) -> tuple[int, ...]:
        """A few exits shown in the progress bar: L/8, L/4, L/2, L."""
        L = self.layers
        return tuple(sorted({max(1, L // 8), max(1, L // 4), max(1, L // 2), L}))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        raw = json.loads(text)
        raw["exit_layers"] = tuple(raw.get("exit_layers", ()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


# ---- model ---------------------------------------------------------------------------------
def model_config(cfg: TrainConfig, bos_id: int, eos_id: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads,
        max_position_embeddings=cfg.max_positions or cfg.seq_len,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=cfg.rope_theta),
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_ids=(eos_id,),
        torch_dtype="float32",
    )


def build_model(mcfg: ModelConfig, seed: int) -> EarlyExitModel:
    """A freshly initialised model: N(0, 0.02) weights, residual-branch outputs scaled down by
    sqrt(2 L) (GPT-2 style) so the residual stream does not grow with depth."""
    torch.manual_seed(seed)
    model = EarlyExitModel(mcfg)
    out_std = 0.02 / math.sqrt(2 * mcfg.num_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norms stay at 1
        std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        torch.nn.init.normal_(p, mean=0.0, std=std)
    if mcfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.train()


def training_hidden_states(
    model: EarlyExitModel, token_ids: torch.Tensor, exits: Sequence[int], keep: Sequence[bool] | None
) -> dict[int, torch.Tensor]:
    """`causal_hidden_states` with layer dropout: a layer with keep[l] False passes its input
    through (the whole batch skips it, which also saves its compute)."""
    B, T = token_ids.shape
    positions = torch.arange(T).expand(B, T)
    cos, sin = rotary_cos_sin(positions, model.inv_freq, torch.float32)
    wanted = set(exits)
    hidden = model.embed(token_ids)
    out = {}
    for i, layer in enumerate(model._ordered_layers):
        if keep is None or keep[i]:
            hidden = layer.forward_causal(hidden, cos, sin)
        if i + 1 in wanted:
            out[i + 1] = hidden
    return out


# ---- schedule and loss ---------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def exit_weights(cfg: TrainConfig, step: int) -> dict[int, float]:
    """Weight of each early exit supervised at `step` (the final layer's weight is 1)."""
    ramp = min(1.0, step / (cfg.exit_ramp_fraction * cfg.steps)) if cfg.exit_ramp_fraction > 0 else 1.0
    active = [e for e in cfg.early_exits if (e + step) % cfg.exit_rotation == 0]
    if not active or cfg.exit_weight * ramp == 0:
        return {}  # no exit heads to compute this step
    shape = {e: (cfg.layers - e if cfg.exit_shape == "early" else 1.0) for e in active}
    total = sum(shape.values())
    return {e: cfg.exit_weight * ramp * s / total for e, s in shape.items()}


def layer_keep(cfg: TrainConfig, gen: torch.Generator) -> list[bool] | None:
    if cfg.layer_dropout == 0:
        return None
    L = cfg.layers
    rates = torch.tensor([cfg.layer_dropout * l / max(1, L - 1) for l in range(L)])
    return (torch.rand(L, generator=gen) >= rates).tolist()


def training_loss(
    model: EarlyExitModel, batch: torch.Tensor, cfg: TrainConfig, step: int, gen: torch.Generator
) -> tuple[torch.Tensor, dict[int, float]]:
    """Total loss and the CE of each exit computed this step ({layer: ce}, final included)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    weights = exit_weights(cfg, step)
    L = cfg.layers
    keep = layer_keep(cfg, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        hidden = training_hidden_states(model, inputs, [*weights, L], keep)
        final_logits = model.exit_logits(hidden[L]).float()
    final_ce = F.cross_entropy(final_logits.flatten(0, 1), targets.flatten())
    losses = {L: final_ce.item()}
    total = final_ce
    if not weights:
        return total, losses
    T = inputs.shape[1]
    idx = None
    if cfg.exit_token_fraction < 1.0:
        k = max(1, round(T * cfg.exit_token_fraction))
        idx = torch.randperm(T, generator=gen)[:k].sort().values
    sub_targets = targets if idx is None else targets[:, idx]
    teacher = None
    if cfg.exit_distill > 0:
        final_sub = final_logits if idx is None else final_logits[:, idx]
        teacher = F.log_softmax(final_sub.detach(), dim=-1).flatten(0, 1)
    for e, w in weights.items():
        h = hidden[e] if idx is None else hidden[e][:, idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model.exit_logits(h).float().flatten(0, 1)
        ce = F.cross_entropy(logits, sub_targets.flatten())
        losses[e] = ce.item()
        term = ce
        if teacher is not None:
            kl = F.kl_div(F.log_softmax(logits, dim=-1), teacher, log_target=True, reduction="batchmean")
            term = (1 - cfg.exit_distill) * ce + cfg.exit_distill * kl
        total = total + w * term
    return total, losses


def make_optimizer(model: EarlyExitModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D parameters)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- the run -------------------------------------------------------------------------------
@dataclass
class _Meter:
    """Running sums of exit losses between log lines."""

    sums: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    ema: dict[int, float] = field(default_factory=dict)  # for the progress bar

    def add(self, losses: dict[int, float]) -> None:
        for e, v in losses.items():
            self.sums[e] = self.sums.get(e, 0.0) + v
            self.counts[e] = self.counts.get(e, 0) + 1
            self.ema[e] = v if e not in self.ema else 0.9 * self.ema[e] + 0.1 * v

    def means(self) -> dict[str, float]:
        return {str(e): self.sums[e] / self.counts[e] for e in sorted(self.sums)}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps_done: int
    first_loss: float  # final-layer CE of the first step of this invocation
    last_loss: float  # mean final-layer CE over the last log interval
    tokens_per_s: float
    stopped_early: bool


def prepare_data(data: str, out: Path, cfg: TrainConfig, resume: bool):
    """Load and split the corpus, train (or on resume reload) the tokenizer, pack sequences."""
    docs = data_mod.load_documents(data, cfg.data_pattern)
    split = data_mod.split_documents(docs)
    data_mod.write_manifest(split, str(data), out)
    if resume and (out / "tokenizer.json").is_file():
        tok = load_tokenizer(out)
    else:
        tok = train_tokenizer((d.text for d in split.train), cfg.vocab_size)
    ids = special_ids(tok)
    stream = data_mod.encode_documents(tok, split.train, ids["bos"], ids["eos"])
    return tok, ids, data_mod.pack(stream, cfg.seq_len)


def train(cfg: TrainConfig, data: str, out_dir: str | Path, *, resume: bool = False,
          max_minutes: float | None = None, progress: bool = True) -> TrainResult:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    tok, ids, sequences = prepare_data(data, out, cfg, resume)
    # BPE may stop short of vocab_size on a small corpus; the embedding keeps cfg.vocab_size rows.
    if tok.get_vocab_size() > cfg.vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size {cfg.vocab_size}")
    model = build_model(model_config(cfg, ids["bos"], ids["eos"]), cfg.seed)
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_step, elapsed_before = 0, 0.0
    checkpoint = ckpt.latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        start_step, elapsed_before = _restore(checkpoint, model, optimizer, gen)
    _truncate_metrics(out / METRICS_FILE, start_step)
    (out / TRAIN_CONFIG_FILE).write_text(cfg.to_json())
    tok.save(str(out / "tokenizer.json"))

    deadline = time.monotonic() + max_minutes * 60 if max_minutes else math.inf
    meter, tokens_per_step = _Meter(), cfg.batch_size * cfg.seq_len
    first_loss, last_loss, stopped_early = math.nan, math.nan, False
    run_start, interval_start, step = time.monotonic(), time.monotonic(), start_step
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress, dynamic_ncols=True, desc="train")
    with (out / METRICS_FILE).open("a") as metrics:
        for step in range(start_step, cfg.steps):
            if time.monotonic() >= deadline:
                stopped_early = True
                break
            losses = _train_step(model, optimizer, data_mod.batch_at(sequences, step, cfg.batch_size, cfg.seed),
                                 cfg, step, gen)
            meter.add(losses)
            if math.isnan(first_loss):
                first_loss = losses[cfg.layers]
            done = step + 1
            tok_s = (done - start_step) * tokens_per_step / (time.monotonic() - run_start)
            bar.set_postfix_str(_postfix(meter, cfg, tok_s), refresh=False)
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.monotonic()
                n_steps = done % cfg.log_every or cfg.log_every
                last_loss = meter.sums[cfg.layers] / meter.counts[cfg.layers]
                record = {"step": done, "lr": lr_at(cfg, step), "loss": meter.means(),
                          "tokens_per_s": n_steps * tokens_per_step / (now - interval_start),
                          "elapsed_s": elapsed_before + now - run_start}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                meter.reset()
                interval_start = now
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_intermediate(out, model, tok, ids, optimizer, gen, done,
                                   elapsed_before + time.monotonic() - run_start, cfg)
    bar.close()
    steps_done = step if stopped_early else cfg.steps
    if stopped_early and steps_done > start_step:  # keep the run resumable past the time limit
        _save_intermediate(out, model, tok, ids, optimizer, gen, steps_done,
                           elapsed_before + time.monotonic() - run_start, cfg)
    model.eval()
    ckpt.save_checkpoint(model, tok, out, cfg.save_dtype, ids["pad"])
    plot_metrics(out / METRICS_FILE, out / "loss_per_exit.png")
    tok_s = (steps_done - start_step) * tokens_per_step / max(1e-9, time.monotonic() - run_start)
    return TrainResult(out, steps_done, first_loss, last_loss, tok_s, stopped_early)


def _train_step(model, optimizer, batch, cfg: TrainConfig, step: int, gen) -> dict[int, float]:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss, losses = training_loss(model, batch, cfg, step, gen)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return losses


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past `step` (written by an interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _postfix(meter: _Meter, cfg: TrainConfig, tok_s: float) -> str:
    shown = " ".join(f"L{e}={meter.ema[e]:.3f}" for e in cfg.display_exits if e in meter.ema)
    return f"{shown} tok/s={tok_s:.0f}"


def _save_intermediate(out, model, tok, ids, optimizer, gen, step, elapsed_s, cfg: TrainConfig) -> None:
    path = ckpt.save_checkpoint(model, tok, out / f"checkpoint-{step}", "float32", ids["pad"])
    ckpt.save_training_state(path, step, optimizer, gen, elapsed_s)
    ckpt.prune_checkpoints(out, cfg.keep_checkpoints)


def _restore(path: Path, model, optimizer, gen) -> tuple[int, float]:
    ckpt.load_weights_into(model, path)
    state = torch.load(path / ckpt.STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state["elapsed_s"])


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss per exit vs step, one line per exit (final layer bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return
    exits = sorted({int(e) for r in records for e in r["loss"]})
    final = max(exits)
    labelled = {max(1, final // 8), max(1, final // 4), max(1, final // 2), final}  # as in the progress bar
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("viridis")
    for i, e in enumerate(exits):
        pts = [(r["step"], r["loss"][str(e)]) for r in records if str(e) in r["loss"]]
        ax.plot(*zip(*pts), color=cmap(i / max(1, len(exits) - 1)), lw=2.2 if e == final else 0.9,
                label=f"exit {e}" if len(exits) <= 8 or e in labelled else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title("training loss per exit layer")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ---- command line --------------------------------------------------------------------------
_CLI_FIELDS = {  # flag -> TrainConfig field
    "layers": "layers", "hidden": "hidden", "heads": "heads", "kv_heads": "kv_heads",
    "intermediate": "intermediate", "vocab_size": "vocab_size", "seq_len": "seq_len",
    "batch_size": "batch_size", "steps": "steps", "lr": "lr", "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip", "seed": "seed",
    "exit_weight": "exit_weight", "exit_shape": "exit_shape", "exit_ramp_fraction": "exit_ramp_fraction",
    "exit_distill": "exit_distill", "exit_token_fraction": "exit_token_fraction",
    "exit_rotation": "exit_rotation", "layer_dropout": "layer_dropout",
    "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints", "log_every": "log_every",
    "threads": "threads", "save_dtype": "save_dtype", "max_positions": "max_positions",
    "pattern": "data_pattern",
}


def add_train_arguments(parser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--data", required=True, help='directory of files, a .jsonl file, or "stdlib"')
    parser.add_argument("--out", required=True, help="output directory")
    for flag, name in _CLI_FIELDS.items():
        default = getattr(defaults, name)
        parser.add_argument(f"--{flag.replace('_', '-')}", type=type(default), default=None,
                            help=f"default {default}")
    parser.add_argument("--exit-layers", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=None,
                        help="comma-separated early exits to supervise (default: every layer)")
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 (no bf16 autocast)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this many minutes")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> TrainConfig:
    out = Path(args.out)
    if args.resume and (out / TRAIN_CONFIG_FILE).is_file():
        return TrainConfig.from_json((out / TRAIN_CONFIG_FILE).read_text())  # the run's own config
    overrides = {name: getattr(args, flag) for flag, name in _CLI_FIELDS.items() if getattr(args, flag) is not None}
    if args.exit_layers is not None:
        overrides["exit_layers"] = args.exit_layers
    if args.no_bf16:
        overrides["bf16"] = False
    return TrainConfig(**overrides)


def train_main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="hispec train", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    result = train(cfg, args.data, args.out, resume=args.resume, max_minutes=args.max_minutes,
                   progress=not args.no_progress)
    print(json.dumps({"out": str(result.out_dir), "steps": result.steps_done, "first_loss": result.first_loss,
                      "last_loss": result.last_loss, "tokens_per_s": round(result.tokens_per_s),
                      "stopped_early": result.stopped_early}))
    return 0


main = train_main  # the `hispec train` entry (hispec.cli calls <module>.main)
