"""The HiSpec engine: one batched decoding loop for every hierarchy depth (AR, LayerSkip, HiSpec, deeper).

Each `step()`:
  1. admits waiting requests into free KV slots and prefills them (all layers; the target's
     distribution gives their first token);
  2. asks every running sequence for its next action (`SequenceState.next_action`): draft one
     token (level 0), or verify at level k the tokens level k-1 holds beyond level k's;
  3. sweeps the levels bottom-up. Level j runs its layers [e_{j-1}, e_j) once, as one ragged
     batch, on every sequence that needs them this step: drafters (level 0), sequences being
     verified at level j (their waiting tokens), and "catch-up" feeds of one token for
     sequences verified higher up (the last token of a chain was never run: its
     distribution was not needed until now). Level j's input is level j-1's output kept in a
     ring buffer at exit e_{j-1}: layers below are never re-run;
  4. decides: drafters sample a proposal; verifiers accept a prefix plus one recovered/bonus
     token (rejection sampling, or argmax matching when greedy), roll the KV lengths of all
     layers up to their exit back to the surviving chain, and truncate the lower chains;
     the target's verdict commits tokens and applies stop conditions.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hispec.model.model import EarlyExitModel
from hispec.speculation.hierarchy import BatchPolicy, Hierarchy
from hispec.speculation.rejection import RejectionSampler, Verdict, verify_greedy
from hispec.speculation.request import GenerationResult, Request, StepOutput, cut_at_stop
from hispec.speculation.sampling import SAMPLE, keyed_uniform, processed_probs, sample_from
from hispec.speculation.state import SequenceState, align_actions
from hispec.speculation.stats import RequestStats


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16  # sequences decoded together (KV cache slots)
    max_context: int | None = None  # tokens per sequence (prompt + new); default: the model's limit
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step (at least one request)
    # Verify in step with the batch: a greedy sequence with proposals waiting at a level someone
    # else verifies this step verifies them too (see align_actions). Output is the same either way.
    align_verification: bool = True
    # Proposals below the target (drafts, intermediate verifications) of greedy sequences come
    # from the exit head over tokens [0, draft_vocab) only (see EarlyExitModel.exit_logits):
    # lossless, since only the target's distribution decides; cheaper when the full head does
    # not fit the cache. None: the full head everywhere. Sampled sequences always use the full head.
    draft_vocab: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be >= 2")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ValueError("draft_vocab must be >= 1 (or None: the full head)")


class ForwardShape(NamedTuple):
    layers: int  # layers run
    batch: int  # sequences in the forward
    tokens: int  # tokens per sequence, padded (the widest sequence's)
    head_rows: int  # exit-head rows computed after it (0: catch-up only)
    prefill: bool = False  # prompt processing (keys start at position 0)
    head_vocab: int = 0  # tokens the exit head scored: 0 = the whole vocabulary (EngineConfig.draft_vocab)


@dataclass
class Feed:
    """Tokens [start, start + count) of one sequence run through one level's layers."""

    seq: SequenceState
    start: int
    count: int
    wants_logits: bool  # False for catch-up feeds: only their hidden state is needed


@dataclass
class Lane:
    """Buffers of one hierarchy. A request decodes in the lane of the hierarchy it was admitted
    with; lanes share the model and the KV cache (per layer, per slot: hierarchy-agnostic)."""

    hierarchy: Hierarchy
    # Hidden states at exit e_j of tokens level j ran that level j+1 has not: [slots, W + 1, d],
    # indexed by position % W; column W takes the padding of ragged batches.
    hidden_rings: list[torch.Tensor]
    # Level j's processed distribution at each of its unverified positions [slots, W, V]
    # (fp32; allocated on the lane's first sampled request).
    prob_rings: list[torch.Tensor] | None
    total_stats: RequestStats


@dataclass
class LevelLogits:
    """The exit head's output for one level's feeds that asked for it."""

    rows: dict[int, int]  # slot -> first row in `argmax` / `logits`
    logits: torch.Tensor  # [N, V]
    argmax: list[int]  # [N] (host sync)
    probs: dict[int, torch.Tensor]  # slot -> processed probabilities [count, V] (sampled requests only)


class SpecEngine:
    def __init__(
        self,
        model: EarlyExitModel,
        hierarchy: Hierarchy | BatchPolicy,
        config: EngineConfig = EngineConfig(),
        *,
        detokenize: Callable[[Sequence[int]], str] | None = None,
        verifier: RejectionSampler | None = None,
    ) -> None:
        L = model.config.num_layers
        if model.layer_range != (0, L) or model.embed_tokens is None or model.lm_head is None:
            raise ValueError("the engine needs the whole model (all layers, embeddings and head)")
        self.policy = hierarchy if isinstance(hierarchy, BatchPolicy) else BatchPolicy.fixed(hierarchy)
        if self.policy.choose(1).num_layers != L:
            raise ValueError(f"hierarchy is for {self.policy.choose(1).num_layers} layers, the model has {L}")
        self.model, self.config = model, config
        vocab = model.config.vocab_size
        self.draft_vocab = config.draft_vocab if config.draft_vocab is not None and config.draft_vocab < vocab else None
        self.device = model.device  # read per forward; the property walks the module tree
        self.hierarchy = self.policy.choose(1)  # what a lone request gets
        self.detokenize = detokenize
        self.verifier = verifier or RejectionSampler()
        self.capacity = min(config.max_context or model.config.max_position_embeddings,
                            model.config.max_position_embeddings)
        self.cache = model.new_cache(num_slots=config.max_batch_size, capacity=self.capacity)
        slots, d = config.max_batch_size, model.config.hidden_size
        self.lanes = {
            h: Lane(h, [torch.zeros(slots, h.window + 1, d, dtype=model.dtype, device=model.device)
                        for _ in range(h.depth)], None, RequestStats.total(h, []))
            for h in self.policy.hierarchies
        }
        self.waiting: deque[Request] = deque()
        self.running: dict[str, SequenceState] = {}
        # Lowest slot first (a heap): the running batch stays packed into slots 0..B-1, so a
        # forward over all of it reads its KV rows as one view instead of gathering them.
        self.free_slots = list(range(slots))
        self._callbacks: dict[str, Callable[[list[int]], None]] = {}
        # Every forward run, by shape -> count. The cost model (hispec.bench.costmodel) prices this
        # log with per-shape costs.
        self.forward_log: Counter[ForwardShape] = Counter()

    @property
    def hidden_rings(self) -> list[torch.Tensor]:
        return self.lanes[self.hierarchy].hidden_rings

    @property
    def total_stats(self) -> RequestStats:
        """Aggregate statistics of finished requests decoded with `self.hierarchy`."""
        return self.lanes[self.hierarchy].total_stats

    def stats_by_hierarchy(self) -> dict[str, dict]:
        return {h.describe(): lane.total_stats.to_dict(h) for h, lane in self.lanes.items() if lane.total_stats.requests}

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request: Request) -> str:
        """Queue a request; it joins the running batch at the next step with a free slot."""
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt_ids: token ids must be in [0, {vocab})")
        if request.max_new_tokens > 0 and len(request.prompt_ids) >= self.capacity:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens leaves no room in the "
                             f"{self.capacity}-token context")
        if request.stop_strings and self.detokenize is None:
            raise ValueError("stop strings need an engine built with a detokenize function")
        if request.request_id in self.running or any(r.request_id == request.request_id for r in self.waiting):
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.waiting.append(request)
        return request.request_id

    def abort(self, request_id: str) -> GenerationResult | None:
        """Drop a waiting or running request; its slot is freed at once."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return GenerationResult(request_id, request.prompt_ids, [], "abort", RequestStats.empty(self.hierarchy))
        seq = self.running.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        return self._finish(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def generate(self, requests: Iterable[Request]) -> list[GenerationResult]:
        """Run requests to completion (batched); results in the order given."""
        order = [self.add_request(r) for r in requests]
        results: dict[str, GenerationResult] = {}
        with torch.inference_mode():
            while len(results) < len(order):
                for out in self.step():
                    if out.result is not None:
                        results[out.request_id] = out.result
        return [results[i] for i in order]

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One engine step (see the module docstring); in inference mode (entered here unless the
        caller already is: `generate` enters it once, not per step)."""
        if torch.is_inference_mode_enabled():
            return self._step()
        with torch.inference_mode():
            return self._step()

    def _step(self) -> list[StepOutput]:
        active = list(self.running.values())  # admitted this step: prefill only
        outputs = self._admit_and_prefill()
        for lane in self.lanes.values():
            members = [seq for seq in active if seq.hierarchy == lane.hierarchy]
            if not members:
                continue
            actions = {seq.slot: seq.next_action() for seq in members}
            if self.config.align_verification:
                align_actions(members, actions)
            level_logits = self._sweep(lane, self._plan_feeds(lane.hierarchy, members, actions))
            for seq in members:
                level = actions[seq.slot]
                if level == 0:
                    self._draft(seq, level_logits[0], lane)
                else:
                    self._verify(seq, level, level_logits[level], lane)
                if seq.accepted[-1] > seq.committed_before_step:
                    outputs.append(self._commit(seq))
        for out in outputs:  # side effects last, outside the model's path
            callback = self._callbacks.pop(out.request_id, None) if out.finished else self._callbacks.get(out.request_id)
            if callback is not None and out.new_token_ids:
                callback(out.new_token_ids)
        return outputs

    def _plan_feeds(self, hierarchy: Hierarchy, active: list[SequenceState], actions: dict[int, int]) -> list[list[Feed]]:
        """Per level, what each sequence runs through that level's layers this step."""
        feeds: list[list[Feed]] = [[] for _ in range(hierarchy.depth + 1)]
        for seq in sorted(active, key=lambda s: s.slot):  # slot order: contiguous slots read as views
            seq.committed_before_step = seq.committed
            k = actions[seq.slot]
            if k == 0:
                feeds[0].append(Feed(seq, seq.accepted[0] - 1, 1, True))
                continue
            bonus = not seq.closed(k - 1)  # a bonus token needs the distribution after the last token
            end = seq.accepted[k - 1] if bonus else seq.accepted[k - 1] - 1
            if bonus:
                for j in range(k):
                    feeds[j].append(Feed(seq, end - 1, 1, False))
            feeds[k].append(Feed(seq, seq.fed[k], end - seq.fed[k], True))
        return feeds

    def _sweep(self, lane: Lane, feeds: list[list[Feed]]) -> list[LevelLogits | None]:
        """Run the levels bottom-up. Consecutive levels fed the very same one-token catch-ups
        (always so at batch size 1) run as one forward over their joint layers."""
        out: list[LevelLogits | None] = [None] * len(feeds)
        first = 0
        while first < len(feeds):
            last = first
            while last + 1 < len(feeds) and _same_catch_ups(feeds[first], feeds[last + 1]):
                last += 1
            if feeds[first]:
                out[last] = self._run_levels(lane, first, last, feeds[first])
            first = last + 1
        return out

    def _run_levels(self, lane: Lane, first: int, last: int, feeds: list[Feed]) -> LevelLogits | None:
        """One ragged forward of levels first..last's layers over `feeds`; exit head on the rows asked for."""
        model, hierarchy = self.model, lane.hierarchy
        W, K = hierarchy.window, hierarchy.depth
        lo, hi = hierarchy.bounds[first], hierarchy.bounds[last + 1]
        counts = [f.count for f in feeds]
        step = model.plan(self.cache, [f.seq.slot for f in feeds], counts, layer=lo)
        T = max(counts)  # step.width
        # (forward_layers checks that the cache holds what the step starts from)
        ring_columns = _ring_columns(feeds, T, W, self.device)  # [B, T] index, or a slice for one sequence
        if first == 0:
            hidden = model.embed_ids([f.seq.tokens[f.start : f.start + f.count] + [0] * (T - f.count) for f in feeds])
        else:
            hidden = _ring_read(lane.hidden_rings[first - 1], step, ring_columns)  # [B, T, d]
        # One sequence's block of the next ring is a contiguous view: the layers write into it.
        into_ring = last < K and isinstance(ring_columns, slice)
        out = _ring_read(lane.hidden_rings[last], step, ring_columns) if into_ring else None
        hidden = model.forward_layers(hidden, step, self.cache, lo, hi, out)  # [B, T, d]
        if last < K and not into_ring:
            _ring_write(lane.hidden_rings[last], step, ring_columns, hidden)
        for f in feeds:
            for level in range(first, last + 1):
                f.seq.fed[level] += f.count
            f.seq.stats.layer_forwards += hi - lo
            f.seq.stats.layer_token_passes += (hi - lo) * f.count
            if last == K:
                f.seq.stats.target_passes += 1

        wanted = [(b, f) for b, f in enumerate(feeds) if f.wants_logits]
        sampled = [f for _, f in wanted if not f.seq.sampling.greedy]
        limit = self.draft_vocab if last < K and not sampled else None  # below the target, greedy only
        head_rows = sum(f.count for _, f in wanted)
        self.forward_log[ForwardShape(hi - lo, len(feeds), T, head_rows, head_vocab=limit or 0)] += 1
        if not wanted:
            return None
        if len(feeds) == 1:
            rows_hidden = hidden  # [1, T, d]: one sequence, no padding
        else:
            flat = [b * T + t for b, f in wanted for t in range(f.count)]
            rows_hidden = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(flat, device=self.device)]
        logits, argmax = model.exit_head(rows_hidden, limit)  # [N, V], or [N, draft_vocab]: ids are column indices
        rows, probs, row = {}, {}, 0
        for _, f in wanted:
            rows[f.seq.slot] = row
            row += f.count
        if sampled:
            index = torch.tensor([rows[f.seq.slot] + t for f in sampled for t in range(f.count)], device=self.device)
            params = [f.seq.sampling for f in sampled for _ in range(f.count)]
            all_probs = processed_probs(logits[index], params).split([f.count for f in sampled])
            probs = {f.seq.slot: p for f, p in zip(sampled, all_probs)}
        return LevelLogits(rows, logits, argmax, probs)

    # ---- decisions -----------------------------------------------------------------------
    def _draft(self, seq: SequenceState, out: LevelLogits, lane: Lane) -> None:
        """Level 0 proposes the token after its chain (for K = 0 this is the output)."""
        position = seq.accepted[0]
        if seq.sampling.greedy:
            token = out.argmax[out.rows[seq.slot]]
        else:
            q = out.probs[seq.slot][0]
            token = sample_from(q, keyed_uniform(seq.sampling.seed, 0, position, seq.attempts[0], SAMPLE))
            if lane.hierarchy.depth:
                lane.prob_rings[0][seq.slot, position % lane.hierarchy.window] = q
        seq.attempts[0] += 1
        seq.stats.levels[0].proposed += 1
        seq.stats.levels[0].rounds += 1
        seq.tokens.append(token)
        seq.accepted[0] += 1

    def _verify(self, seq: SequenceState, k: int, out: LevelLogits, lane: Lane) -> None:
        """Level k checks the tokens level k-1 holds beyond its own chain."""
        W, start = lane.hierarchy.window, seq.accepted[k]
        proposals = seq.tokens[start : seq.accepted[k - 1]]
        first_row = out.rows[seq.slot]
        n_rows = seq.fed[k] - (start - 1)  # this level's distributions at positions start, start + 1, ...
        if seq.sampling.greedy:
            verdict = verify_greedy(proposals, out.argmax[first_row : first_row + n_rows])
        else:
            p = out.probs[seq.slot]
            columns = [(start + i) % W for i in range(len(proposals))]
            q = lane.prob_rings[k - 1][seq.slot, columns]  # [n, V]
            seed, attempt = seq.sampling.seed, seq.attempts[k]
            verdict = self.verifier.verify(
                proposals, p, q, lambda i, purpose: keyed_uniform(seed, k, start + i, attempt, purpose)
            )
        seq.attempts[k] += 1
        level_stats = seq.stats.levels[k]
        level_stats.proposed += len(proposals)
        level_stats.accepted += verdict.accepted
        level_stats.rounds += 1
        self._apply_verdict(seq, k, verdict)
        if not seq.sampling.greedy and k < lane.hierarchy.depth:
            kept = seq.accepted[k] - start  # this level's rows at the kept positions are the next level's q
            lane.prob_rings[k][seq.slot, [(start + i) % W for i in range(kept)]] = out.probs[seq.slot][:kept]

    def _apply_verdict(self, seq: SequenceState, k: int, verdict: Verdict) -> None:
        """Level k's chain becomes its accepted prefix + the recovered/bonus token; every level
        at or below k continues from it: their KV lengths roll back to the new chain minus its
        last token (not yet run through any layer)."""
        start = seq.accepted[k]
        kept = start + verdict.accepted
        del seq.tokens[kept:]
        if verdict.next_token is not None:
            seq.tokens.append(verdict.next_token)
        new_len = len(seq.tokens)
        for j in range(k + 1):
            seq.accepted[j] = new_len
            seq.fed[j] = new_len - 1
        self.cache.rollback((0, seq.hierarchy.bounds[k + 1]), [seq.slot], [new_len - 1])

    def _commit(self, seq: SequenceState) -> StepOutput:
        """Apply stop conditions to tokens the target just committed; finish if one holds."""
        before = seq.committed_before_step
        generated = seq.generated()
        if seq.request.stop_strings:
            seq_stop = self._find_stop_string(seq, generated, before - seq.prompt_len)
            if seq_stop is not None:
                count, seq.stop_string = seq_stop
                del seq.tokens[seq.prompt_len + count :]
                for j in range(len(seq.accepted)):
                    seq.accepted[j] = min(seq.accepted[j], len(seq.tokens))
                seq.finish_reason = "stop"
        new = seq.tokens[before : seq.committed]
        seq.stats.new_tokens = seq.committed - seq.prompt_len
        if seq.finish_reason is None:
            if seq.tokens[seq.committed - 1] in seq.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.stats.new_tokens >= seq.request.max_new_tokens:
                seq.finish_reason = "length"
            elif seq.committed >= seq.limit:
                seq.finish_reason = "context"
        if seq.finish_reason is not None:
            return StepOutput(seq.request.request_id, new, self._finish(seq))
        return StepOutput(seq.request.request_id, new)

    def _find_stop_string(self, seq: SequenceState, generated: list[int], seen: int) -> tuple[int, str] | None:
        """(tokens to keep, stop string) for the first stop string completed after `seen` tokens."""
        if cut_at_stop(self.detokenize(generated), seq.request.stop_strings)[1] is None:
            return None
        for count in range(max(seen, 1), len(generated) + 1):  # the fewest tokens that show it
            _, stop = cut_at_stop(self.detokenize(generated[:count]), seq.request.stop_strings)
            if stop is not None:
                return count, stop
        return None

    def _finish(self, seq: SequenceState) -> GenerationResult:
        del self.running[seq.request.request_id]
        self.cache.release([seq.slot])
        heapq.heappush(self.free_slots, seq.slot)
        seq.stats.new_tokens = seq.committed - seq.prompt_len
        lane = self.lanes[seq.hierarchy]
        lane.total_stats = RequestStats.total(seq.hierarchy, [lane.total_stats, seq.stats])
        return GenerationResult(seq.request.request_id, seq.request.prompt_ids, seq.generated(),
                                seq.finish_reason, seq.stats, seq.stop_string, seq.hierarchy)

    # ---- admission -------------------------------------------------------------------------
    def _admit_and_prefill(self) -> list[StepOutput]:
        outputs, admitted, budget = [], [], self.config.max_prefill_tokens
        while self.waiting and self.free_slots:
            request = self.waiting[0]
            if admitted and len(request.prompt_ids) > budget:
                break
            self.waiting.popleft()
            if request.max_new_tokens == 0:
                outputs.append(StepOutput(request.request_id, [], GenerationResult(
                    request.request_id, request.prompt_ids, [], "length", RequestStats.empty(self.hierarchy))))
                continue
            budget -= len(request.prompt_ids)
            admitted.append(self._new_sequence(request))
        if admitted:
            outputs += self._prefill(admitted)
        return outputs

    def _new_sequence(self, request: Request) -> SequenceState:
        hierarchy = self.policy.choose(len(self.running) + 1)  # by the batch size it joins
        lane, K, P = self.lanes[hierarchy], hierarchy.depth, len(request.prompt_ids)
        sampling = request.sampling.with_seed()
        if not sampling.greedy and lane.prob_rings is None and K:
            shape = (self.config.max_batch_size, hierarchy.window, self.model.config.vocab_size)
            lane.prob_rings = [torch.zeros(shape, device=self.device) for _ in range(K)]
        stop_ids = self.model.config.eos_token_ids if request.stop_token_ids is None else request.stop_token_ids
        seq = SequenceState(
            request=request, hierarchy=hierarchy, sampling=sampling, slot=heapq.heappop(self.free_slots),
            stop_token_ids=frozenset(stop_ids),
            limit=min(P + request.max_new_tokens, self.capacity + 1),
            tokens=list(request.prompt_ids), accepted=[P] * (K + 1), fed=[0] * (K + 1),
            attempts=[0] * (K + 1), stats=RequestStats.empty(hierarchy),
        )
        self.running[request.request_id] = seq
        if request.on_tokens is not None:
            self._callbacks[request.request_id] = request.on_tokens
        return seq

    def _prefill(self, admitted: list[SequenceState]) -> list[StepOutput]:
        """Run whole prompts through every layer; the target's distribution after the prompt
        gives the first token, committed at once."""
        model, L = self.model, self.model.config.num_layers
        lengths = [s.prompt_len for s in admitted]
        step = model.plan(self.cache, [s.slot for s in admitted], lengths, layer=0)
        T = step.width
        ids = torch.tensor([list(s.request.prompt_ids) + [0] * (T - n) for s, n in zip(admitted, lengths)],
                           device=self.device)
        hidden = model.forward_layers(model.embed(ids), step, self.cache, 0, L)  # [B, T, d]
        last = hidden[torch.arange(len(admitted), device=self.device), step.last_token_index()]  # [B, d]
        logits, argmax = model.exit_head(last)  # [B, V]
        self.forward_log[ForwardShape(L, len(admitted), T, len(admitted), prefill=True)] += 1
        outputs = []
        for b, seq in enumerate(admitted):
            P, K = seq.prompt_len, seq.hierarchy.depth
            if seq.sampling.greedy:
                token = argmax[b]
            else:
                p = processed_probs(logits[b : b + 1], [seq.sampling])[0]
                token = sample_from(p, keyed_uniform(seq.sampling.seed, K, P, seq.attempts[K], SAMPLE))
            seq.attempts[K] += 1
            seq.stats.target_passes += 1
            seq.stats.layer_forwards += L
            seq.stats.layer_token_passes += L  # the prompt's last position; the rest is prompt processing
            seq.fed = [P] * (K + 1)
            seq.tokens.append(token)
            seq.accepted = [P + 1] * (K + 1)
            seq.committed_before_step = P
            outputs.append(self._commit(seq))
        return outputs


def _same_catch_ups(a: list[Feed], b: list[Feed]) -> bool:
    """Whether two levels' feeds are the same one-token catch-ups of the same sequences."""
    return bool(a) and len(a) == len(b) and all(
        x.seq is y.seq and x.start == y.start and x.count == y.count == 1 and not x.wants_logits and not y.wants_logits
        for x, y in zip(a, b)
    )


def _ring_columns(feeds: list[Feed], T: int, W: int, device) -> slice | torch.Tensor:
    """Ring-buffer columns of each feed's tokens [B, T] (padding -> scratch column W); a plain
    slice when one sequence's tokens do not wrap around the ring (the common case at batch 1)."""
    if len(feeds) == 1 and feeds[0].start % W + T <= W:
        first = feeds[0].start % W
        return slice(first, first + T)
    return torch.tensor([[(f.start + t) % W if t < f.count else W for t in range(T)] for f in feeds], device=device)


def _ring_read(ring: torch.Tensor, step, columns: slice | torch.Tensor) -> torch.Tensor:
    if isinstance(columns, slice):
        return ring[step.slots[0] : step.slots[0] + 1, columns]  # a view
    return ring[step.slot_index, columns]


def _ring_write(ring: torch.Tensor, step, columns: slice | torch.Tensor, hidden: torch.Tensor) -> None:
    if isinstance(columns, slice):
        ring[step.slots[0] : step.slots[0] + 1, columns] = hidden
    else:
        ring[step.slot_index, columns] = hidden
