"""A sequence's output text, kept up to date token by token without re-decoding it all.

Re-decoding the whole output after every token costs O(n) per token, O(n^2) per sequence, on
the engine thread. `IncrementalDetokenizer.update` decodes a short window of the last tokens
instead and reports the change as (keep, new): the text of all the ids is the previous text's
first `keep` characters followed by `new`. After every token that text is exactly
`tokenizer.decode(ids, skip_special_tokens=True)`, the U+FFFD of a character still incomplete
included: the stop-string search and a generation that ends mid-character see what they saw
when the engine re-decoded everything.

The window is vLLM's prefix and read offsets: the text of ids[read:] is decode(ids[prefix:])
less its first len(decode(ids[prefix:read])) characters; the prefix tokens give the decoder its
context (the leading space that Metaspace and Strip drop only at the very start, the byte
boundaries of byte-level BPE). New text is committed, and the window moves on, once no later
token can change it: it is not empty, does not end in U+FFFD, and its last token is neither a
skipped special token nor a byte-fallback token (`<0xC3>`): ByteFallback decodes a run of byte
tokens together and turns the whole run into U+FFFDs when a later byte makes it invalid. Until
then the new text is the text's tail, replaced at the next token.

Not `tokenizers.decoders.DecodeStream`, which runs the same window in Rust: its text equals the
full decode for our byte-level BPE and SentencePiece-style tokenizers once a character is
complete, but it returns nothing while the text ends in an incomplete character and has no
flush, so it cannot give the tail that the full decode has; it raises when a byte-fallback run
turns invalid; and it decodes with the Rust tokenizer alone, while transformers' decode may
post-process the whole text (clean_up_tokenization_spaces turns " do not" into " don't"),
which no window reproduces. A tokenizer with such post-processing, or without a fast backend,
gets the full decode after every token, as before.
"""

from __future__ import annotations

import re
import weakref
from typing import Callable, NamedTuple

_INCOMPLETE = "\ufffd"  # what the decoders give for bytes that are not (yet) a whole character
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Text on which transformers' clean_up_tokenization would change the decode, if it runs.
_PROBE_TEXT = "Hi . a , b ? c ! d ' e n't f 'm g 's h 've i 're j do not k can not"


class WindowDecoding(NamedTuple):
    decode: Callable[..., str]  # the fast backend's decode(ids, skip_special_tokens=...)
    held_ids: frozenset[int]  # tokens after which the text may still change: specials, byte pieces


_window_decodings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class IncrementalDetokenizer:
    """The text of one sequence's output ids; the engine makes one per sequence."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._window_decoding = window_decoding(tokenizer)  # None: a full decode per token
        self._num_ids = 0  # ids taken so far
        self._window: list[int] = []  # ids from the prefix offset on
        self._read = 0  # window[:read] is context, window[read:] has text not committed yet
        self._prefix_text = ""  # decode(window[:read])
        self._committed_len = 0  # characters of the text that no later token changes

    def update(self, ids: list[int]) -> tuple[int, str]:
        """Take the ids appended since the last call (`ids` is all of them) and return
        (keep, new): the text of `ids` is the previous text[:keep] + new."""
        if self._window_decoding is None:
            return self._full(ids)
        decode, held_ids = self._window_decoding
        keep, committed, tail = self._committed_len, [], ""
        for token_id in ids[self._num_ids :]:
            self._num_ids += 1
            self._window.append(token_id)
            text = decode(self._window, skip_special_tokens=True)
            if not text.startswith(self._prefix_text):  # the decoder is not local after all
                self._window_decoding = None
                return self._full(ids)
            tail = text[len(self._prefix_text) :]
            if tail and not tail.endswith(_INCOMPLETE) and token_id not in held_ids:
                committed.append(tail)
                self._committed_len += len(tail)
                tail = ""
                del self._window[: self._read]
                self._read = len(self._window)
                self._prefix_text = decode(self._window, skip_special_tokens=True)
        return keep, "".join(committed) + tail

    def _full(self, ids: list[int]) -> tuple[int, str]:
        self._num_ids = len(ids)
        return 0, self._tokenizer.decode(ids, skip_special_tokens=True)


def window_decoding(tokenizer) -> WindowDecoding | None:
    """How to decode windows: with the fast backend, when transformers' `decode` is the
    backend's and nothing more (no cleanup of spaces); else None. Probed once per tokenizer."""
    try:
        return _window_decodings[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoding = None
    if backend is not None:
        ids = tokenizer.encode(_PROBE_TEXT, add_special_tokens=False) + list(tokenizer.all_special_ids)
        if tokenizer.decode(ids, skip_special_tokens=True) == backend.decode(ids, skip_special_tokens=True):
            special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
            vocab = backend.get_vocab(with_added_tokens=False)
            byte_pieces = {i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece)}
            decoding = WindowDecoding(backend.decode, frozenset(special | byte_pieces))
    try:
        _window_decodings[tokenizer] = decoding
    except TypeError:  # not weakly referable: probed again for the next sequence
        pass
    return decoding
