"""Batches sized by tokens, and the prefetcher that prepares them ahead of the step."""

import threading

import pytest

from distill_core.batching import Prefetcher, token_batches


def test_token_batches_without_a_budget_are_consecutive_rows():
    assert token_batches([5, 1, 9, 3, 2], 2, None) == [[0, 1], [2, 3], [4]]


def test_token_batches_hold_like_lengths_within_the_budget():
    lengths = [30, 5, 100, 8, 31, 7, 99, 6, 250]
    batches = token_batches(lengths, max_rows=3, max_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once
    assert batches[0] == [8]  # the longest first: over the budget alone, a batch of its own
    for batch in batches:
        assert len(batch) <= 3
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 200 or len(batch) == 1, batch
    assert batches[1:] == [[2, 6], [4, 0, 3], [5, 7, 1]]  # rows of like length together
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest == sorted(longest, reverse=True)


def test_prefetcher_yields_every_step_in_order_from_another_thread():
    made_in = []

    def make(step):
        made_in.append(threading.current_thread().name)
        return step * step

    assert list(Prefetcher(make, range(3, 9))) == [(s, s * s) for s in range(3, 9)]
    assert set(made_in) == {"batch-prefetch"}


def test_prefetcher_raises_the_error_of_the_batch_that_failed_and_stops():
    def make(step):
        if step == 2:
            raise ValueError(f"row of step {step} is broken")
        return step

    got = []
    with pytest.raises(ValueError, match="row of step 2 is broken"):
        for step, batch in Prefetcher(make, range(10)):
            got.append(batch)
    assert got == [0, 1]


def test_a_consumer_that_stops_early_ends_the_thread():
    prefetcher = Prefetcher(lambda s: s, range(1000), depth=1)
    for step, _ in prefetcher:
        if step == 3:
            break
    assert not prefetcher._thread.is_alive()
