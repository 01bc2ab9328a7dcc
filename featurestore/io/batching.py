"""Run per-item work in a thread pool, batch by batch, a little ahead of the consumer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def prefetch_batches(
    pool: ThreadPoolExecutor, fn: Callable[[T], Any], items: Sequence[T], batch_size: int, lookahead: int = 2
) -> Iterator[list[Any]]:
    """Yield ``[fn(x) for x in batch]`` batch by batch, in order, while the next
    ``lookahead`` batches are already being computed by the pool.

    Memory stays bounded by ``lookahead + 1`` batches of results, so decoding
    (which releases the GIL) overlaps with the consumer's work on the current batch.
    """
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    futures: list[list[Future[Any]]] = [[pool.submit(fn, x) for x in b] for b in batches[:lookahead]]
    for n in range(len(batches)):
        if n + lookahead < len(batches):
            futures.append([pool.submit(fn, x) for x in batches[n + lookahead]])
        yield [f.result() for f in futures[n]]
        futures[n] = []
