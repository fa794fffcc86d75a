"""Which rows go into which batch: the trial's step schedule, batches sized by tokens, and the
background preparation of the next batch."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import torch


class BatchSchedule:
    """Which rows form the batch at each step. A batch holds rows of one task (their lengths
    are alike, so little compute goes to padding); an epoch is every task's rows in seeded
    order, cut into batches, the batches in seeded order. Step s's batch depends only on
    (seed, s), so a resumed trial continues exactly where it stopped."""

    def __init__(self, tasks: list[str], batch_size: int, seed: int):
        self.by_task = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))}
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = sum(math.ceil(len(r) / batch_size) for r in self.by_task.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            batches = []
            for rows in self.by_task.values():
                order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
                batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            self._epoch = (epoch, [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()])
        return self._epoch[1]

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.per_epoch)
        return self._batches(epoch)[index]


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Row indices in batches of at most `max_rows` rows and at most `max_tokens` padded tokens
    (rows x the batch's longest). `max_tokens` None: consecutive batches of `max_rows` in the
    rows' order. Otherwise longest rows first, so a batch holds rows of like length (little
    padding) and the largest batch comes first (a device too small fails at once, not hours
    in); a row longer than `max_tokens` is a batch of its own."""
    n = len(lengths)
    if max_tokens is None:
        return [list(range(i, min(i + max_rows, n))) for i in range(0, n, max_rows)]
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        if current and (len(current) == max_rows or (len(current) + 1) * lengths[current[0]] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


class Prefetcher:
    """Yields (step, make_batch(step)) for `steps`, preparing the next batches in a background
    thread while the caller works on the current one (reading and decoding release the GIL in
    Arrow and torch), so reading never starves the device. What a step gets depends only on
    its number: prefetching changes when a batch is made, never what it holds."""

    _DONE = object()

    def __init__(self, make_batch: Callable[[int], object], steps: range, depth: int = 2):
        self._make, self._steps = make_batch, steps
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)

    def _fill(self) -> None:
        try:
            for step in self._steps:
                item = (step, self._make(step))
                while not self._put(item):
                    if self._stop.is_set():
                        return
        except BaseException as err:  # handed to the consumer, raised there
            self._put_final(err)
            return
        self._put_final(self._DONE)

    def _put(self, item) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def _put_final(self, item) -> None:
        while not self._stop.is_set() and not self._put(item):
            pass

    def __iter__(self) -> Iterator[tuple[int, object]]:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
