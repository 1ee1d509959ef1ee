"""The scheduler alone: no model, no tensors. A scripted executor plays the model.

`ScriptedExecutor` runs plans the way a stage would, over tokens instead of tensors: each layer's
"KV" is the list of tokens it holds, each ring column remembers (position, token), and an exit
head answers the argmax `scripted_next(token, exit)`: a fixed rule at the target, a different one
on some tokens at shallower exits (so some proposals are rejected). It checks every feed against
what it holds (start = KV length, ring rows written before they are read, a truncation never
extends), which is what the real stages check too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hispec.engine.scheduler as scheduler_module
from hispec.config import EngineConfig
from hispec.engine.plan import Feed, Forward, RingKey, StepPlan, Truncate
from hispec.engine.scheduler import Decision, Scheduler, ScheduledStep
from hispec.errors import InvalidRequest
from hispec.speculation import BatchPolicy, Hierarchy, Request, SamplingParams, Verdict

V, L = 64, 6


def target_next(token: int) -> int:
    return (token * 5 + 3) % V  # a full-period congruential generator: chains never repeat early


def scripted_next(token: int, exit: int) -> int:
    """The argmax after `token` at exit `exit` (after layer exit - 1): the target's rule at L;
    below, another rule on a third of the tokens (which ones depends on the exit)."""
    if exit == L or (token + exit) % 3:
        return target_next(token)
    return (token * 3 + 1) % V


def agreeing_next(token: int, exit: int) -> int:
    """Every exit agrees with the target: nothing is ever rejected."""
    return target_next(token)


def target_chain(prompt, n: int) -> list[int]:
    out, token = [], prompt[-1]
    for _ in range(n):
        token = target_next(token)
        out.append(token)
    return out


# K = 0..3 on 6 layers
HIERARCHIES = [
    Hierarchy(L), Hierarchy(L, (1,), (1,)), Hierarchy(L, (2,), (3,)), Hierarchy(L, (5,), (6,)),
    Hierarchy(L, (1, 3), (2, 4)), Hierarchy(L, (2, 4), (1, 1)), Hierarchy(L, (3, 4), (4, 5)),
    Hierarchy(L, (1, 2, 4), (1, 2, 3)), Hierarchy(L, (2, 3, 4), (3, 1, 4)),
]


class ScriptedExecutor:
    def __init__(self, num_slots: int, capacity: int, rule=scripted_next) -> None:
        self.capacity, self.rule = capacity, rule
        self.kv = [[[] for _ in range(L)] for _ in range(num_slots)]  # slot -> layer -> tokens held
        self.rings: dict[tuple[RingKey, int, int], tuple[int, int]] = {}  # (ring, slot, column) -> (position, token)

    def execute(self, plan: StepPlan) -> list[dict[int, list[int]]]:
        """Per forward: slot -> the argmax of each head row (what HeadOutput.argmax holds)."""
        for t in plan.truncations:
            for layer in range(t.layer_hi):
                held = self.kv[t.slot][layer]
                assert t.length <= len(held), f"{t} would extend layer {layer} (holds {len(held)})"
                del held[t.length:]
        for slot in plan.releases:
            self.kv[slot] = [[] for _ in range(L)]
        return [self._forward(fwd) for fwd in plan.forwards]

    def _forward(self, fwd: Forward) -> dict[int, list[int]]:
        assert 0 <= fwd.lo < fwd.hi <= L and fwd.feeds
        assert len({f.slot for f in fwd.feeds}) == len(fwd.feeds)
        heads = {}
        for f in fwd.feeds:
            assert f.count >= 1 and 0 <= f.head_rows <= f.count
            if fwd.lo == 0:
                assert fwd.input_ring is None and len(f.token_ids) == f.count
                tokens = list(f.token_ids)
            else:
                assert fwd.input_ring is not None and fwd.input_ring.exit == fwd.lo and f.token_ids is None
                tokens = [self._ring_read(fwd.input_ring, f.slot, pos) for pos in range(f.start, f.start + f.count)]
            for layer in range(fwd.lo, fwd.hi):
                held = self.kv[f.slot][layer]
                assert len(held) == f.start, f"slot {f.slot} layer {layer} holds {len(held)}, feed starts at {f.start}"
                held += tokens
                assert len(held) <= self.capacity
            if fwd.output_ring is not None:
                assert fwd.output_ring.exit == fwd.hi < L
                for i, token in enumerate(tokens):
                    self.rings[fwd.output_ring, f.slot, (f.start + i) % fwd.output_ring.window] = (f.start + i, token)
            if f.head_rows:
                heads[f.slot] = [self.rule(t, fwd.hi) for t in tokens[f.count - f.head_rows:]]
        return heads

    def _ring_read(self, ring: RingKey, slot: int, pos: int) -> int:
        written_pos, token = self.rings.get((ring, slot, pos % ring.window), (None, None))
        assert written_pos == pos, f"ring {ring} slot {slot}: position {pos} was overwritten or never written"
        return token

    def check(self, scheduler: Scheduler) -> None:
        """Every running sequence's layers hold exactly the tokens the scheduler says (and never
        the last token of its limit); free slots hold nothing."""
        running = {seq.slot: seq for seq in scheduler.running.values()}
        for slot, layers in enumerate(self.kv):
            seq = running.get(slot)
            if seq is None:
                assert not any(layers), f"free slot {slot} holds tokens"
                continue
            for layer, n in enumerate(scheduler.expected_lengths(seq)):
                assert layers[layer] == seq.tokens[:n], f"slot {slot} layer {layer}"
                assert n <= seq.limit - 1


def greedy_verdict(decision: Decision, argmax: list[int]) -> Verdict:
    """What the Decider does for a greedy sequence, by hand."""
    seq, k = decision.seq, decision.level
    if decision.prefill or k == 0:
        assert len(argmax) == 1
        return Verdict(0, argmax[0])
    proposals = seq.tokens[seq.accepted[k] : seq.accepted[k - 1]]
    assert len(argmax) in (len(proposals), len(proposals) + 1)
    for i, token in enumerate(proposals):
        if token != argmax[i]:
            return Verdict(i, argmax[i])
    return Verdict(len(proposals), argmax[len(proposals)] if len(argmax) > len(proposals) else None)


class Harness:
    """A scheduler driven like SpecEngine drives it, over a ScriptedExecutor."""

    def __init__(self, hierarchy: Hierarchy | BatchPolicy, *, capacity: int = 64, rule=scripted_next, eos=(),
                 attention_break_even: float | None = None, **config) -> None:
        config = EngineConfig(**config)
        policy = hierarchy if isinstance(hierarchy, BatchPolicy) else BatchPolicy.fixed(hierarchy)
        self.scheduler = Scheduler(policy, config, vocab_size=V, capacity=capacity, eos_token_ids=eos,
                                   attention_break_even=attention_break_even)
        self.executor = ScriptedExecutor(config.max_batch_size, capacity, rule)
        self.plans: list[StepPlan] = []
        # Per step: (ids of the sequences decoding before it, i.e. holding a slot with their whole
        # prompt in the KV; the step)
        self.steps: list[tuple[set[str], ScheduledStep]] = []
        self.streamed: dict[str, list[int]] = {}
        self.results: dict = {}  # request id -> GenerationResult

    def add(self, prompt, max_new_tokens: int, request_id: str, **kwargs) -> None:
        kwargs.setdefault("stop_token_ids", ())
        self.scheduler.add_request(Request(prompt, max_new_tokens, request_id=request_id, **kwargs))

    def schedule(self) -> tuple[ScheduledStep, list[dict[int, list[int]]]]:
        decoding = set(self.scheduler.running) - set(self.scheduler.prefilling)
        scheduled = self.scheduler.schedule()
        self.plans.append(scheduled.plan)
        self.steps.append((decoding, scheduled))
        result = self.executor.execute(scheduled.plan)
        self.executor.check(self.scheduler)
        return scheduled, result

    def step(self, verdicts=None):
        """One step; `verdicts`: a list to apply instead of the greedy ones."""
        scheduled, result = self.schedule()
        if verdicts is None:
            verdicts = [greedy_verdict(d, result[d.forward][d.seq.slot]) for d in scheduled.decisions]
        outputs = self.scheduler.apply(scheduled, verdicts)
        for out in outputs:
            self.streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                self.results[out.request_id] = out.result
        return scheduled, outputs

    def run(self, arrivals=()) -> dict:
        """Steps until every request is done; arrivals: (step, prompt, max_new, id) to add then."""
        arrivals, steps = sorted(arrivals, key=lambda a: a[0]), 0
        while arrivals or self.scheduler.has_unfinished():
            while arrivals and arrivals[0][0] <= steps:
                _, prompt, max_new, rid, *kwargs = arrivals.pop(0)
                self.add(prompt, max_new, rid, **(kwargs[0] if kwargs else {}))
            self.step()
            steps += 1
            assert steps < 1000
        self.executor.execute(self.scheduler.take_cache_ops())
        assert not any(any(layers) for layers in self.executor.kv)  # every slot released
        assert sorted(self.scheduler.free_slots) == list(range(len(self.executor.kv)))
        for rid, result in self.results.items():
            assert self.streamed.get(rid, []) == result.token_ids
        return self.results

    def forwards(self):
        return [fwd for plan in self.plans for fwd in plan.forwards]


def prompts_of(lengths) -> list[list[int]]:
    return [[(7 * n + 11 * i) % V for i in range(n)] for n in lengths]


# ---- the scheduler owns no model -------------------------------------------------------------
def test_scheduler_module_imports_no_model_or_torch():
    tree = ast.parse(Path(scheduler_module.__file__).read_text())
    imported = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "ray") or m.startswith("hispec.model")}


# ---- end to end over the scripted executor ---------------------------------------------------
@pytest.mark.parametrize("hierarchy", HIERARCHIES, ids=lambda h: h.describe())
def test_greedy_output_is_the_target_chain(hierarchy):
    """Requests joining and leaving a batch of 3, some proposals rejected at every level: every
    output is the target's own chain, and every plan was consistent with the executor's state."""
    h = Harness(hierarchy, max_batch_size=3)
    lengths, max_new = (1, 2, 5, 11, 17, 3), (33, 7, 20, 1, 12, 25)
    prompts = prompts_of(lengths)
    results = h.run([(2 * i, p, n, f"r{i}") for i, (p, n) in enumerate(zip(prompts, max_new))])
    for i, (p, n) in enumerate(zip(prompts, max_new)):
        assert results[f"r{i}"].token_ids == target_chain(p, n)
        assert results[f"r{i}"].finish_reason == "length"
    rejected = [sum(r.stats.levels[k].proposed - r.stats.levels[k].accepted for r in results.values())
                for k in range(1, hierarchy.depth + 1)]
    assert all(n > 0 for n in rejected)  # every verifying level rejected something


@pytest.mark.parametrize("align", [False, True])
def test_batch_policy_lanes_share_plans(align):
    """A hierarchy per request by the batch size it joins: lanes of different depths plan their
    forwards side by side in one step, and every output is still the target chain."""
    hispec, layerskip, ar = Hierarchy(L, (1, 3), (2, 4)), Hierarchy(L, (2,), (3,)), Hierarchy(L)
    h = Harness(BatchPolicy(((1, hispec), (2, layerskip), (None, ar))), max_batch_size=3, align_verification=align)
    prompts, max_new = prompts_of((1, 2, 5, 11, 17, 3)), (33, 7, 20, 1, 12, 25)
    results = h.run([(3 * i, p, n, f"r{i}") for i, (p, n) in enumerate(zip(prompts, max_new))])
    for i, (p, n) in enumerate(zip(prompts, max_new)):
        assert results[f"r{i}"].token_ids == target_chain(p, n)
    assert {r.hierarchy for r in results.values()} == {hispec, layerskip, ar}


# ---- admission ---------------------------------------------------------------------------------
def test_admission_fills_lowest_slots_within_the_prefill_chunk():
    h = Harness(Hierarchy(L, (2,), (3,)), max_batch_size=3, prefill_chunk_tokens=8)
    prompts = prompts_of((10, 3, 4, 2))
    for i, p in enumerate(prompts):
        h.add(p, 20, f"r{i}")
    scheduled, outputs = h.step()  # r0's first 8 tokens: no head row, no decision yet
    assert scheduled.plan.forwards == (Forward(0, L, (Feed(0, 0, 8, 0, tuple(prompts[0][:8])),), prefill=True),)
    assert scheduled.decisions == () and outputs == []
    assert [r.request_id for r in h.scheduler.waiting] == ["r1", "r2", "r3"]
    scheduled, outputs = h.step()  # r0's last 2 tokens, r1 whole (3), r2's first 3 of 4; r3 waits for a slot
    (prefill,) = scheduled.plan.forwards
    assert [(f.slot, f.start, f.count, f.head_rows) for f in prefill.feeds] == [(0, 8, 2, 1), (1, 0, 3, 1), (2, 0, 3, 0)]
    assert [(d.seq.slot, d.prefill) for d in scheduled.decisions] == [(0, True), (1, True)]
    assert [o.new_token_ids for o in outputs] == [target_chain(prompts[0], 1), target_chain(prompts[1], 1)]
    assert {s.request.request_id: s.slot for s in h.scheduler.running.values()} == {"r0": 0, "r1": 1, "r2": 2}
    assert [r.request_id for r in h.scheduler.waiting] == ["r3"] and list(h.scheduler.prefilling) == ["r2"]
    scheduled, _ = h.step()  # r2's last token, then r0 and r1 draft in the same step
    prefill, draft = scheduled.plan.forwards
    assert [(f.slot, f.start, f.count) for f in prefill.feeds] == [(2, 3, 1)]
    assert [f.slot for f in draft.feeds] == [0, 1]
    h.scheduler.abort("r1")
    scheduled, _ = h.step()
    assert scheduled.plan.releases == (1,)  # the aborted sequence's KV is released before the prefill
    assert h.scheduler.running["r3"].slot == 1  # the lowest free slot
    h.scheduler.abort("r0")
    h.scheduler.abort("r3")
    h.add(prompts[1], 5, "r4")
    h.step()
    assert h.scheduler.running["r4"].slot == 0 and h.scheduler.free_slots == [1]


def test_prefill_chunk_splits_prompts_over_steps():
    h = Harness(Hierarchy(L), max_batch_size=4, prefill_chunk_tokens=8)
    for i, p in enumerate(prompts_of((5, 4, 3, 6))):
        h.add(p, 5, f"r{i}")
    chunks = []
    for _ in range(3):
        scheduled, _ = h.step()
        chunks.append([(f.slot, f.start, f.count) for fwd in scheduled.plan.forwards if fwd.prefill for f in fwd.feeds])
    # 8 prompt tokens a step: 5 + 3 of 4 | the last 1 + 3 + 4 of 6 | the last 2
    assert chunks == [[(0, 0, 5), (1, 0, 3)], [(1, 3, 1), (2, 0, 3), (3, 0, 4)], [(3, 4, 2)]]


def test_prefill_chunks_shrink_as_attention_to_the_prompt_grows():
    """With an attention break-even of K keys, a prompt token after `start` others costs 1 + start / K of
    the budget: chunks of a long prompt get smaller (each step's work stays about the same), never
    empty, and the budget is shared by every prompt of the step."""
    h = Harness(Hierarchy(L), max_batch_size=2, prefill_chunk_tokens=10, attention_break_even=20, capacity=200)
    h.add(prompts_of((120,))[0], 2, "long")
    starts, counts = [], []
    while "long" in h.scheduler.prefilling or h.scheduler.waiting:
        scheduled, _ = h.step()
        [(start, count)] = [(f.start, f.count) for fwd in scheduled.plan.forwards if fwd.prefill for f in fwd.feeds]
        starts.append(start)
        counts.append(count)
    assert counts[:4] == [10, 6, 5, 4]  # floor(10 / (1 + start / 20)) at starts 0, 10, 16, 21
    assert counts[-1] >= 1 and sum(counts) == 120 and min(counts[:-1]) == 1
    assert all(count * (1 + start / 20) <= 10 or count == 1 for start, count in zip(starts, counts))


def test_prefill_spans_all_layers_with_one_head_row():
    hierarchy = Hierarchy(L, (1, 3), (2, 4))
    h = Harness(hierarchy, max_batch_size=2)
    prompts = prompts_of((4, 7))
    for i, p in enumerate(prompts):
        h.add(p, 10, f"r{i}")
    scheduled, outputs = h.step()
    assert scheduled.plan.forwards == (
        Forward(0, L, (Feed(0, 0, 4, 1, tuple(prompts[0])), Feed(1, 0, 7, 1, tuple(prompts[1]))), prefill=True),
    )
    assert [(d.level, d.forward, d.prefill, d.seq.slot) for d in scheduled.decisions] == [(2, 0, True, 0), (2, 0, True, 1)]
    assert [o.new_token_ids for o in outputs] == [target_chain(p, 1) for p in prompts]  # committed at once
    for seq in h.scheduler.running.values():
        assert seq.fed == [seq.prompt_len] * 3 and seq.accepted == [seq.prompt_len + 1] * 3


# ---- chunked prefill ------------------------------------------------------------------------------
@pytest.mark.parametrize("hierarchy", HIERARCHIES, ids=lambda h: h.describe())
def test_chunked_prefill_interleaves_with_decoding(hierarchy):
    """Prompts of 30-100 tokens enter 7 tokens a step among short ones joining mid-run: every output
    is the target chain, no step runs more than 7 prompt tokens, a prompt's chunks follow each other
    step by step, and every decoding sequence gets its forward in every step while others prefill."""
    h = Harness(hierarchy, capacity=160, max_batch_size=4, prefill_chunk_tokens=7)
    lengths, max_new = (3, 90, 1, 45, 30, 100, 2, 64), (40, 12, 30, 9, 20, 15, 25, 6)
    prompts = prompts_of(lengths)
    results = h.run([(3 * i, p, n, f"r{i}") for i, (p, n) in enumerate(zip(prompts, max_new))])
    for i, (p, n) in enumerate(zip(prompts, max_new)):
        assert results[f"r{i}"].token_ids == target_chain(p, n)
    interleaved = 0
    chunks_by_slot: dict[int, list[Feed]] = {}
    for decoding, scheduled in h.steps:
        prefills = [fwd for fwd in scheduled.plan.forwards if fwd.prefill]
        assert len(prefills) <= 1 and (not prefills or scheduled.plan.forwards[0] is prefills[0])
        feeds = prefills[0].feeds if prefills else ()
        assert sum(f.count for f in feeds) <= 7
        assert {d.seq.request.request_id for d in scheduled.decisions if not d.prefill} == decoding
        assert sorted(d.seq.slot for d in scheduled.decisions if d.prefill) == sorted(f.slot for f in feeds if f.head_rows)
        for f in feeds:
            chunks_by_slot.setdefault(f.slot, []).append(f)
        interleaved += bool(feeds and decoding)
    assert interleaved >= 10  # long prompts did enter while others decoded
    for slot, chunks in chunks_by_slot.items():  # a prompt's chunks follow each other, the last asks for the head
        start = 0
        for f in chunks:
            assert f.start == start, (slot, chunks)
            start = 0 if f.head_rows else f.start + f.count
        assert start == 0


def test_abort_mid_prefill_frees_the_slot_and_kv():
    h = Harness(Hierarchy(L, (2,), (3,)), capacity=80, max_batch_size=2, prefill_chunk_tokens=5)
    short, long = prompts_of((2, 40))
    h.add(short, 30, "short")
    h.step()
    h.add(long, 10, "long")
    for _ in range(3):  # 15 of its 40 tokens in; "short" decodes every step
        scheduled, _ = h.step()
        assert [d.seq.request.request_id for d in scheduled.decisions] == ["short"]
    assert h.scheduler.running["long"].slot == 1 and h.executor.kv[1][L - 1] == long[:15]
    result = h.scheduler.abort("long")
    assert (result.finish_reason, result.token_ids) == ("abort", [])
    assert "long" not in h.scheduler.prefilling and 1 in h.scheduler.free_slots
    scheduled, _ = h.step()  # the release rides with the next plan; no prefill left
    assert scheduled.plan.releases == (1,) and not any(fwd.prefill for fwd in scheduled.plan.forwards)
    assert not any(h.executor.kv[1])
    results = h.run()
    assert results["short"].token_ids == target_chain(short, 30)


# ---- forward shapes ------------------------------------------------------------------------------
def test_draft_then_verification_forwards():
    """P = 4, exits (2, 4), budgets (2, 3), window 7, every exit agreeing with the target."""
    h = Harness(Hierarchy(L, (2, 4), (2, 3)), rule=agreeing_next)
    prompt = prompts_of((4,))[0]
    t = prompt + target_chain(prompt, 10)  # t[i]: the token at position i
    h.add(prompt, 10, "r")
    h.step()  # prefill: t[4] committed
    for pos in (4, 5):  # two drafts at level 0, one token each, hidden states kept at exit 2
        scheduled, outputs = h.step()
        assert scheduled.plan.forwards == (Forward(0, 2, (Feed(0, pos, 1, 1, (t[pos],)),), output_ring=RingKey(2, 7)),)
        assert [(d.level, d.forward) for d in scheduled.decisions] == [(0, 0)] and outputs == []
    # level 1 verifies t[5], t[6]: a catch-up feed of t[6] at level 0 (no head rows), then layers
    # [2, 4) over positions 4..6 from the ring at exit 2, three head rows (two proposals + bonus)
    scheduled, outputs = h.step()
    assert scheduled.plan.forwards == (
        Forward(0, 2, (Feed(0, 6, 1, 0, (t[6],)),), output_ring=RingKey(2, 7)),
        Forward(2, 4, (Feed(0, 4, 3, 3),), input_ring=RingKey(2, 7), output_ring=RingKey(4, 7)),
    )
    assert [(d.level, d.forward) for d in scheduled.decisions] == [(1, 1)] and outputs == []
    seq = h.scheduler.running["r"]
    assert seq.accepted == [8, 8, 5] and seq.fed == [7, 7, 4]
    # the target verifies positions 5..7: the catch-up of t[7] runs levels 0 and 1 as ONE forward
    scheduled, outputs = h.step()
    assert scheduled.plan.forwards == (
        Forward(0, 4, (Feed(0, 7, 1, 0, (t[7],)),), output_ring=RingKey(4, 7)),
        Forward(4, 6, (Feed(0, 4, 4, 4),), input_ring=RingKey(4, 7)),
    )
    assert [(d.level, d.forward) for d in scheduled.decisions] == [(2, 1)]
    assert [o.new_token_ids for o in outputs] == [t[5:9]]  # three accepted + the bonus


@pytest.mark.parametrize("align", [False, True])
def test_mixed_actions_group_levels(align):
    """Slot 0 verifies at the target while slot 1 drafts. Level 0 runs slot 1's draft and slot
    0's catch-up, level 1 only the catch-up: different feeds, so separate forwards. (Alignment
    changes nothing here: slot 1 has no proposals waiting, so it drafts either way.)"""
    hierarchy = Hierarchy(L, (2, 4), (2, 3))
    h = Harness(hierarchy, rule=agreeing_next, max_batch_size=2, align_verification=align)
    a, b = prompts_of((4, 3))
    h.add(a, 20, "a")
    for _ in range(3):  # a: prefill, two drafts
        h.step()
    h.add(b, 20, "b")
    h.step()  # a verifies at level 1; b's prefill
    scheduled, _ = h.step()  # a verifies at level 2; b drafts
    shapes = [(f.lo, f.hi, [(x.slot, x.start, x.count, x.head_rows) for x in f.feeds], f.input_ring, f.output_ring)
              for f in scheduled.plan.forwards]
    assert shapes == [
        (0, 2, [(0, 7, 1, 0), (1, 3, 1, 1)], None, RingKey(2, 7)),
        (2, 4, [(0, 7, 1, 0)], RingKey(2, 7), RingKey(4, 7)),
        (4, 6, [(0, 4, 4, 4)], RingKey(4, 7), None),
    ]
    assert sorted((d.seq.slot, d.level, d.forward) for d in scheduled.decisions) == [(0, 2, 2), (1, 0, 0)]


# ---- verdicts ------------------------------------------------------------------------------------
def test_rejection_truncates_in_the_next_plan():
    hierarchy = Hierarchy(L, (2, 4), (2, 3))
    h = Harness(hierarchy, rule=agreeing_next)
    prompt = prompts_of((4,))[0]
    h.add(prompt, 20, "r")
    for _ in range(3):  # prefill, two drafts
        h.step()
    seq = h.scheduler.running["r"]
    assert seq.accepted == [7, 5, 5]
    _, outputs = h.step([Verdict(0, 49)])  # level 1 rejects the first proposal, recovers token 49
    assert outputs == []  # the target committed nothing
    assert seq.tokens[5:] == [49] and seq.accepted == [6, 6, 5] and seq.fed == [5, 5, 4]
    assert h.scheduler.expected_lengths(seq) == [5, 5, 5, 5, 4, 4]
    scheduled, _ = h.step()  # the next plan rolls layers [0, 4) back first (the executor checks it)
    assert scheduled.plan.truncations == (Truncate(0, 4, 5),)
    # then level 0 drafts after the recovered token
    assert scheduled.plan.forwards == (Forward(0, 2, (Feed(0, 5, 1, 1, (49,)),), output_ring=RingKey(2, 7)),)
    assert h.scheduler.expected_lengths(seq) == [6, 6, 5, 5, 4, 4]


def test_target_rejection_truncates_every_layer_and_commits_the_recovered_token():
    hierarchy = Hierarchy(L, (3,), (3,))
    h = Harness(hierarchy, rule=agreeing_next)
    prompt = prompts_of((2,))[0]
    h.add(prompt, 20, "r")
    h.step()
    for _ in range(3):
        h.step()
    seq = h.scheduler.running["r"]
    assert seq.accepted == [6, 3]
    _, outputs = h.step([Verdict(1, 42)])
    assert [o.new_token_ids for o in outputs] == [[seq.tokens[3], 42]]
    assert seq.accepted == [5, 5] and h.scheduler.expected_lengths(seq) == [4] * 6
    scheduled, _ = h.step()
    assert scheduled.plan.truncations == (Truncate(0, 6, 4),)


def test_max_new_tokens_inside_a_window_finishes_and_releases():
    """Budget 5 but 3 tokens wanted: drafting stops at the limit, the target checks the two
    proposals without a bonus row, and the request finishes with "length"."""
    h = Harness(Hierarchy(L, (2,), (5,)), rule=agreeing_next, max_batch_size=2)
    prompt = prompts_of((4,))[0]
    t = prompt + target_chain(prompt, 3)
    h.add(prompt, 3, "r")
    for _ in range(3):  # prefill, two drafts (the second reaches the limit: 4 + 3 tokens)
        h.step()
    scheduled, outputs = h.step()
    assert scheduled.plan.forwards == (Forward(2, 6, (Feed(0, 4, 2, 2),), input_ring=RingKey(2, 7)),)
    (out,) = outputs
    assert out.new_token_ids == t[5:7] and out.result.token_ids == t[4:7]
    assert out.result.finish_reason == "length" and out.result.stats.new_tokens == 3
    assert h.scheduler.running == {} and h.scheduler.free_slots == [0, 1]
    h.add(prompt, 3, "next")
    scheduled, _ = h.step()
    assert scheduled.plan.releases == (0,)  # the finished sequence's KV goes first
    assert scheduled.plan.forwards[0].feeds[0].slot == 0  # then its slot takes the new request


@pytest.mark.parametrize("hierarchy", HIERARCHIES, ids=lambda h: h.describe())
def test_max_new_tokens_any_step(hierarchy):
    h = Harness(hierarchy, max_batch_size=4)
    prompts = prompts_of((3, 1, 6, 2))
    results = h.run([(0, p, n, f"r{n}") for p, n in zip(prompts, (1, 2, 5, 8))])
    for p, n in zip(prompts, (1, 2, 5, 8)):
        assert (results[f"r{n}"].token_ids, results[f"r{n}"].finish_reason) == (target_chain(p, n), "length")


def test_eos_recovered_inside_a_window_cuts_the_rest():
    """The target rejects the second of four proposals and recovers the stop token: the output
    ends there (the proposals after it are dropped) and the request stops."""
    h = Harness(Hierarchy(L, (2,), (4,)), rule=agreeing_next, max_batch_size=1)
    prompt = prompts_of((3,))[0]
    h.add(prompt, 30, "r", stop_token_ids=(13,))
    h.step()
    for _ in range(4):
        h.step()
    seq = h.scheduler.running["r"]
    first, drafted = seq.tokens[3], seq.tokens[4:8]
    assert 13 not in [first, *drafted]
    (out,) = h.step([Verdict(1, 13)])[1]
    assert out.new_token_ids == [drafted[0], 13]
    assert (out.result.token_ids, out.result.finish_reason) == ([first, drafted[0], 13], "stop")
    assert h.scheduler.take_cache_ops().releases == (0,)


def test_eos_drafted_closes_the_window_early():
    """The draft proposes the stop token second: drafting stops (budget 4 notwithstanding), the
    target checks the two proposals without a bonus row and commits the stop token."""
    prompt = prompts_of((3,))[0]
    t = prompt + target_chain(prompt, 5)
    stop = t[5]
    h = Harness(Hierarchy(L, (2,), (4,)), rule=agreeing_next, eos=(stop,))
    h.scheduler.add_request(Request(prompt, 30, request_id="r"))  # stop ids: the model's EOS
    for _ in range(3):  # prefill (t[3]), drafts t[4], t[5] = stop
        h.step()
    scheduled, outputs = h.step()
    assert scheduled.plan.forwards == (Forward(2, 6, (Feed(0, 3, 2, 2),), input_ring=RingKey(2, 6)),)
    (out,) = outputs
    assert (out.result.token_ids, out.result.finish_reason) == (t[3:6], "stop")


@pytest.mark.parametrize("hierarchy", HIERARCHIES, ids=lambda h: h.describe())
def test_stop_token_anywhere(hierarchy):
    prompts = prompts_of((2, 5, 9))
    h = Harness(hierarchy, max_batch_size=2)
    arrivals = []
    for i, p in enumerate(prompts):
        chain = target_chain(p, 40)
        stop = chain[3 + 4 * i]
        arrivals.append((i, p, 40, f"r{i}", {"stop_token_ids": (stop,)}))
    results = h.run(arrivals)
    for i, p in enumerate(prompts):
        chain = target_chain(p, 40)
        stop = arrivals[i][4]["stop_token_ids"][0]
        expected = chain[: chain.index(stop) + 1]
        assert (results[f"r{i}"].token_ids, results[f"r{i}"].finish_reason) == (expected, "stop")


# ---- aborts, limits, edge cases --------------------------------------------------------------------
def test_abort_waiting_and_running():
    h = Harness(Hierarchy(L, (1, 3), (2, 2)), max_batch_size=2)
    prompts = prompts_of((3, 4, 5))
    for i, p in enumerate(prompts):
        h.add(p, 20, f"r{i}")
    for _ in range(3):
        h.step()
    waiting = h.scheduler.abort("r2")
    assert (waiting.finish_reason, waiting.token_ids, waiting.hierarchy) == ("abort", [], None)
    assert [r.request_id for r in h.scheduler.waiting] == []
    slot = h.scheduler.running["r0"].slot
    committed = h.streamed["r0"]
    running = h.scheduler.abort("r0")
    assert (running.finish_reason, running.token_ids) == ("abort", committed)
    assert "r0" not in h.scheduler.running and slot in h.scheduler.free_slots  # free at once
    assert h.scheduler.abort("r0") is None and h.scheduler.abort("unknown") is None
    scheduled, _ = h.step()
    assert scheduled.plan.releases == (slot,)  # and the executor's check saw the slot empty
    assert all(f.slot != slot for fwd in scheduled.plan.forwards for f in fwd.feeds)
    results = h.run()
    assert results["r1"].token_ids == target_chain(prompts[1], 20)


def test_a_plan_may_carry_cache_ops_and_no_forward():
    """Aborting the only running sequence: the next plan releases its slot and runs nothing (an
    executor must still apply it)."""
    h = Harness(Hierarchy(L, (2,), (3,)), max_batch_size=2)
    h.add(prompts_of((3,))[0], 20, "r")
    h.step()
    h.step()
    h.scheduler.abort("r")
    scheduled, outputs = h.step([])
    assert scheduled.plan == StepPlan(releases=(0,)) and outputs == []


def test_abort_all():
    h = Harness(Hierarchy(L, (2,), (3,)), max_batch_size=1)
    for i, p in enumerate(prompts_of((3, 4))):
        h.add(p, 20, f"r{i}")
    h.step()
    results = h.scheduler.abort_all("error")
    assert sorted((r.request_id, r.finish_reason) for r in results) == [("r0", "error"), ("r1", "abort")]
    assert not h.scheduler.has_unfinished() and h.scheduler.take_cache_ops().releases == (0,)


@pytest.mark.parametrize("hierarchy", HIERARCHIES[:1] + HIERARCHIES[2:3] + HIERARCHIES[4:5] + HIERARCHIES[7:8],
                         ids=lambda h: h.describe())
def test_context_limit(hierarchy):
    """Capacity 8: prompt + new tokens <= 8; requests asking for more are refused, naming the field."""
    h = Harness(hierarchy, capacity=8, max_batch_size=3)
    prompts = prompts_of((5, 7, 1))
    results = h.run([(0, p, 8 - len(p), f"r{i}") for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert (results[f"r{i}"].token_ids, results[f"r{i}"].finish_reason) == (target_chain(p, 8 - len(p)), "length")
    with pytest.raises(InvalidRequest, match="max_new_tokens: 4 new tokens after a prompt of 5") as refused:
        h.add(prompts_of((5,))[0], 4, "too-many")
    assert refused.value.field == "max_new_tokens"
    with pytest.raises(InvalidRequest, match="leaves no room") as refused:
        h.add(prompts_of((8,))[0], 1, "too-long")
    assert refused.value.field == "prompt"
    assert not h.scheduler.has_unfinished()


def test_client_errors_are_invalid_requests():
    h = Harness(Hierarchy(L), max_batch_size=1)
    h.add([1, 2], 3, "a")
    for kwargs, field in [(dict(prompt=[V], max_new_tokens=3), "prompt"),
                          (dict(prompt=[1], max_new_tokens=3, stop_strings=("x",)), "stop"),
                          (dict(prompt=[1], max_new_tokens=3, request_id="a"), "request_id")]:
        kwargs.setdefault("request_id", "b")
        with pytest.raises(InvalidRequest) as refused:
            h.scheduler.add_request(Request(kwargs.pop("prompt"), kwargs.pop("max_new_tokens"), stop_token_ids=(), **kwargs))
        assert refused.value.field == field
    assert [r.request_id for r in h.scheduler.waiting] == ["a"]


def test_max_new_tokens_zero_finishes_at_once():
    h = Harness(Hierarchy(L, (2,), (3,)), capacity=8, max_batch_size=1)
    h.add(prompts_of((12,))[0], 0, "zero")  # even a prompt over the context: nothing to decode
    scheduled, outputs = h.step([])
    assert scheduled.plan == StepPlan() and scheduled.decisions == ()
    (out,) = outputs
    assert (out.request_id, out.new_token_ids, out.result.token_ids, out.result.finish_reason) == ("zero", [], [], "length")
    assert not h.scheduler.has_unfinished() and h.scheduler.free_slots == [0]


def test_autoregressive_hierarchy_runs_one_full_forward_per_step():
    h = Harness(Hierarchy(L), max_batch_size=2)
    a, b = prompts_of((3, 5))
    h.add(a, 4, "a")
    h.add(b, 6, "b")
    ta, tb = a + target_chain(a, 4), b + target_chain(b, 6)
    h.step()  # prefill
    for i in range(3):
        scheduled, outputs = h.step()
        assert scheduled.plan.forwards == (
            Forward(0, L, (Feed(0, 3 + i, 1, 1, (ta[3 + i],)), Feed(1, 5 + i, 1, 1, (tb[5 + i],)))),)
        assert [(d.level, d.forward) for d in scheduled.decisions] == [(0, 0), (0, 0)]
        assert [o.new_token_ids for o in outputs] == [[ta[4 + i]], [tb[6 + i]]]
    results = h.run()
    assert results["a"].token_ids == ta[3:] and results["b"].token_ids == tb[5:]
    assert all(f.lo == 0 and f.hi == L and f.input_ring is f.output_ring is None for f in h.forwards())


def test_draft_vocab_applies_to_greedy_forwards_below_the_target_only():
    h = Harness(Hierarchy(L, (2,), (2,)), rule=agreeing_next, max_batch_size=2, draft_vocab=10)
    h.add(prompts_of((3,))[0], 10, "greedy")
    h.add(prompts_of((4,))[0], 10, "sampled", sampling=SamplingParams(temperature=0.8, seed=1))
    scheduled, _ = h.schedule()  # prefill: the whole head; logits rows for the sampled sequence only
    assert [f.logits for f in scheduled.plan.forwards[0].feeds] == [False, True]
    assert scheduled.plan.forwards[0].head_vocab is None
    h.scheduler.apply(scheduled, [Verdict(0, 5), Verdict(0, 6)])
    scheduled, _ = h.schedule()  # both draft in one forward; a sampled feed in it: the whole head
    (fwd,) = scheduled.plan.forwards
    assert fwd.head_vocab is None and [f.logits for f in fwd.feeds] == [False, True]
    h.scheduler.apply(scheduled, [Verdict(0, 7), Verdict(0, 8)])
    h.scheduler.abort("sampled")
    scheduled, _ = h.schedule()  # the greedy sequence drafts alone: the pruned head
    assert [f.head_vocab for f in scheduled.plan.forwards] == [10]
    h.scheduler.apply(scheduled, [Verdict(0, 9)])
    scheduled, _ = h.schedule()  # its target verifies: the whole head (after a catch-up below)
    assert [(f.lo, f.hi, f.head_vocab) for f in scheduled.plan.forwards] == [(0, 2, 10), (2, 6, None)]
