"""StreamingText: released pieces add up to the final text; stop-string prefixes are held back."""

import random

from transformers import AutoTokenizer

from hispec.models import DEFAULT_MODEL
from hispec.serving.engine_build import detokenizer
from hispec.speculation.request import cut_at_stop
from hispec.speculation.stops import StopFinder
from hispec.speculation.text import StreamingText

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\ufffd", 6: "!", 7: "#", 8: "#"}


def detokenize(ids):
    text = "".join(PIECES[i] for i in ids)
    return text.replace("\ufffd!", "é!")  # token 5 is half of a character that token 6 completes


def test_pieces_add_up_and_hold_back():
    text = StreamingText(detokenize, stops=("world!",))
    assert text.push([1, 2]) == "Hello"
    assert text.push([3]) == " "  # "wor" could start "world!": held back
    assert text.push([4]) == ""  # so could "world"
    assert text.finish("Hello world") == "world"


def test_split_characters_wait_for_their_second_half():
    text = StreamingText(detokenize)
    assert text.push([1, 5]) == "Hel"
    assert text.push([6]) == "é!"


def test_stop_cuts_text():
    text = StreamingText(detokenize, stops=("##",))
    out = text.push([1, 2]) + text.push([7]) + text.push([8, 3])
    assert out == "Hello"
    assert text.finish("Hello") == ""


# ---- on the bundled tokenizer --------------------------------------------------------------------
def test_streams_on_the_bundled_tokenizer_add_up_to_the_engines_final_text():
    """As the replica streams: the engine commits runs of tokens and ends at the fewest tokens that
    show a stop string; the pieces released along the way are always a prefix of the final text
    (cut at the stop), never show a stop, and add up to it."""
    from tests.unit.test_incremental_text import chunked, sequences, stops_from

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    decode = detokenizer(tokenizer)
    rng = random.Random(3)
    stopped = 0
    for name, ids in sequences(tokenizer, decode, count=6):
        for trial in range(4):
            stops = stops_from(decode(ids), rng) if trial else ()
            finder = StopFinder(decode, stops) if stops else None
            committed = []
            for chunk in chunked(ids, 0, rng):
                found = finder.push(chunk) if finder else None
                committed += chunk[: found[0] - len(committed)] if found else chunk
                if found:
                    break
            final = cut_at_stop(decode(committed), stops)[0]
            text, released = StreamingText(decode, stops), ""
            for chunk in chunked(committed, 0, rng):
                released += text.push(chunk)
                assert final.startswith(released), (name, trial)
                assert cut_at_stop(released, stops)[1] is None
            if found:
                stopped += 1
                assert released == final, (name, trial)  # the last push showed the stop: all of it released
            assert released + text.finish(final) == final
    assert stopped > 50


def test_text_before_a_possible_stop_is_released_at_once():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    decode = detokenizer(tokenizer)
    ids = tokenizer.encode("print('日本語')\nreturn value", add_special_tokens=False)
    text = StreamingText(decode, stops=("\nreturn",))
    out = [text.push([t]) for t in ids]
    released = "".join(out)
    assert released == "print('日本語')"  # "\nreturn" then showed: the rest is cut
    # a multi-byte character is released whole, in the push of its last byte
    assert "日" in out and all("\ufffd" not in piece for piece in out)
