"""The keys and values of recent conversation turns, one per conversation.

A conversation's next turn starts with the whole previous turn (its prompt and its
reply), so with that turn's keys and values at hand it prefills only its new message.
A terminal chat needs one stored turn; a server or web page where several people take
turns needs one per conversation, or each newcomer evicts the others. Turns are kept
most recent first, bounded by a count and by bytes. The newest turn is always kept, even
alone over the byte bound: one large model's long conversation is still worth reusing.
"""
from __future__ import annotations

import torch

from .types import StoredPrefix


def _extends(new: StoredPrefix, old: StoredPrefix) -> bool:
    """Whether ``new`` starts with all of ``old`` (the same conversation, later): ``old`` is then stale."""
    if len(new.ids) < len(old.ids) or new.ids[: len(old.ids)] != old.ids:
        return False
    if old.images is None or len(old.images) == 0:
        return True
    return new.images is not None and len(new.images) >= len(old.images) and torch.equal(
        new.images[: len(old.images)], old.images)


def stored_bytes(turn: StoredPrefix) -> int:
    """Memory a stored turn keeps alive. Its keys and values are views into its batch's
    preallocated cache, so the whole buffers count, each once."""
    seen: dict[int, int] = {}
    tensors = [t for kv in turn.kv for t in kv] + ([turn.images] if turn.images is not None else [])
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class TurnStore:
    def __init__(self, max_turns: int = 8, max_bytes: int = 1 << 30):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self.max_bytes = max_bytes
        self._turns: list[StoredPrefix] = []  # most recent first

    def __len__(self) -> int:
        return len(self._turns)

    def recent(self) -> list[StoredPrefix]:
        """The stored turns, most recently stored or used first."""
        return list(self._turns)

    @property
    def last(self) -> StoredPrefix | None:
        return self._turns[0] if self._turns else None

    @property
    def nbytes(self) -> int:
        return sum(stored_bytes(t) for t in self._turns)

    def add(self, turn: StoredPrefix, replaces: StoredPrefix | None = None) -> None:
        """Store ``turn``, most recent. ``replaces``: the stored turn whose whole prompt its prompt
        held (the conversation's previous state; the reply re-encoded in the prompt may not repeat
        the generated tokens, so it need not be a prefix). Both it and any stored prefix of ``turn``
        go."""
        self._turns = [turn] + [t for t in self._turns if t is not replaces and not _extends(turn, t)]
        del self._turns[self.max_turns:]
        while len(self._turns) > 1 and self.nbytes > self.max_bytes:
            self._turns.pop()

    def touch(self, turn: StoredPrefix) -> None:
        """Mark ``turn`` as just used, so that it is evicted last."""
        for i, t in enumerate(self._turns):
            if t is turn:
                self._turns.insert(0, self._turns.pop(i))
                return
