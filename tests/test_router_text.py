"""Incremental detokenization: the streamed deltas always concatenate to the final text, never
show half a UTF-8 character or the beginning of a stop string, and end right before a stop."""

from __future__ import annotations

import random

import pytest

from router.text_stream import TextStream
from tests.router_stack import tiny_tokenizer

TOK = tiny_tokenizer()


def decode(ids):
    return TOK.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def encode(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def stream(ids, stop=(), chunks=None):
    s = TextStream(decode, list(stop))
    pieces, i = [], 0
    rng = random.Random(0)
    while i < len(ids) and not s.stopped:
        n = chunks or rng.randint(1, 3)
        pieces.append(s.push(ids[i : i + n]))
        i += n
    pieces.append(s.finish())
    return pieces, s


def test_multibyte_characters_are_never_split():
    text = "héllo → wörld 你好 🎉!"
    ids = encode(text)
    assert len(ids) > len(text)  # several tokens per character
    pieces, _ = stream(ids, chunks=1)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_concatenate_to_the_final_text(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(256) for _ in range(rng.randint(1, 60))]
    pieces, _ = stream(ids)
    assert "".join(pieces) == decode(ids)


def test_stop_string_trims_and_holds_back_prefixes():
    ids = encode("one two END three")
    pieces, s = stream(ids, stop=["END"], chunks=1)
    assert "".join(pieces) == "one two " and s.stopped
    assert not any("E" in p for p in pieces)  # "E", "EN" were held back, then dropped


def test_held_back_prefix_that_does_not_complete_is_released():
    ids = encode("an ENd and ENDING")
    pieces, s = stream(ids, stop=["END"], chunks=1)
    assert "".join(pieces) == "an ENd and " and s.stopped


def test_earliest_of_several_stop_strings_wins():
    ids = encode("abc xyz 123")
    pieces, _ = stream(ids, stop=["123", "xyz"], chunks=4)
    assert "".join(pieces) == "abc "


def test_stop_string_spanning_a_multibyte_character():
    ids = encode("price: 5€ and more")
    pieces, _ = stream(ids, stop=["5€"], chunks=1)
    assert "".join(pieces) == "price: "


def test_no_stop_flushes_everything_at_the_end():
    ids = encode("ends with a partial ") + [0xE2, 0x82]  # an incomplete "€"
    pieces, _ = stream(ids, chunks=1)
    assert "".join(pieces) == decode(ids) and pieces[-1].endswith("\ufffd")
