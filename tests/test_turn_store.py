"""The store of recent conversation turns: one per conversation, most recent first, bounded."""
from __future__ import annotations

import pytest
import torch

from vistune.infer.turn_store import TurnStore, stored_bytes
from vistune.infer.types import StoredPrefix


def turn(ids: list[int], images: torch.Tensor | None = None, width: int = 4) -> StoredPrefix:
    kv = torch.zeros(1, 2, len(ids), width)
    return StoredPrefix(ids, [(kv, kv.clone())], images)


def test_a_later_turn_replaces_its_conversations_earlier_one():
    store = TurnStore(max_turns=4)
    a1, b1 = turn([1, 2, 3]), turn([1, 5, 6])
    store.add(a1)
    store.add(b1)
    a2 = turn([1, 2, 3, 9, 9])
    store.add(a2)
    assert store.recent() == [a2, b1]  # a1 is a prefix of a2: stale


def test_the_same_tokens_with_another_image_are_another_conversation():
    store = TurnStore()
    first = turn([7, 7, 1], images=torch.ones(1, 3))
    store.add(first)
    other = turn([7, 7, 1, 2], images=torch.zeros(1, 3))
    store.add(other)
    assert store.recent() == [other, first]
    later = turn([7, 7, 1, 2, 3], images=torch.zeros(1, 3))
    store.add(later)
    assert store.recent() == [later, first]


def test_the_least_recently_used_turn_goes_first():
    store = TurnStore(max_turns=2)
    a, b, c = turn([1]), turn([2]), turn([3])
    store.add(a)
    store.add(b)
    store.touch(a)  # a was just used: b is now the oldest
    store.add(c)
    assert store.recent() == [c, a]
    assert store.last is c


def test_the_byte_bound_keeps_the_newest_turn_even_alone():
    one = stored_bytes(turn([1] * 10))
    assert one == 2 * 10 * 2 * 4 * 4  # keys and values, float32
    store = TurnStore(max_turns=8, max_bytes=int(2.5 * one))
    for i in range(4):
        store.add(turn([i] * 10))
    assert [t.ids[0] for t in store.recent()] == [3, 2]
    store.add(big := turn([9] * 100))
    assert store.recent() == [big]


def test_views_of_one_buffer_count_once():
    buf = torch.zeros(1, 2, 100, 4)
    t = StoredPrefix([1] * 10, [(buf[:, :, :10], buf[:, :, :10]), (buf[:, :, :5], buf[:, :, :5])])
    assert stored_bytes(t) == buf.numel() * 4  # the whole buffer stays alive, once


def test_at_least_one_turn():
    with pytest.raises(ValueError, match="max_turns"):
        TurnStore(max_turns=0)


def test_the_turn_a_prompt_started_from_is_replaced():
    store = TurnStore()
    a1, b1 = turn([1, 2, 3]), turn([4, 5])
    store.add(a1)
    store.add(b1)
    a2 = turn([1, 2, 8, 9])  # the reply re-encoded differently: not a prefix, but served from a1
    store.add(a2, replaces=a1)
    assert store.recent() == [a2, b1]
