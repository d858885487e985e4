"""Generated token ids -> text pieces as they arrive, for printing while the model decodes.

Decoding one token at a time is wrong in two ways with a Gemma (SentencePiece-style)
tokenizer: a character outside the vocabulary arrives as several byte-fallback tokens
(<0xE3> <0x81> <0x82> = "あ"), each meaningless alone, and a decoder may treat the first
token of a sequence specially (a leading "▁" -> " " stripped). So each step decodes a small
window instead, the way text-generation-inference's `decode_token` and transformers'
TextStreamer do:

    ids:      ... | a  b | c  d  e
                    ^prefix ^read   (a b: already emitted, kept as context)
    window  = decode(ids[prefix:])            "ab" + "cde"
    emitted = decode(ids[prefix:read])        "ab"
    piece   = window[len(emitted):]           "cde", unless it ends in U+FFFD (an
                                               incomplete UTF-8 sequence): then held back

Both decodes start at the same token, so whatever a decoder does to its first token it
does to both, and the pieces concatenate to tokenizer.decode(all ids). Stopping at an end
token is the runner's job; a streamer only turns ids into text.
"""

from __future__ import annotations

from typing import Protocol


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


_REPLACEMENT = "\ufffd"  # what ByteFallback yields for bytes that are not (yet) valid UTF-8


class TextStreamer:
    """Feed generated ids one at a time with `push`; call `flush` once at the end."""

    def __init__(self, tokenizer: _Decoder, *, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (one emitted chunk of context)
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._ids[self._prefix:self._read])
        window = self._decode(self._ids[self._prefix:])
        if len(window) <= len(emitted) or window.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished byte sequence decodes to U+FFFD, as
        tokenizer.decode would render it); the streamer can then take a new sequence."""
        emitted = self._decode(self._ids[self._prefix:self._read])
        window = self._decode(self._ids[self._prefix:])
        self.reset()
        return window[len(emitted):]

    def reset(self) -> None:
        self._ids.clear()
        self._prefix = self._read = 0

    @property
    def token_ids(self) -> list[int]:
        """Ids pushed since the last flush or reset."""
        return list(self._ids)


class ChannelStreamer:
    """Generated ids -> (thought piece, answer piece): Gemma 4 thinks inside a channel,
    `<|channel>thought\n ... <channel|>`, before it answers. Each side has its own
    TextStreamer; the channel markers and the channel's name line are not text."""

    def __init__(self, tokenizer: _Decoder, *, open_id: int | None, close_id: int | None) -> None:
        self.thought = TextStreamer(tokenizer)
        self.answer = TextStreamer(tokenizer)
        self._open, self._close = open_id, close_id
        self._in_channel = False
        self._name: str | None = ""  # the channel's name line while it arrives ("thought"); None once dropped

    def push(self, token_id: int) -> tuple[str, str]:
        if token_id == self._open:
            self._in_channel, self._name = True, ""
            return "", ""
        if token_id == self._close:
            was_open, self._in_channel = self._in_channel, False
            return (self._unnamed(self.thought.flush()) if was_open else ""), ""
        if self._in_channel:
            return self._unnamed(self.thought.push(token_id)), ""
        return "", self.answer.push(token_id)

    def _unnamed(self, piece: str) -> str:
        """Thought text without the channel's name line."""
        if self._name is None:
            return piece
        self._name += piece
        if "\n" not in self._name:
            return ""
        rest, self._name = self._name.split("\n", 1)[1], None
        return rest

    def flush(self) -> tuple[str, str]:
        thought = self._unnamed(self.thought.flush()) if self._in_channel else ""
        return thought, self.answer.flush()


__all__ = ["ChannelStreamer", "TextStreamer"]
