"""Sampled speculation is lossless: token distributions equal plain sampling from the full model.

On a vocabulary of 8 the exact distribution of the first 4 new tokens is enumerated (all 8^3
prefixes through the full model, processed by temperature / top-k / top-p); thousands of seeded
runs of the engine are compared with it by chi-square tests. Each configuration runs 4 tests at
alpha = 0.002, so a correct engine fails with probability < 1%; the seeds are fixed, so the
outcome is reproducible. The same tests reject the engine when its verification rule is broken.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hispec.speculation import RejectionSampler, Request, SamplingParams
from hispec.speculation.sampling import keyed_uniform, processed_probs, sample_from
from tests.unit.spec_helpers import random_prompts, run_engine, tiny_model

VOCAB, NEW, SAMPLES, ALPHA = 8, 4, 4000, 0.002


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # initializer 0.2: exit distributions differ from the final one (total variation ~0.45)
    return tiny_model(tmp_path_factory.mktemp("v8"), num_layers=4, vocab_size=VOCAB, initializer_range=0.2)


PROMPT = [3, 1, 4, 1, 5]


@torch.inference_mode()
def exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """P(t1..t4 | PROMPT) as a [8, 8, 8, 8] tensor, from the full model's processed distributions."""
    prefixes = list(itertools.product(range(VOCAB), repeat=NEW - 1))  # all (t1, t2, t3)
    ids = torch.tensor([PROMPT + list(p) for p in prefixes])
    hidden = model.causal_hidden_states(ids, [model.config.num_layers])[0]
    P = len(PROMPT)
    logits = model.exit_logits(hidden[:, P - 1 :])  # [512, 4, V]: distributions of t1..t4
    probs = processed_probs(logits.reshape(-1, VOCAB), [params] * logits.shape[0] * NEW).reshape(logits.shape)
    joint = torch.zeros((VOCAB,) * NEW, dtype=torch.float64)
    for row, (t1, t2, t3) in enumerate(prefixes):
        p = probs[row].double()
        joint[t1, t2, t3] = p[0, t1] * p[1, t2] * p[2, t3] * p[3]
    return joint


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    counts, expected = counts.flatten().double(), expected_probs.flatten().double() * counts.sum()
    small = expected < 5  # pool cells too small for the chi-square approximation
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


def pvalues(model, exits, budgets, params, verifier=None) -> dict[str, float]:
    from hispec.engine import EngineConfig, SpecEngine
    from hispec.speculation import Hierarchy

    engine = SpecEngine(model, Hierarchy(model.config.num_layers, exits, budgets),
                        EngineConfig(max_batch_size=64), verifier=verifier)
    requests = [Request(PROMPT, NEW, SamplingParams(params.temperature, params.top_k, params.top_p, seed),
                        stop_token_ids=()) for seed in range(SAMPLES)]
    samples = torch.tensor([r.token_ids for r in engine.generate(requests)])  # [N, 4]
    joint = exact_joint(model, params)
    counts = torch.zeros((VOCAB,) * NEW)
    counts.index_put_(tuple(samples.T), torch.ones(SAMPLES), accumulate=True)
    return {
        "t2": chi_square_pvalue(counts.sum((0, 2, 3)), joint.sum((0, 2, 3))),
        "t3": chi_square_pvalue(counts.sum((0, 1, 3)), joint.sum((0, 1, 3))),
        "t4": chi_square_pvalue(counts.sum((0, 1, 2)), joint.sum((0, 1, 2))),
        "t2,t3": chi_square_pvalue(counts.sum((0, 3)), joint.sum((0, 3))),
    }


CASES = {
    "K1": ((1,), (2,), SamplingParams(temperature=1.0)),
    "K2": ((1, 2), (2, 2), SamplingParams(temperature=1.0)),
    "K2-topk-topp": ((1, 3), (1, 3), SamplingParams(temperature=0.8, top_k=6, top_p=0.9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_matches_full_model(model, case):
    exits, budgets, params = CASES[case]
    result = pvalues(model, exits, budgets, params)
    assert min(result.values()) > ALPHA, result


class ResidualIsTarget(RejectionSampler):
    """A classic bug: after a rejection, sample from p instead of max(0, p - q)."""

    def residual(self, p, q):
        return p


class AlwaysAccept(RejectionSampler):
    """Another: trust the proposals (the output is then the draft's distribution)."""

    def accept_probability(self, p_x, q_x):
        return torch.ones_like(p_x)


@pytest.mark.parametrize("broken", [ResidualIsTarget, AlwaysAccept])
@pytest.mark.parametrize("case", ["K1", "K2"])
def test_broken_rule_is_detected(model, case, broken):
    exits, budgets, params = CASES[case]
    result = pvalues(model, exits, budgets, params, verifier=broken())
    assert min(result.values()) < 1e-6, result


def test_rejection_sampler_alone_emits_p():
    """One proposal x ~ q, verified against p: the emitted token is distributed as p."""
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(6, generator=generator).softmax(0)
    q = (torch.rand(6, generator=generator) * 3).softmax(0)
    sampler, counts = RejectionSampler(), torch.zeros(6)
    for trial in range(20000):
        x = sample_from(q, keyed_uniform(1, 0, trial, 0, 1))
        verdict = sampler.verify([x], p[None], q[None], lambda i, purpose: keyed_uniform(2, 1, trial, 0, purpose))
        counts[x if verdict.accepted else verdict.next_token] += 1
    assert chi_square_pvalue(counts, p) > ALPHA


# ---- reproducibility ---------------------------------------------------------------------------
def test_seeded_output_is_independent_of_batching(model):
    prompts = random_prompts((2, 5, 9, 3, 7, 4), VOCAB, seed=1)
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i) for i in range(len(prompts))]
    requests = lambda: [Request(p, 12, s, stop_token_ids=()) for p, s in zip(prompts, params)]
    alone = [run_engine(model, (1, 2), (2, 2), [r])[0].token_ids for r in requests()]
    together = [r.token_ids for r in run_engine(model, (1, 2), (2, 2), requests(), max_batch_size=6)]
    squeezed = [r.token_ids for r in run_engine(model, (1, 2), (2, 2), requests()[::-1], max_batch_size=2)][::-1]
    assert alone == together == squeezed
    reseeded = [Request(p, 12, SamplingParams(temperature=1.0, top_p=0.95, seed=7), stop_token_ids=()) for p in prompts]
    assert [r.token_ids for r in run_engine(model, (1, 2), (2, 2), reseeded)] != alone


def test_unseeded_requests_still_sample(model):
    requests = [Request(PROMPT, 6, SamplingParams(temperature=1.0), stop_token_ids=()) for _ in range(8)]
    outputs = {tuple(r.token_ids) for r in run_engine(model, (1,), (2,), requests, max_batch_size=8)}
    assert len(outputs) > 1


# ---- sampling primitives -----------------------------------------------------------------------
def test_keyed_uniform_is_a_pure_function_in_unit_interval():
    draws = [keyed_uniform(5, level, pos, 0, 0) for level in range(3) for pos in range(2000)]
    assert draws == [keyed_uniform(5, level, pos, 0, 0) for level in range(3) for pos in range(2000)]
    assert all(0 <= u < 1 for u in draws) and abs(sum(draws) / len(draws) - 0.5) < 0.02
    assert keyed_uniform(5, 0, 0, 0, 0) != keyed_uniform(5, 0, 0, 1, 0) != keyed_uniform(6, 0, 0, 0, 0)


def test_processed_probs_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    params = [SamplingParams(1.0, top_k=2), SamplingParams(1.0, top_p=0.7), SamplingParams(0.5)]
    probs = processed_probs(logits, params)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert (probs[0, 2:] == 0).all() and (probs[0, :2] > 0).all()
    full = logits[0].softmax(0)
    kept = int((full.cumsum(0) - full < 0.7).sum())  # smallest prefix with mass >= 0.7
    assert (probs[1, :kept] > 0).all() and (probs[1, kept:] == 0).all()
    assert torch.allclose(probs[2], (logits[2] / 0.5).softmax(0))


def test_sample_from_skips_zero_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    assert {sample_from(probs, u / 100) for u in range(100)} == {1, 3}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-2), dict(seed=-1), dict(temperature=math.inf)])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
