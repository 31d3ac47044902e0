"""The streaming decoder: whole UTF-8 characters, stop strings across token boundaries,
work proportional to the new tokens, and the same text as decoding the ids at once."""

from __future__ import annotations

import random

import pytest
import torch

from llmscratch import GPT, GPTConfig, generate, get_tokenizer
from llmscratch.decoding.generate import stream_text
from llmscratch.decoding.streaming import StreamDecoder

GPT2 = get_tokenizer("gpt2")


class ByteTok:
    """One token per byte, as a byte-level BPE falls back to; counts the ids it decodes."""

    def __init__(self):
        self.decoded_ids = 0

    def decode(self, ids):
        self.decoded_ids += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


class BytesTok:
    """Each id is the given bytes."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


class PieceTok:
    """Each id is one of the given text pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def stream(decoder, ids):
    return list(decoder.pieces(ids))


def test_a_character_split_over_tokens_is_released_whole():
    text = "é😀a€"
    pieces = stream(StreamDecoder(ByteTok()), list(text.encode()))
    assert "".join(pieces) == text
    assert [p for p in pieces if p] == ["é", "😀", "a", "€"]  # never a half character
    assert all("\ufffd" not in p for p in pieces)
    # the emoji is 4 bytes: 3 pushes give nothing, the 4th gives the whole character
    assert pieces[2:6] == ["", "", "", "😀"]


def test_a_stop_string_split_over_two_tokens_ends_the_reply():
    tok = PieceTok(["Hello", "\nUs", "er: what", " more"])
    d = StreamDecoder(tok, stop=["\nUser:"])
    assert d.push(0) == "Hello"
    assert d.push(1) == ""  # "\nUs" may be the start of "\nUser:": held back
    assert d.push(2) == "" and d.stopped and d.stop_found == "\nUser:"
    assert d.push(3) == "" and d.flush() == ""  # nothing after the stop
    assert d.finish_reason == "stop" and d.n_tokens == 3
    assert stream(StreamDecoder(tok, stop=["\nUser:"]), [0, 1, 2, 3]) == ["Hello", "", ""]


def test_a_prefix_that_turns_out_not_to_be_a_stop_is_released():
    tok = PieceTok(["a", "\nU", "nder", "\n", "Us"])
    d = StreamDecoder(tok, stop=["\nUser:"])
    assert [d.push(i) for i in (0, 1, 2)] == ["a", "", "\nUnder"]
    assert not d.stopped
    # held back at the end of generation: released by flush, not lost
    assert d.push(3) == "" and d.push(4) == "" and d.flush() == "\nUs"
    assert d.finish_reason is None and d.text == "a\nUnder\nUs"


def test_end_of_text_stops_without_text_and_releases_what_was_held():
    tok = PieceTok(["Hi", "\nUs", "<eot>"])
    pieces = stream(d := StreamDecoder(tok, stop=["\nUser:"], eos_id=2), [0, 1, 2, 0])
    assert pieces == ["Hi", "", "", "\nUs"] and d.n_tokens == 2 and d.finish_reason == "stop"


@pytest.mark.parametrize("seed", range(5))
def test_pieces_equal_decoding_all_the_ids_at_once(seed):
    rng = random.Random(seed)
    text = "Zürich, 東京 and 🦙🦙 cost 5€. " * 3
    ids = GPT2.encode(text)
    ids = ids + [rng.randrange(GPT2.vocab_size - 1) for _ in range(40)]  # any bytes at all
    assert "".join(stream(StreamDecoder(GPT2), ids)) == GPT2.decode(ids)
    # with a stop string: the text before its first occurrence
    full = GPT2.decode(ids)
    stop = full[rng.randrange(5, 40):][:3]
    assert "".join(stream(StreamDecoder(GPT2, stop=[stop, "\x00never"]), ids)) == full[: full.index(stop)]


def test_each_token_decodes_only_the_few_ids_held_back():
    """O(new tokens): a 2000-byte reply decodes about 2000 ids in all, not 2000^2 / 2."""
    tok = ByteTok()
    text = ("naïve café 😀 " * 200)[:2000]
    ids = list(text.encode())
    assert "".join(stream(StreamDecoder(tok, stop=["\nUser:"]), ids)) == text
    assert tok.decoded_ids <= 3 * len(ids)
    # also when the bytes are invalid for good (they decode to U+FFFD however long one waits)
    tok = ByteTok()
    ids = [0x80] * 1000 + list("é".encode()) + [0xE2, 0x82] * 300 + list(b"end")
    assert "".join(stream(StreamDecoder(tok), ids)) == bytes(ids).decode("utf-8", errors="replace")
    assert tok.decoded_ids <= 16 * len(ids)  # a bounded amount per token, not one growing with the run
    # and a character the release would cut in two is kept whole: 3 stray bytes, "\xc3" |
    # "\xa9\xe2" (the "é" ends, a "€" starts), "\x82", "\xe2", "\xac"
    tok = BytesTok([b"\x80", b"\xc3", b"\xa9\xe2", b"\x82", b"\xe2", b"\xac"])
    ids = [0, 0, 0, 1, 2, 3, 4, 3, 5]
    assert "".join(stream(StreamDecoder(tok), ids)) == "\ufffd\ufffd\ufffdé\ufffd€"


def test_stream_text_stops_at_a_stop_string_like_the_whole_decode():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=64, n_embd=16, n_layer=2, n_head=2)).eval()
    prompt = "In the beginning"
    ids = GPT2.encode(prompt)
    new = generate(model, torch.tensor([ids]), 24)[0, len(ids):].tolist()
    full = GPT2.decode(new[: new.index(GPT2.eot_id)] if GPT2.eot_id in new else new)
    assert "".join(stream_text(model, GPT2, prompt, 24)) == full
    assert len(full) > 12
    stop = full[6:9]
    assert "".join(stream_text(model, GPT2, prompt, 24, stop=[stop])) == full[: full.index(stop)]


# ------------------------------------------------------------- push by push, by hand

class CharTokenizer:
    """Each id is one character of `chars` (ids past it: half of a UTF-8 'é')."""

    def __init__(self, chars):
        self.chars = chars

    def decode(self, ids):
        raw = b"".join(self.chars[i].encode() if i < len(self.chars) else b"\xc3" if i == 100 else b"\xa9"
                       for i in ids)
        return raw.decode("utf-8", errors="replace")


def test_holds_back_partial_stops_and_characters():
    tok = CharTokenizer("ab\n#")
    t = StreamDecoder(tok, stop=["\n##"])
    out = [t.push(i) for i in (0, 1, 2, 3)]  # "a", "b", "\n" (may start the stop), "#"
    assert out == ["a", "b", "", ""] and not t.stopped
    assert t.push(0) == "\n#a"  # "\n#a" cannot become "\n##" any more: released
    assert t.push(2) == "" and t.push(3) == "" and t.push(3) == ""
    assert t.stopped and t.text.endswith("\n##") and t.flush() == ""
    # a character split over two tokens is released whole
    u = StreamDecoder(tok)
    assert u.push(100) == "" and u.push(101) == "é" and u.flush() == ""
    # no stop: flush releases what was held
    v = StreamDecoder(tok, stop=["ab\n"])
    assert v.push(0) == "" and v.push(1) == "" and v.flush() == "ab"
