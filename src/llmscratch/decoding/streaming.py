"""Streaming decode: generated token ids in, final text pieces out.

`generate.stream_text`, `chat` and `serve` show a reply while it is being generated, and
all three meet the same two problems, solved here once:

- A byte-level BPE token can end inside a UTF-8 character ("é" may be two tokens of one
  byte each). Decoding it alone gives U+FFFD, so the ids since the last whole character
  are kept back until they decode to whole characters.
- A stop string can arrive split over several tokens ("\\nUser:" as "\\n", "User", ":").
  Text that could still be the start of a stop string is held back until the next tokens
  show whether it is one; if it is not, it is released unchanged.

Each token costs the decoding of the few ids kept back and a stop-string search over the
few characters held back: the work is proportional to the new tokens, not to the length of
the reply so far. Joined, the pieces equal `tokenizer.decode(ids)` of the whole reply (cut
before the stop string, if one was found).
"""

from __future__ import annotations

from typing import Iterable, Iterator

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 character decodes to


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text pieces that will not change.

    Args:
        tokenizer: anything with `decode(ids) -> str` (decoding concatenated ids must give
            the concatenated text, true of every llmscratch tokenizer).
        stop: strings that end the reply; the reply is the text before the first one.
        eos_id: the end-of-text id (or None): pushing it ends the reply without text.

    Attributes:
        stopped: the reply has ended (a stop string or `eos_id`); further pushes are ignored.
        stop_found: the stop string that ended it, if one did.
        n_tokens: ids pushed before the end (`eos_id` not counted): the usage count.

    Example (stop "\\n\\n"): tokens "Hi", "\\n", "\\n", "more" -> pieces "Hi", "", "" and
    `stopped` (the "\\n" was held back, then turned out to begin the stop string).
    """

    def __init__(self, tokenizer, stop: Iterable[str] = (), eos_id: int | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop if s]
        self.eos_id = eos_id
        self.stopped = False
        self.stop_found: str | None = None
        self.n_tokens = 0
        self._ids: list[int] = []  # ids not yet decoded into whole characters
        self._held = ""  # decoded text not yet released (it may begin a stop string)
        self._decoded: list[str] = []  # every decoded chunk, for `text`

    @property
    def finish_reason(self) -> str | None:
        """`"stop"` once the reply has ended by itself, else None (ran out of tokens)."""
        return "stop" if self.stopped else None

    @property
    def text(self) -> str:
        """Everything decoded so far (a stop string included): for inspection, O(length)."""
        return "".join(self._decoded)

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (often "")."""
        if self.stopped:
            return ""
        if token == self.eos_id:
            self.stopped = True
            return ""
        self.n_tokens += 1
        self._ids.append(token)
        chunk = self.tokenizer.decode(self._ids)
        if not chunk.endswith(REPLACEMENT):
            self._ids = []
        elif len(self._ids) <= 6:
            return ""  # an incomplete character: wait for the rest of it
        else:
            # Bytes that stay invalid (a run of stray continuation bytes) would make every
            # push decode a growing list. A character needs at most 3 more bytes, so the
            # ids before the last 3 are final once decoding them apart changes nothing.
            head, tail = self.tokenizer.decode(self._ids[:-3]), self.tokenizer.decode(self._ids[-3:])
            if head + tail != chunk:
                return ""
            chunk, self._ids = head, self._ids[-3:]
        self._decoded.append(chunk)
        held = self._held + chunk
        # Released text never ends with the start of a stop string, so a stop can only
        # begin inside the held-back text: search there, not in the whole reply.
        hits = [(i, s) for s in self.stops if (i := held.find(s)) >= 0]
        if hits:
            i, self.stop_found = min(hits)
            self.stopped = True
            self._held = ""
            return held[:i]
        keep = self._longest_stop_prefix(held)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def flush(self) -> str:
        """The text still held back, once generation has ended (none after a stop string)."""
        if self.stop_found is not None:
            return ""
        rest = self._held + (self.tokenizer.decode(self._ids) if self._ids else "")
        if self._ids:
            self._decoded.append(self.tokenizer.decode(self._ids))
        self._held, self._ids = "", []
        return rest

    def pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """Push `tokens` until the reply ends, yielding each push's text ("" while held back,
        so a consumer can act between tokens), then what `flush` releases."""
        for t in tokens:
            yield self.push(t)
            if self.stopped:
                break
        rest = self.flush()
        if rest:
            yield rest

    def _longest_stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best
