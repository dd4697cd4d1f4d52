"""``IncrementalDetokenizer``: streaming token ids -> text deltas, never splitting a multi-byte character."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ['IncrementalDetokenizer']

_MAX_PENDING = 8  # tokens held back waiting for a multi-byte character to complete


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

    Decodes only a short window of recent tokens per step, so cost does not grow with length. Bytes that
    never form a character (after ``_MAX_PENDING`` tokens) are let through as U+FFFD.
    """

    __slots__ = ('tokenizer', 'token_ids', 'read_offset', 'prefix_text')

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = list(prompt_token_ids[-6:])  # context for the first tokens' spacing
        self.read_offset = len(self.token_ids)
        self.prefix_text = self._decode(self.token_ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self.token_ids.append(token_id)
        new_text = self._decode(self.token_ids)
        pending = len(self.token_ids) - self.read_offset
        if new_text.endswith('\ufffd') and pending < _MAX_PENDING:
            return ''
        delta = new_text[len(self.prefix_text):]
        del self.token_ids[:self.read_offset]  # keep only the window: cost stays flat with length
        self.read_offset = len(self.token_ids)
        self.prefix_text = self._decode(self.token_ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ''
