"""The scheduler: pure policy over token counts. It owns the sequences (waiting, running, slots),
says what every forward of a step runs, and applies the verdicts that come back.

No model, no tensors, no Ray: it is tested without a model (tests/unit/test_scheduler.py).

A step, as the scheduler sees it:
  1. `schedule()` prefills: the next chunk of each prompt being prefilled, then of waiting requests
     it admits into free slots, at most `prefill_chunk_tokens` prompt tokens in all (one forward
     over all layers; a sequence makes its first decision with its prompt's last chunk). It asks
     every running sequence for its next action (draft at level 0, or verify at level k the
     tokens level k-1 holds beyond level k's) and turns the actions into forwards, bottom-up:
     level j runs layers [e_{j-1}, e_j) once, as one ragged batch, for drafters (level 0),
     sequences verified at level j (their waiting tokens) and one-token "catch-up" feeds of
     sequences verified higher up (the last token of a chain was never run through the levels
     below). Consecutive levels fed the very same catch-ups run as one forward over their joint
     layers. Level j's input is level j-1's output, kept in a ring at exit e_{j-1}: layers below
     are never re-run.
  2. an executor runs the forwards; a `Decider` turns head outputs into one `Verdict` per decision;
  3. `apply(verdicts)` extends or cuts the chains, queues KV truncations for the next plan, commits
     what the target accepted and finishes sequences on stop token, stop string, length or context.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from hispec.config import EngineConfig
from hispec.errors import InvalidRequest
from hispec.engine.plan import AheadOutput, Feed, Forward, RingKey, SpeculateAhead, StepPlan, Truncate
from hispec.speculation.hierarchy import BatchPolicy, Hierarchy
from hispec.speculation.rejection import Verdict
from hispec.speculation.request import GenerationResult, Request, StepOutput
from hispec.speculation.state import SequenceState, align_actions
from hispec.speculation.stops import StopFinder
from hispec.speculation.stats import RequestStats


class ForwardShape(NamedTuple):
    """A forward by shape: the cost model (hispec.bench.costmodel) prices the log of these."""

    layers: int  # layers run
    batch: int  # sequences in the forward
    tokens: int  # tokens per sequence, padded (the widest sequence's)
    head_rows: int  # exit-head rows computed after it (0: catch-up only)
    prefill: bool = False  # prompt processing (keys start at position 0)
    head_vocab: int = 0  # tokens the exit head scored: 0 = the whole vocabulary (EngineConfig.draft_vocab)


@dataclass(frozen=True, slots=True)
class Decision:
    """A choice the step's head outputs decide for one sequence: its first token (prefill), a
    draft (level 0) or a verification at `level`; read from forward `forward`'s output."""

    seq: SequenceState
    level: int
    forward: int
    prefill: bool = False
    ahead: bool = False  # the result at index `forward` is the sequence's AheadOutput (speculation ahead)


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    plan: StepPlan
    decisions: tuple[Decision, ...]


@dataclass(frozen=True, slots=True)
class _PrefillChunk:
    """Prompt tokens [start, start + count) of a sequence being prefilled, run this step."""

    seq: SequenceState
    start: int
    count: int

    @property
    def last(self) -> bool:
        return self.start + self.count == self.seq.prompt_len


@dataclass
class _PlannedFeed:
    seq: SequenceState
    start: int
    count: int
    wants_logits: bool  # False for catch-up feeds: only their KV and hidden states are needed


@dataclass
class _Lane:
    """Statistics of the requests decoded with one hierarchy (a BatchPolicy may use several)."""

    hierarchy: Hierarchy
    total_stats: RequestStats = field(init=False)

    def __post_init__(self) -> None:
        self.total_stats = RequestStats.total(self.hierarchy, [])


class Scheduler:
    def __init__(
        self,
        policy: BatchPolicy,
        config: EngineConfig,
        *,
        vocab_size: int,
        capacity: int,
        num_slots: int | None = None,
        eos_token_ids: Sequence[int] = (),
        detokenize: Callable[[Sequence[int]], str] | None = None,
        attention_break_even: float | None = None,
        ahead_layers: int = 0,
    ) -> None:
        """`capacity`: tokens per sequence (prompt + new); `num_slots`: sequences the KV cache
        holds (the KV layout's; default config.max_batch_size); `attention_break_even`: the keys
        after which a prompt token's attention costs as much as the rest of its forward (see
        `attention_break_even()`; None: prompt tokens cost the same wherever they sit);
        `ahead_layers`: speculation ahead runs for hierarchies whose levels below the target lie
        in layers [0, ahead_layers) (the executor's first stage; 0: never)."""
        self.attention_break_even = attention_break_even
        self.ahead_layers = ahead_layers
        self.aheads_kept = 0  # speculations ahead that became the next window
        self.aheads_dropped = 0  # ... that the target's verdict made stale (never applied)
        self.policy, self.config = policy, config
        self.vocab_size, self.capacity = vocab_size, capacity
        self.eos_token_ids = tuple(eos_token_ids)
        self.detokenize = detokenize
        self.draft_vocab = config.draft_vocab if config.draft_vocab is not None and config.draft_vocab < vocab_size else None
        self.lanes = {h: _Lane(h) for h in policy.hierarchies}
        self.waiting: deque[Request] = deque()
        self.running: dict[str, SequenceState] = {}  # every sequence holding a slot, prefilling ones too
        # Sequences whose prompt is not all in the KV yet, in admission order: they take part in
        # prefill forwards only, and their fed[k] (equal at every level) is the prompt tokens run so far.
        self.prefilling: dict[str, SequenceState] = {}
        # Lowest slot first (a heap): the running batch stays packed into slots 0..B-1, so a forward
        # over all of it reads its KV rows as one view instead of gathering them.
        self.num_slots = config.max_batch_size if num_slots is None else num_slots
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        self.free_slots = list(range(self.num_slots))
        self._truncations: list[Truncate] = []  # verdicts' KV rollbacks, sent with the next plan
        self._releases: list[int] = []  # finished sequences' slots, likewise
        self.forward_log: Counter[ForwardShape] = Counter()  # every forward planned, by shape
        self._finished_at_once: list[StepOutput] = []  # admitted with max_new_tokens 0: reported by apply

    @property
    def num_layers(self) -> int:
        return self.policy.choose(1).num_layers

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request: Request) -> str:
        """Queue a request; it joins the running batch at the next step with a free slot. A request
        the engine cannot run raises InvalidRequest (the client's fault, naming the field): its
        prompt and max_new_tokens must fit a sequence's `capacity` tokens."""
        if any(not 0 <= t < self.vocab_size for t in request.prompt_ids):
            raise InvalidRequest("prompt", f"token ids must be in [0, {self.vocab_size})")
        P, new = len(request.prompt_ids), request.max_new_tokens
        if new > 0 and P >= self.capacity:  # (max_new_tokens 0: nothing to run, finished at once)
            raise InvalidRequest("prompt", f"a prompt of {P} tokens leaves no room in the {self.capacity}-token "
                                 "context (prompt + new tokens)")
        if new > 0 and P + new > self.capacity:
            raise InvalidRequest("max_new_tokens", f"{new} new tokens after a prompt of {P} exceed the "
                                 f"{self.capacity}-token context (prompt + new tokens): at most {self.capacity - P}")
        if request.stop_strings and self.detokenize is None:
            raise InvalidRequest("stop", "stop strings need an engine built with a detokenize function")
        if request.request_id in self.running or any(r.request_id == request.request_id for r in self.waiting):
            raise InvalidRequest("request_id", f"request id {request.request_id!r} is already in use")
        self.waiting.append(request)
        return request.request_id

    def abort(self, request_id: str) -> GenerationResult | None:
        """Drop a waiting or running request; its slot is free at once (its KV released with the next plan)."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return GenerationResult(request_id, request.prompt_ids, [], "abort",
                                        RequestStats.empty(self.policy.choose(1)))
        seq = self.running.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        return self._finish(seq)

    def abort_all(self, reason: str = "abort") -> list[GenerationResult]:
        """End every waiting and running request (e.g. the executor failed)."""
        results = [self.abort(r.request_id) for r in list(self.waiting)]
        for seq in list(self.running.values()):
            seq.finish_reason = reason
            results.append(self._finish(seq))
        return results

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def take_cache_ops(self) -> StepPlan:
        """A plan of the pending truncations and releases only (to leave the executors in sync when idle)."""
        plan = StepPlan(tuple(self._truncations), tuple(self._releases))
        self._truncations, self._releases = [], []
        return plan

    # ---- planning ------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """The next step: the prompt chunks of sequences being prefilled (and of requests admitted
        now), then one action per running sequence whose prompt is in. Token counts (`fed`,
        statistics) advance here, as the forwards will run them."""
        active = [seq for rid, seq in self.running.items() if rid not in self.prefilling]
        forwards: list[Forward] = []
        decisions: list[Decision] = []
        aheads: list[tuple[SpeculateAhead, SequenceState]] = []
        chunks, finished_at_once = self._prefill_chunks()
        if chunks:
            forwards.append(self._prefill_forward(chunks))
            decisions += [Decision(c.seq, c.seq.hierarchy.depth, 0, prefill=True) for c in chunks if c.last]
        for lane in self.lanes.values():
            members = [seq for seq in active if seq.hierarchy == lane.hierarchy]
            ahead = [seq for seq in members if self._can_speculate_ahead(seq)]
            if ahead:
                decisions += self._plan_ahead(lane.hierarchy, ahead, forwards, aheads)
                members = [seq for seq in members if seq not in ahead]
            if not members:
                continue
            actions = {seq.slot: seq.next_action() for seq in members}
            if self.config.align_verification:
                align_actions(members, actions)
            level_forward = {}
            for level_range, feeds in self._group_levels(lane.hierarchy, self._plan_feeds(lane.hierarchy, members, actions)):
                level_forward[level_range[1]] = len(forwards)
                forwards.append(self._forward(lane.hierarchy, *level_range, feeds))
            decisions += [Decision(seq, actions[seq.slot], level_forward[actions[seq.slot]]) for seq in members]
        decisions += [Decision(seq, 0, len(forwards) + j, ahead=True) for j, (_, seq) in enumerate(aheads)]
        cache_ops = self.take_cache_ops()
        self._finished_at_once = finished_at_once
        return ScheduledStep(StepPlan(cache_ops.truncations, cache_ops.releases, tuple(forwards),
                                      tuple(op for op, _ in aheads)), tuple(decisions))

    # ---- speculation ahead (greedy, on the first stage; see hispec.engine.ahead) ----------------
    def _can_speculate_ahead(self, seq: SequenceState) -> bool:
        """A greedy HiSpec / LayerSkip sequence whose levels below the target agree (all hold the
        same chain, its last token not yet run) and whose chain can grow, with its levels below the
        target on the first stage."""
        h = seq.hierarchy
        K = h.depth
        if not (K in (1, 2) and h.bounds[K] <= self.ahead_layers and seq.sampling.greedy):
            return False
        end = seq.accepted[0]
        return (all(seq.accepted[j] == end and seq.fed[j] == end - 1 for j in range(K))
                and seq.fed[K] == seq.accepted[K] - 1 and not seq.closed(K - 1))

    def _plan_ahead(self, hierarchy: Hierarchy, members: list[SequenceState], forwards: list[Forward],
                    aheads: list[tuple[SpeculateAhead, SequenceState]]) -> list[Decision]:
        """One step per window: the chain's last token through level 0 and, for sequences with a
        window ready, through the levels up to the target and the window through the target; then
        the first stage speculates the next window ahead of the verdict (a SpeculateAhead per
        sequence, after every row left), starting with the exit heads on that last token."""
        K, budget = hierarchy.depth, hierarchy.budgets[-1]
        members = sorted(members, key=lambda s: s.slot)
        ready = [seq for seq in members if seq.accepted[K - 1] - seq.accepted[K] >= budget]
        for seq in members:
            seq.committed_before_step = seq.committed
        # No head rows here: the first stage runs them after the rows for the target have left.
        forwards.append(self._forward(hierarchy, 0, 0, [_PlannedFeed(s, s.accepted[0] - 1, 1, False) for s in members]))
        if ready and K == 2:  # the window's last token through level 1, for the target
            forwards.append(self._forward(hierarchy, 1, 1, [_PlannedFeed(s, s.accepted[0] - 1, 1, False) for s in ready]))
        decisions = []
        if ready:
            decisions = [Decision(seq, K, len(forwards)) for seq in ready]
            forwards.append(self._forward(hierarchy, K, K, [_PlannedFeed(s, s.fed[K], s.accepted[K - 1] - s.fed[K], True)
                                                              for s in ready]))
        for seq in members:
            has_window = seq in ready
            base = seq.accepted[0]
            committed_after = base + 1 if has_window else seq.committed  # if the target keeps what follows
            aheads.append((SpeculateAhead(
                seq.slot, hierarchy.bounds, hierarchy.budgets, hierarchy.window, base, tuple(seq.fed[:K]),
                committed_after + budget, seq.limit, seq.stop_token_ids, self.draft_vocab,
                verifier_row=has_window and K == 2), seq))
        return decisions

    def _apply_ahead(self, seq: SequenceState, ahead: AheadOutput) -> None:
        """The levels below the target take the chain the first stage speculated."""
        K = seq.hierarchy.depth
        seq.tokens.extend(ahead.tokens)
        for j in range(K):
            seq.accepted[j] = len(seq.tokens)
            seq.fed[j] = ahead.fed[j]

    def _count_ahead(self, seq: SequenceState, ahead: AheadOutput) -> None:
        """Statistics and the forward log of what a speculation ahead ran (kept or not)."""
        for j, level in enumerate(seq.stats.levels[: len(ahead.proposed)]):
            level.proposed += ahead.proposed[j]
            level.accepted += ahead.accepted[j]
            level.rounds += ahead.rounds[j]
            seq.attempts[j] += ahead.rounds[j]
        for layers, tokens, head_rows in ahead.forwards:
            seq.stats.layer_forwards += layers
            seq.stats.layer_token_passes += layers * tokens
            self.forward_log[ForwardShape(layers, 1, tokens, head_rows, head_vocab=self.draft_vocab or 0)] += 1

    def _apply_target_and_ahead(self, seq: SequenceState, verdict: Verdict, ahead: AheadOutput) -> None:
        """The target's verdict on the window, with the next window already speculated: if it
        accepted the whole window and its bonus token is where that next window starts, the
        bonus is committed and the next window stands; otherwise the chain is cut at the verdict
        (every stage rolls back) and the speculation ahead is dropped."""
        K = seq.hierarchy.depth
        window_end = seq.accepted[K - 1]
        if verdict.accepted == window_end - seq.accepted[K] and verdict.next_token == ahead.tokens[0]:
            self._apply_ahead(seq, ahead)
            seq.accepted[K] = window_end + 1
            self.aheads_kept += 1
        else:
            self._apply_verdict(seq, K, verdict)
            self.aheads_dropped += 1

    def _plan_feeds(self, hierarchy: Hierarchy, members: list[SequenceState], actions: dict[int, int]) -> list[list[_PlannedFeed]]:
        """Per level, what each sequence runs through that level's layers this step."""
        feeds: list[list[_PlannedFeed]] = [[] for _ in range(hierarchy.depth + 1)]
        for seq in sorted(members, key=lambda s: s.slot):  # slot order: contiguous slots read as views
            seq.committed_before_step = seq.committed
            k = actions[seq.slot]
            if k == 0:
                feeds[0].append(_PlannedFeed(seq, seq.accepted[0] - 1, 1, True))
                continue
            bonus = not seq.closed(k - 1)  # a bonus token needs the distribution after the last token
            end = seq.accepted[k - 1] if bonus else seq.accepted[k - 1] - 1
            if bonus:
                for j in range(k):
                    feeds[j].append(_PlannedFeed(seq, end - 1, 1, False))
            feeds[k].append(_PlannedFeed(seq, seq.fed[k], end - seq.fed[k], True))
        return feeds

    @staticmethod
    def _group_levels(hierarchy: Hierarchy, feeds: list[list[_PlannedFeed]]):
        """(first level, last level), feeds: consecutive levels fed the very same one-token
        catch-ups (always so at batch size 1) run as one forward over their joint layers."""
        first = 0
        while first < len(feeds):
            last = first
            while last + 1 < len(feeds) and _same_catch_ups(feeds[first], feeds[last + 1]):
                last += 1
            if feeds[first]:
                yield (first, last), feeds[first]
            first = last + 1

    def _forward(self, hierarchy: Hierarchy, first: int, last: int, planned: list[_PlannedFeed]) -> Forward:
        K, W, bounds = hierarchy.depth, hierarchy.window, hierarchy.bounds
        lo, hi = bounds[first], bounds[last + 1]
        feeds = []
        for f in planned:
            seq = f.seq
            token_ids = tuple(seq.tokens[f.start : f.start + f.count]) if first == 0 else None
            feeds.append(Feed(seq.slot, f.start, f.count, f.count if f.wants_logits else 0, token_ids,
                              f.wants_logits and not seq.sampling.greedy))
            for level in range(first, last + 1):
                seq.fed[level] += f.count
            seq.stats.layer_forwards += hi - lo
            seq.stats.layer_token_passes += (hi - lo) * f.count
            if last == K:
                seq.stats.target_passes += 1
        sampled = any(f.logits for f in feeds)
        head_vocab = self.draft_vocab if last < K and not sampled else None  # below the target, greedy only
        forward = Forward(lo, hi, tuple(feeds),
                          input_ring=RingKey(lo, W) if first > 0 else None,
                          output_ring=RingKey(hi, W) if last < K else None,
                          head_vocab=head_vocab)
        self.forward_log[ForwardShape(hi - lo, len(feeds), forward.width, forward.head_row_count,
                                      head_vocab=head_vocab or 0)] += 1
        return forward

    # ---- admission and prefill ---------------------------------------------------------------
    def _prefill_chunks(self) -> tuple[list[_PrefillChunk], list[StepOutput]]:
        """This step's prompt chunks, within a budget of `prefill_chunk_tokens` tokens at the start of
        a prompt (later chunks get fewer: their tokens attend to the prompt before them, see
        `_chunk_cost`; on CPU a step's cost, and so every running stream's inter-token time, follows
        the work, not the token count):
        first the sequences already being prefilled (oldest first), then waiting requests admitted into
        free slots (first come, first served) while the budget lasts. A request with max_new_tokens 0
        takes no slot: it finishes at once."""
        budget, chunks, at_once = float(self.config.prefill_chunk_tokens), [], []
        for seq in self.prefilling.values():
            done = seq.fed[0]
            count = self._chunk_tokens(done, seq.prompt_len - done, budget, not chunks)
            if count == 0:
                break
            chunks.append(_PrefillChunk(seq, done, count))
            budget -= self._chunk_cost(done, count)
        while self.waiting and self.free_slots:
            request = self.waiting[0]
            if request.max_new_tokens == 0:
                self.waiting.popleft()
                at_once.append(StepOutput(request.request_id, [], GenerationResult(
                    request.request_id, request.prompt_ids, [], "length", RequestStats.empty(self.policy.choose(1)))))
                continue
            count = self._chunk_tokens(0, len(request.prompt_ids), budget, not chunks)
            if count == 0:
                break
            self.waiting.popleft()
            seq = self._new_sequence(request)
            self.prefilling[request.request_id] = seq
            chunks.append(_PrefillChunk(seq, 0, count))
            budget -= self._chunk_cost(0, count)
        return chunks, at_once

    def _chunk_cost(self, start: int, count: int) -> float:
        """Prompt tokens [start, start + count) in budget units: a token costs 1 plus its attention to
        the `start` keys before the chunk, relative to the attention break-even."""
        if self.attention_break_even is None:
            return float(count)
        return count * (1 + start / self.attention_break_even)

    def _chunk_tokens(self, start: int, remaining: int, budget: float, first: bool) -> int:
        """The most of `remaining` prompt tokens after `start` that `budget` pays for (at least one
        token for the step's first chunk, so a prompt always moves)."""
        count = int(max(budget, 0) / self._chunk_cost(start, 1) + 1e-9)
        return min(remaining, max(count, 1 if first else 0))

    def _new_sequence(self, request: Request) -> SequenceState:
        hierarchy = self.policy.choose(len(self.running) + 1)  # by the batch size it joins
        K, P = hierarchy.depth, len(request.prompt_ids)
        stop_ids = self.eos_token_ids if request.stop_token_ids is None else request.stop_token_ids
        seq = SequenceState(
            request=request, hierarchy=hierarchy, sampling=request.sampling.with_seed(),
            slot=heapq.heappop(self.free_slots), stop_token_ids=frozenset(stop_ids),
            limit=min(P + request.max_new_tokens, self.capacity),  # add_request refused more
            tokens=list(request.prompt_ids), accepted=[P] * (K + 1), fed=[0] * (K + 1),
            attempts=[0] * (K + 1), stats=RequestStats.empty(hierarchy),
            stop_finder=StopFinder(self.detokenize, request.stop_strings) if request.stop_strings else None,
        )
        self.running[request.request_id] = seq
        return seq

    def _prefill_forward(self, chunks: list[_PrefillChunk]) -> Forward:
        """Prompt chunks through every layer, each after the KV of the chunks before it. A prompt's
        last chunk asks for one head row: the target's distribution after the prompt gives the first
        token (committed at once), and the prompt's last position counts as a decoding pass."""
        L = self.num_layers
        feeds = []
        for c in chunks:
            seq = c.seq
            last = c.last
            feeds.append(Feed(seq.slot, c.start, c.count, 1 if last else 0,
                              tuple(seq.request.prompt_ids[c.start : c.start + c.count]), last and not seq.sampling.greedy))
            seq.fed = [c.start + c.count] * (seq.hierarchy.depth + 1)
            if last:
                del self.prefilling[seq.request.request_id]
                seq.stats.target_passes += 1
                seq.stats.layer_forwards += L
                seq.stats.layer_token_passes += L
        forward = Forward(0, L, tuple(feeds), prefill=True)
        self.forward_log[ForwardShape(L, len(feeds), forward.width, forward.head_row_count, prefill=True)] += 1
        return forward

    # ---- verdicts ----------------------------------------------------------------------------
    def apply(self, step: ScheduledStep, verdicts: Sequence[Verdict]) -> list[StepOutput]:
        """Apply one verdict per decision (in order); returns what each request committed."""
        outputs, self._finished_at_once = self._finished_at_once, []
        aheads = {id(d.seq): v for d, v in zip(step.decisions, verdicts, strict=True) if d.ahead}
        judged = set()  # sequences whose speculation ahead met the target's verdict this step
        for decision, verdict in zip(step.decisions, verdicts, strict=True):
            seq, k = decision.seq, decision.level
            if decision.ahead:
                self._count_ahead(seq, verdict)
                if id(seq) not in judged and seq.finish_reason is None:
                    self._apply_ahead(seq, verdict)  # no window was checked this step: nothing to wait for
                continue
            if decision.prefill:
                P = seq.prompt_len
                seq.attempts[k] += 1
                seq.tokens.append(verdict.next_token)
                seq.accepted = [P + 1] * (k + 1)
                seq.committed_before_step = P
            elif k == 0:
                seq.attempts[0] += 1
                seq.stats.levels[0].proposed += 1
                seq.stats.levels[0].rounds += 1
                seq.tokens.append(verdict.next_token)
                seq.accepted[0] += 1
            else:
                seq.attempts[k] += 1
                level_stats = seq.stats.levels[k]
                level_stats.proposed += seq.accepted[k - 1] - seq.accepted[k]
                level_stats.accepted += verdict.accepted
                level_stats.rounds += 1
                ahead = aheads.get(id(seq)) if k == seq.hierarchy.depth else None
                if ahead is not None:
                    judged.add(id(seq))
                    self._apply_target_and_ahead(seq, verdict, ahead)
                else:
                    self._apply_verdict(seq, k, verdict)
            if seq.accepted[-1] > seq.committed_before_step:
                outputs.append(self._commit(seq))
        return outputs

    def _apply_verdict(self, seq: SequenceState, k: int, verdict: Verdict) -> None:
        """Level k's chain becomes its accepted prefix + the recovered/bonus token; every level at
        or below k continues from it: their KV lengths roll back to the new chain minus its last
        token (not yet run through any layer)."""
        kept = seq.accepted[k] + verdict.accepted
        del seq.tokens[kept:]
        if verdict.next_token is not None:
            seq.tokens.append(verdict.next_token)
        new_len = len(seq.tokens)
        for j in range(k + 1):
            seq.accepted[j] = new_len
            seq.fed[j] = new_len - 1
        self._truncations.append(Truncate(seq.slot, seq.hierarchy.bounds[k + 1], new_len - 1))

    def _commit(self, seq: SequenceState) -> StepOutput:
        """Apply stop conditions to tokens the target just committed; finish if one holds."""
        before = seq.committed_before_step
        found = seq.find_stop_string()
        if found is not None:
            count, seq.stop_string = found
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

    def _finish(self, seq: SequenceState) -> GenerationResult:
        del self.running[seq.request.request_id]
        self.prefilling.pop(seq.request.request_id, None)  # aborted mid-prefill
        self._releases.append(seq.slot)
        heapq.heappush(self.free_slots, seq.slot)
        seq.stats.new_tokens = seq.committed - seq.prompt_len
        lane = self.lanes[seq.hierarchy]
        lane.total_stats = RequestStats.total(seq.hierarchy, [lane.total_stats, seq.stats])
        return GenerationResult(seq.request.request_id, seq.request.prompt_ids, seq.generated(),
                                seq.finish_reason, seq.stats, seq.stop_string, seq.hierarchy)

    # ---- inspection ----------------------------------------------------------------------------
    def expected_lengths(self, seq: SequenceState) -> list[int]:
        """The KV length every layer should hold for `seq` once pending truncations are applied:
        level k's layers hold fed[k] tokens."""
        h = seq.hierarchy
        return [seq.fed[k] for k in range(h.depth + 1) for _ in range(*h.layer_range(k))]


def _same_catch_ups(a: list[_PlannedFeed], b: list[_PlannedFeed]) -> bool:
    """Whether two levels' feeds are the same one-token catch-ups of the same sequences."""
    return bool(a) and len(a) == len(b) and all(
        x.seq is y.seq and x.start == y.start and x.count == y.count == 1 and not x.wants_logits and not y.wants_logits
        for x, y in zip(a, b)
    )


def attention_break_even(model_config) -> float:
    """Keys after which a prompt token's attention costs as much as the rest of its forward. Per layer
    a token's projections take 2 x (parameters of the layer) FLOPs and its attention 4 x heads x
    head_dim per key; on CPU the attention kernels run at about half the FLOP rate of the projections'
    matrix products (measured on the bundled model: the per-token cost doubles after ~815 keys, FLOPs
    alone say ~1,400), hence the extra factor 2."""
    c = model_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return 2 * per_layer / (4 * q) / 2
