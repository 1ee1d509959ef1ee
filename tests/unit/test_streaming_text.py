"""StreamingText: released pieces add up to the final text; stop-string prefixes are held back."""

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
