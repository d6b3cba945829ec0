"""Files decoded in DataLoader worker processes (images with PIL, videos with PyAV), safely.

Two things go wrong with a plain ``DataLoader(num_workers=...)`` on Linux:

- Its workers are ``fork``ed from the parent. Once the parent has used a library with a thread
  pool (PyAV's frame-threaded decoder, used to decode the timing clips), a forked child can inherit
  a lock held by a thread that does not exist in the child and wait on it forever. The workers here
  start from a fresh ``forkserver`` process, which never ran a decoder, so there is nothing to
  inherit.
- A worker stuck on one file (a decoder looping on a damaged stream, a hung network mount) stalls
  the run with no message. Here the wait for a batch is bounded, and a batch that does not arrive
  becomes an error naming its files.

Workers never outlive the run, even one blocked in a read (torch's own parent check only runs
between samples): on Linux the forkserver and each worker ask the kernel (``PR_SET_PDEATHSIG``) to
kill them when their parent exits, so the run's exit takes the forkserver, and it the workers.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from typing import Iterator

from .errors import UsageError

# A batch may take this long per sample (plus the floor) before its worker counts as stuck: generous,
# since a 10 s Kinetics clip decodes in about a second on one core and workers share the cores.
STALL_FLOOR_S = 120.0
STALL_PER_SAMPLE_S = 30.0


def shard_starts(n: int, batch_size: int, shard: tuple[int, int]) -> range:
    """First indices of the batches of shard ``(rank, world)``: whole batches dealt round-robin, so
    every batch is the one a single process sees and per-sample results are bit-identical."""
    rank, world = shard
    return range(rank * batch_size, n, world * batch_size)


class ShardBatches:
    """Whole batches starting at ``starts`` (a rank's shard, bench/parallel.py), as index lists."""

    def __init__(self, starts: range, batch_size: int, n: int):
        self.starts, self.batch_size, self.n = starts, batch_size, n

    def __iter__(self):
        return (self.batch(s) for s in self.starts)

    def __len__(self) -> int:
        return len(self.starts)

    @classmethod
    def of_shard(cls, n: int, batch_size: int, shard: tuple[int, int]) -> "ShardBatches":
        return cls(shard_starts(n, batch_size, shard), batch_size, n)

    def batch(self, start: int) -> list[int]:
        return list(range(start, min(start + self.batch_size, self.n)))


# Imported once by the forkserver, so that each worker it forks starts with them loaded.
WORKER_MODULES = ["bench.forkserver_guard", "torch", "bench.data.kinetics", "bench.data.imagenet"]


def worker_context():
    """Start method for decoding workers: ``forkserver`` where the platform has it (see the module
    docstring), else the platform's default (``spawn`` on macOS and Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_MODULES)
    return ctx


def exit_with_parent(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: on Linux, have the kernel kill this worker when its parent
    process exits (``prctl(PR_SET_PDEATHSIG, SIGKILL)``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent was already gone before the request took effect
        os._exit(1)


def stall_timeout(batch_size: int) -> float:
    return STALL_FLOOR_S + STALL_PER_SAMPLE_S * batch_size


def decoded_batches(dataset, sampler: ShardBatches, workers: int, collate_fn=None, timeout_s: float | None = None) -> Iterator:
    """Batches of ``dataset`` (its ``items`` are ``(path, label)``) in ``sampler``'s order, decoded
    by ``workers`` processes (0: in this one).

    A batch that no worker delivers within ``timeout_s`` (default :func:`stall_timeout`) raises a
    :class:`UsageError` naming the files of that batch."""
    from torch.utils.data import DataLoader

    timeout_s = stall_timeout(sampler.batch_size) if timeout_s is None else timeout_s
    kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
    if workers:
        kwargs.update(multiprocessing_context=worker_context(), timeout=timeout_s, worker_init_fn=exit_with_parent)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False, **kwargs)
    batches = iter(loader)
    for start in sampler.starts:
        try:
            batch = next(batches)
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            del batches  # shuts the workers down (a stuck one is terminated)
            files = ", ".join(str(dataset.items[i][0]) for i in sampler.batch(start))
            raise UsageError(f"a data worker made no progress for {timeout_s:.0f} s while decoding {files}; "
                             "check that file (or its disk) and remove it from the data folder") from None
        yield batch
