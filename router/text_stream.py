"""Incremental detokenization with stop strings: turns the growing token list of one generation
into text deltas that are safe to send.

Each push decodes the whole running token list and emits only the new suffix, holding back (a)
trailing U+FFFD, i.e. an incomplete UTF-8 sequence that a later byte token may complete, and (b)
the longest tail that is a prefix of some stop string. When a stop string appears, the text ends
right before it. The concatenated deltas always equal the final text."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._tokens: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, tokens: list[int]) -> str:
        """Add tokens; return the new text that is safe to emit (may be empty). After a stop
        string, `stopped` is True and later pushes return ''."""
        if self.stopped:
            return ""
        self._tokens.extend(tokens)
        full = self._decode(self._tokens)
        base = len(self.text)
        hit = self._find_stop(full, base)
        if hit is not None:
            self.stopped = True
            return self._emit(full, hit)
        end = len(full)
        while end > base and full[end - 1] == REPLACEMENT:
            end -= 1
        end -= self._stop_prefix_tail(full, base, end)
        return self._emit(full, end)

    def finish(self) -> str:
        """The generation ended: emit everything still held back."""
        if self.stopped:
            return ""
        return self._emit(self._decode(self._tokens), None)

    def _emit(self, full: str, end: int | None) -> str:
        base = len(self.text)
        piece = full[base:end] if end is None or end > base else ""
        self.text += piece
        return piece

    def _find_stop(self, full: str, base: int) -> int | None:
        hits = [i for s in self._stop if (i := full.find(s, max(0, base - len(s) + 1))) != -1]
        return min(hits) if hits else None

    def _stop_prefix_tail(self, full: str, base: int, end: int) -> int:
        """Length of the longest full[k:end] (k >= base) that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self._stop), default=0)
        for n in range(min(longest - 1, end - base), 0, -1):
            tail = full[end - n : end]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
