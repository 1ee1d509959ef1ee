"""Edge validation shared by gRPC and HTTP: every bad field is refused by name (no Ray here)."""

import math
import pickle

import pytest

from pydantic import ValidationError

from hispec.serving.openai_api import CompletionRequest, field_path
from hispec.serving.params import InvalidArgument, Limits, check_prompt, check_prompt_ids, generation_params

LIMITS = Limits(max_context=64, vocab_size=100, default_max_new_tokens=20, max_prompt_chars=50, max_stop_strings=2)


def test_defaults_are_greedy_with_the_server_default_length():
    params = generation_params(LIMITS)
    assert params.sampling.greedy and params.stop == () and params.max_new_tokens is None
    assert params.new_tokens_for(10, LIMITS, "max_new_tokens") == 20
    assert params.new_tokens_for(60, LIMITS, "max_new_tokens") == 4  # the default shrinks to the room left


@pytest.mark.parametrize("field, value, words", [
    ("max_new_tokens", 0, "[1, 63]"), ("max_new_tokens", 64, "[1, 63]"), ("max_new_tokens", 2.5, "integer"),
    ("max_new_tokens", True, "integer"),
    ("temperature", -0.1, ">= 0"), ("temperature", math.nan, "finite"), ("temperature", math.inf, "finite"),
    ("temperature", "hot", "number"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_p", -math.inf, "finite"),
    ("top_k", -2, "[0, 2147483647]"), ("top_k", 2**31, "[0, 2147483647]"), ("top_k", -2**63, "[0, 2147483647]"),
    ("top_k", 1.5, "integer"),
    ("seed", -1, "[0, 2**63)"), ("seed", 2**63, "[0, 2**63)"), ("seed", 2**64, "[0, 2**63)"),
    ("max_new_tokens", 2**63, "[1, 63]"), ("max_new_tokens", -2**63, "[1, 63]"),
    ("stop", ["a", "b", "c"], "at most 2"), ("stop", [""], "non-empty"), ("stop", ["x" * 300], "at most 256"),
    ("stop", [3], "non-empty strings"), ("stop", 7, "a string or a list"), ("stop", {"a": 1}, "a string or a list"),
    ("stop", ["a\ud800"], "not valid Unicode"),
])
def test_bad_fields_are_named(field, value, words):
    with pytest.raises(InvalidArgument) as caught:
        generation_params(LIMITS, **{field: value})
    assert caught.value.field == field and words in str(caught.value)


def test_a_huge_value_is_cut_short_in_the_message():
    with pytest.raises(InvalidArgument) as caught:
        generation_params(LIMITS, temperature="x" * 1_000_000)
    assert len(str(caught.value)) < 200
    with pytest.raises(InvalidArgument) as caught:
        generation_params(LIMITS, stop=[["y"] * 1_000_000])
    assert len(str(caught.value)) < 200
    for field in ("max_new_tokens", "top_k", "seed"):  # a 4,000-digit integer is valid JSON
        with pytest.raises(InvalidArgument) as caught:
            generation_params(LIMITS, **{field: 10**4000})
        assert len(str(caught.value)) < 200


def test_tiny_temperatures_are_greedy():
    """logits / 1e-45 overflow float32 (the softmax turns to NaN): such a temperature is greedy, as in vLLM."""
    for tiny in (1e-45, 1e-38, 9e-6):
        assert generation_params(LIMITS, temperature=tiny).sampling.greedy
    assert generation_params(LIMITS, temperature=1e-5).sampling.temperature == 1e-5


def test_extreme_values_that_are_in_range_are_kept():
    params = generation_params(LIMITS, top_k=2**31 - 1, seed=2**63 - 1, top_p=1e-6, temperature=1e308)
    assert (params.sampling.top_k, params.sampling.seed, params.sampling.top_p, params.sampling.temperature) == \
        (2**31 - 1, 2**63 - 1, 1e-6, 1e308)


def test_tiny_top_p_keeps_the_most_likely_token_without_nan():
    """top_p 1e-46 is 0 in float32: the nucleus would be empty and the probabilities NaN."""
    import torch

    from hispec.speculation.sampling import processed_probs

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    for tiny in (5e-324, 1e-46, 1e-12):
        sampling = generation_params(LIMITS, temperature=1.0, top_p=tiny).sampling
        assert sampling.top_p == 1e-9
        assert processed_probs(logits, [sampling]).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_api_names_are_used_in_errors():
    with pytest.raises(InvalidArgument, match=r"^max_tokens: "):
        generation_params(LIMITS, max_new_tokens=0, names={"max_new_tokens": "max_tokens"})


def test_explicit_length_must_fit_the_context():
    params = generation_params(LIMITS, max_new_tokens=30)
    assert params.new_tokens_for(34, LIMITS, "max_tokens") == 30
    with pytest.raises(InvalidArgument, match=r"max_tokens: the prompt \(35 tokens\) plus 30"):
        params.new_tokens_for(35, LIMITS, "max_tokens")


def test_prompts():
    assert check_prompt("x" * 50, LIMITS) == "x" * 50
    with pytest.raises(InvalidArgument, match="51 characters"):
        check_prompt("x" * 51, LIMITS)
    with pytest.raises(InvalidArgument, match="must be a string"):
        check_prompt(None, LIMITS)
    with pytest.raises(InvalidArgument, match="empty"):
        check_prompt_ids([], LIMITS)
    with pytest.raises(InvalidArgument, match="64 tokens"):
        check_prompt_ids([1] * 64, LIMITS)
    with pytest.raises(InvalidArgument, match=r"\[0, 100\)"):
        check_prompt_ids([1, 100], LIMITS)
    for bad in (-1, -2**63, 2**63, 2**64, 1.0, True, "1", None):
        with pytest.raises(InvalidArgument, match=r"integers in \[0, 100\)"):
            check_prompt_ids([1, bad], LIMITS)


def test_prompts_must_be_valid_unicode():
    """JSON may carry lone surrogates; the tokenizer would raise a TypeError (a server error) on them."""
    for text in ("\ud800", "ab\udfffc"):
        with pytest.raises(InvalidArgument, match=r"^prompt: is not valid Unicode \(surrogates not allowed"):
            check_prompt(text, LIMITS)
    assert check_prompt("\x00\ufffe😀", LIMITS) == "\x00\ufffe😀"


def test_sampling_and_vllm_spelling():
    params = generation_params(LIMITS, temperature=0.7, top_p=0.9, top_k=-1, seed=5, stop="##")
    assert (params.sampling.temperature, params.sampling.top_p, params.sampling.top_k, params.sampling.seed) == \
        (0.7, 0.9, 0, 5)
    assert params.stop == ("##",)


def test_invalid_argument_survives_pickling():  # it crosses Ray calls
    error = pickle.loads(pickle.dumps(InvalidArgument("top_p", "must be in (0, 1]")))
    assert (error.field, str(error)) == ("top_p", "top_p: must be in (0, 1]")


def test_completion_request():
    body = CompletionRequest.model_validate({"prompt": "hi", "max_tokens": 5, "temperature": 0})
    params = body.params(LIMITS)
    assert params.max_new_tokens == 5 and params.sampling.greedy and body.prompts() == ["hi"]
    assert CompletionRequest.model_validate({"prompt": [3, 4]}).prompts() == [[3, 4]]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    # OpenAI's default temperature is 1 (sampling), unlike gRPC's greedy default
    assert CompletionRequest.model_validate({"prompt": "hi"}).params(LIMITS).sampling.temperature == 1.0
    for field, value in [("n", 2), ("echo", True), ("logprobs", 1), ("best_of", 3), ("presence_penalty", 0.5),
                         ("suffix", "x"), ("logit_bias", {"5": 1.0})]:
        with pytest.raises(InvalidArgument) as caught:
            CompletionRequest.model_validate({"prompt": "hi", field: value}).params(LIMITS)
        assert caught.value.field == field


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "16"), ("max_tokens", 16.0), ("max_tokens", True), ("max_tokens", 1e308),
    ("temperature", "0.5"), ("temperature", True), ("top_p", "1"), ("top_k", 1.0), ("seed", "7"),
    ("stream", "yes"), ("stream", 1), ("echo", "false"), ("n", 1.0), ("model", 5), ("stop", 5), ("stop", [1]),
    ("prompt", [1.0]), ("prompt", [True]), ("prompt", [[1, 2]]), ("prompt", ["a", 1]), ("prompt", None),
    ("prompt", {"text": "x"}), ("stream_options", {"include_usage": 1}), ("logit_bias", {"5": "1"}),
    ("user", 3),
])
def test_wrong_json_types_are_refused_not_coerced(field, value):
    body = {"prompt": "hi", field: value}
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(body)
    # the error names the field the client sent (pydantic's union tags such as "prompt.str" left out)
    assert field_path(CompletionRequest, caught.value.errors()[0]["loc"]).split(".")[0] == field


def test_numbers_stay_numbers():
    """An integer is a valid float (temperature 1 is 1.0), and integers of any size reach the range checks."""
    body = CompletionRequest.model_validate({"prompt": [5, 2**64], "temperature": 1, "seed": 2**64})
    assert body.temperature == 1.0 and body.prompts() == [[5, 2**64]]
    with pytest.raises(InvalidArgument, match="^seed: "):
        body.params(LIMITS)


def test_field_path():
    assert field_path(CompletionRequest, ("prompt", "str")) == "prompt"
    assert field_path(CompletionRequest, ("stream_options", "include_usage")) == "stream_options.include_usage"
    assert field_path(CompletionRequest, ("frobnicate",)) == "frobnicate"  # an unknown field, by its name
    assert field_path(CompletionRequest, (12,)) is None  # invalid JSON: a character offset names no field
    assert field_path(CompletionRequest, ()) is None  # the body itself (not an object)
