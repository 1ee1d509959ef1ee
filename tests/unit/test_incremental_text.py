"""IncrementalText and StopFinder on the bundled tokenizer: the same text and the same stops as
decoding the whole continuation every time, for a cost linear in its length."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from hispec.models import DEFAULT_MODEL
from hispec.serving.engine_build import detokenizer
from hispec.speculation.detokenize import IncrementalText
from hispec.speculation.request import cut_at_stop
from hispec.speculation.stops import StopFinder
from hispec.speculation.text import StreamingText

UNICODE_TEXT = (
    "Grüße aus Köln: naïve café, façade, smörgåsbord. Ελληνικά κείμενα, кириллица и ёжик. "
    "日本語のテキストと中文字符，한국어 문장. Emoji 😀🎉👩‍💻🇫🇷 and math ∑∫√∞≠≤ ← → ✓. "
    "def f(x):\n    return x ** 2  # ∂f/∂x = 2x\n\t\"quoted\" 'text' — dash… ellipsis\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def decode(tokenizer):
    return detokenizer(tokenizer)  # how the engine and the replica decode


def real_text_ids(tokenizer) -> list[int]:
    prompts = [json.loads(line)["prompt"] for line in (DEFAULT_MODEL / "heldout_prompts.jsonl").read_text().splitlines()]
    return tokenizer.encode(UNICODE_TEXT + "".join(prompts[:3]) + UNICODE_TEXT, add_special_tokens=False)


def non_ascii_ids(decode, vocab_size) -> list[int]:
    """Tokens whose text alone is not plain ASCII: pieces of multi-byte characters."""
    return [i for i in range(vocab_size) if not decode([i]).isascii()]


def sequences(tokenizer, decode, count=12, length=160):
    """Token lists: real text, random tokens from the whole vocab (special ones too), and random
    pieces of multi-byte characters (mostly invalid UTF-8), in (name, ids) pairs."""
    rng = random.Random(1234)
    vocab = len(tokenizer)
    unicode_pieces = non_ascii_ids(decode, vocab)
    text_ids = real_text_ids(tokenizer)
    yield "text", text_ids
    for n in range(count):
        yield f"vocab{n}", [rng.randrange(vocab) for _ in range(length)]
        yield f"unicode{n}", [rng.choice(unicode_pieces) for _ in range(length)]
        # mixes: runs of multi-byte pieces between ordinary tokens
        yield f"mix{n}", [rng.choice(unicode_pieces) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(length)]
        start = rng.randrange(len(text_ids) - length)
        yield f"slice{n}", text_ids[start : start + length]  # starts mid-text: maybe mid-character


def chunked(ids, size, rng=None):
    """`ids` in runs of `size` (or of random sizes 1..8 with `rng`)."""
    i = 0
    while i < len(ids):
        n = rng.randint(1, 8) if rng else size
        yield ids[i : i + n]
        i += n


def test_the_bundled_tokenizer_splits_characters_so_suffixes_alone_decode_differently(tokenizer, decode):
    """Why windows are needed: a suffix decoded alone is not the suffix of the whole decode."""
    ids = tokenizer.encode(UNICODE_TEXT, add_special_tokens=False)
    whole = decode(ids)
    differ = [k for k in range(1, len(ids)) if decode(ids[:k]) + decode(ids[k:]) != whole]
    assert len(differ) > 20


@pytest.mark.parametrize("size", range(1, 9))
def test_stable_plus_pending_is_the_whole_decode_after_every_push(tokenizer, decode, size):
    for name, ids in sequences(tokenizer, decode):
        text, stable, pushed = IncrementalText(decode), "", []
        for chunk in chunked(ids, size):
            pushed += chunk
            stable += text.push(chunk)
            assert stable + text.pending == decode(pushed), (name, len(pushed))
            assert text.pending_tokens <= size + 4, name  # the text not yet stable stays a few tokens'
        assert text.text == decode(ids)
        assert text.resyncs == 0  # the windows did it all: the whole list was never decoded


def test_random_push_sizes(tokenizer, decode):
    rng = random.Random(7)
    for name, ids in sequences(tokenizer, decode):
        text, stable, pushed = IncrementalText(decode), "", []
        for chunk in chunked(ids, 0, rng):
            pushed += chunk
            stable += text.push(chunk)
            assert stable + text.pending == decode(pushed), (name, len(pushed))
        assert text.resyncs == 0


def test_rewind_returns_to_the_mark(tokenizer, decode):
    ids = real_text_ids(tokenizer)[:60]
    text = IncrementalText(decode)
    text.push(ids[:30])
    mark, before = text.mark(), text.text
    text.push(ids[30:45])
    text.rewind(mark)
    assert text.tokens == ids[:30] and text.text == before
    text.push(ids[30:])
    assert text.text == decode(ids)


def test_a_decoder_that_rewrites_earlier_text_falls_back_to_the_whole_decode():
    """Not byte-level BPE: " ," decodes as "," (a cleanup rule), so a token changes the text
    before it. The window sees its context change and decodes the whole list instead; text already
    stable stays as it was, the rest follows the whole decode (as the old length-based stream did)."""
    pieces = {1: "a", 2: " ", 3: ",", 4: "b"}

    def cleanup(ids):
        return "".join(pieces[i] for i in ids).replace(" ,", ",")

    text, stable = IncrementalText(cleanup), ""
    for token in [1, 2, 4, 2, 3, 4, 1]:
        stable += text.push([token])
    assert text.resyncs > 0
    assert stable == "a b " + "ba"  # "a b ,ba" decodes as "a b,ba": the released space stays
    assert len(stable) == len(cleanup([1, 2, 4, 2, 3, 4, 1]))


# ---- stop strings --------------------------------------------------------------------------------
def reference_find_stop_string(detokenize, generated, seen, stop_strings):
    """The old whole-text search, kept as the reference: (tokens to keep, stop string) for the
    first stop string completed after `seen` tokens of `generated`, or None."""
    if cut_at_stop(detokenize(generated), stop_strings)[1] is None:
        return None
    for count in range(max(seen, 1), len(generated) + 1):
        _, stop = cut_at_stop(detokenize(generated[:count]), stop_strings)
        if stop is not None:
            return count, stop
    return None


def stops_from(text, rng):
    """1-3 stop strings taken from `text` (so they hit; 1-12 characters, so many span tokens),
    sometimes with one that never occurs."""
    stops = []
    for _ in range(rng.randint(1, 3)):
        n = rng.randint(1, 12)
        start = rng.randrange(max(1, len(text) - n))
        stops.append(text[start : start + n] or "x")
    if rng.random() < 0.3:
        stops.append("\x00never\x00")
    return tuple(stops)


def commits(finder_or_reference, ids, rng):
    """Feed `ids` in commits of 1..8 tokens, as the scheduler does; the first hit, or None."""
    seen = 0
    for chunk in chunked(ids, 0, rng):
        found = finder_or_reference(seen, seen + len(chunk), chunk)
        if found is not None:
            return found
        seen += len(chunk)
    return None


def test_stop_finder_matches_the_whole_text_search(tokenizer, decode):
    rng = random.Random(99)
    hits = spanning = 0
    for name, ids in sequences(tokenizer, decode, count=8):
        whole = decode(ids)
        for trial in range(7):
            stops = stops_from(whole, rng) if trial else ("\x00never\x00",)
            split_seed = rng.random()
            finder = StopFinder(decode, stops)
            found = commits(lambda seen, end, chunk: finder.push(chunk), ids, random.Random(split_seed))
            expected = commits(lambda seen, end, chunk: reference_find_stop_string(decode, ids[:end], seen, stops),
                               ids, random.Random(split_seed))
            assert found == expected, (name, trial, stops)
            if found is not None:
                hits += 1
                count, stop = found
                assert stop in decode(ids[:count]) and not cut_at_stop(decode(ids[: count - 1]), stops)[1]
                # the stop's text starts before the last token's: it spans a token boundary
                spanning += len(decode(ids[: count - 1])) > decode(ids[:count]).find(stop)
    assert hits > 150 and spanning > 30, (hits, spanning)


def test_stop_strings_within_one_commit_end_at_the_fewest_tokens(decode, tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta epsilon", add_special_tokens=False)
    finder = StopFinder(decode, ("delta", "mm"))
    count, stop = finder.push(ids)  # one commit of every token
    assert stop == "mm" and decode(ids[:count]).startswith("alpha beta gamm") and "mm" not in decode(ids[: count - 1])
    assert finder.count == count  # where the sequence ends


# ---- cost ----------------------------------------------------------------------------------------
class CountingDecode:
    """detokenize, counting the tokens it decodes."""

    def __init__(self, decode):
        self.decode, self.tokens = decode, 0

    def __call__(self, ids):
        self.tokens += len(ids)
        return self.decode(ids)


def long_continuation(tokenizer, decode, n=2000):
    text_ids = real_text_ids(tokenizer)
    rng = random.Random(5)
    unicode_pieces = non_ascii_ids(decode, len(tokenizer))
    ids = []
    while len(ids) < n:  # real text with runs of stray multi-byte pieces (text that never settles)
        start = rng.randrange(len(text_ids) - 50)
        ids += text_ids[start : start + 50] + [rng.choice(unicode_pieces) for _ in range(rng.randint(0, 12))]
    return ids[:n]


@pytest.mark.parametrize("user", ["incremental", "stop finder", "streaming"])
def test_decoding_cost_is_linear(tokenizer, decode, user):
    ids = long_continuation(tokenizer, decode)
    n = len(ids)
    counting = CountingDecode(decode)
    never = ("\x00never\x00", "zzzzzzzzzzzzzzzzzzz")  # searched at every push, never found
    push = {"incremental": IncrementalText(counting).push, "stop finder": StopFinder(counting, never).push,
            "streaming": StreamingText(counting, never).push}[user]
    out = "".join(push([t]) or "" for t in ids)
    assert counting.tokens < 40 * n, counting.tokens  # decoding everything at every push: ~n^2/2 = 2,000,000
    if user != "stop finder":
        assert decode(ids).startswith(out) and len(out) > 0.9 * len(decode(ids))
