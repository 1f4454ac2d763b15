"""The micro-batch split of a step: contiguous runs of chunks, in order, balanced by tokens."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.model.step_batch import split_micro_batches


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(1, 64), min_size=1, max_size=12), count=st.integers(1, 4))
def test_micro_batches_are_contiguous_and_balanced_by_tokens(tokens: list[int], count: int) -> None:
    groups = split_micro_batches(tokens, count)
    assert [i for group in groups for i in group] == list(range(len(tokens)))  # in order, each chunk once
    assert len(groups) == min(count, len(tokens)) and all(len(group) > 0 for group in groups)
    if len(groups) == 2:  # the half-sum cut: no other cut leaves the halves closer to even
        total = sum(tokens)
        best = min(abs(2 * sum(tokens[:cut]) - total) for cut in range(1, len(tokens)))
        assert abs(2 * sum(tokens[:groups[1].start]) - total) == best


def test_a_decode_step_splits_in_half_and_a_long_prefill_stands_alone() -> None:
    assert split_micro_batches([1] * 8, 2) == [range(0, 4), range(4, 8)]
    assert split_micro_batches([1, 1, 100, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_micro_batches([5, 5, 5], 1) == [range(0, 3)]
