"""More than one process: data-parallel evaluation under ``torchrun`` and cells spread over devices.

* ``torchrun --nproc-per-node N -m bench run ...``: every rank builds the same model and evaluates
  its shard of the seeded test list; whole batches are dealt round-robin (rank r reads batches r,
  r + N, ...; a folder data set decodes only those files), so each batch is exactly the batch a
  single process would see. Per-sample results are gathered to rank 0 and put back in the
  single-process order, so the reduced metrics equal the single-process run exactly
  (docs/measurement.md#equal-issue: one seeded list for every method). Rank 0 times, measures memory and
  writes the run; gloo on the CPU, NCCL on GPUs (rank r uses ``cuda:LOCAL_RANK``).
* ``--devices cuda:0,cuda:1``: the run's model configurations are dealt to one worker process per
  device; each worker writes its cells into ``workers/<i>/`` of the run and the parent merges them
  into the run's own ``records.jsonl`` (atomically, cell by cell), so the result is one run, and
  ``--resume`` finishes whatever a worker left undone.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError


# ----------------------------------------------------------------------------------------------
# torchrun


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device_type: str) -> Dist:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(hours=2))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: torch.device, d: Dist) -> torch.device:
    if d.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", d.local_rank)
    return device


def broadcast(obj, d: Dist):
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, d: Dist) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if not d.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world if d.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def finish(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def evaluate(model, evalset, batch_size: int, device, precision: str, reporter, label: str, d: Dist):
    """``measure.evaluate`` over this rank's shard, merged on rank 0 in single-process order.

    Returns the merged :class:`~bench.measure.EvalResult` on rank 0 and None on the other ranks.
    """
    from . import measure

    sizes: list[int] = []

    def batches():
        for x, y in evalset.batches(batch_size, shard=(d.rank, d.world)):
            sizes.append(len(y))
            if len(y):
                yield x, y

    r = measure.evaluate(model, batches(), evalset.n, device, precision, reporter, label=label, views=evalset.views)
    parts = gather((sizes, r.correct1, r.correct5, r.gmacs, r.tokens), d)
    if parts is None:
        return None
    if len(parts) == 1:
        return r
    cuts = [np.cumsum([0, *p[0]]) for p in parts]
    order = []  # (rank, start, end) in global batch order: batch g lives on rank g % world
    for g in range(max(len(p[0]) for p in parts) * d.world):
        rank, i = g % d.world, g // d.world
        if i < len(parts[rank][0]):
            order.append((rank, cuts[rank][i], cuts[rank][i + 1]))

    def cat(field: int) -> np.ndarray:
        return np.concatenate([parts[rk][field][a:b] for rk, a, b in order])

    return measure.EvalResult(n=int(sum(sum(p[0]) for p in parts)), correct1=cat(1), correct5=cat(2), gmacs=cat(3), tokens=cat(4),
                              views=r.views)


# ----------------------------------------------------------------------------------------------
# --devices: one worker process per device


def check_pool(names: list[str]) -> list[torch.device]:
    """The worker devices: all of one kind (the cells' ``device`` is that kind), each real."""
    from .devices import device_name, resolve_device

    devs = [resolve_device(n) for n in names]
    kinds = {d.type for d in devs}
    if len(kinds) > 1:
        raise UsageError(f"--devices mixes {' and '.join(sorted(kinds))}; spread cells over devices of one kind (run twice to compare kinds)")
    hw = {device_name(d) for d in devs}
    if len(hw) > 1:
        raise UsageError(f"--devices mixes different hardware ({'; '.join(sorted(hw))}); timings would not be comparable")
    return devs


def deal(groups: list, workers: int) -> list[list[int]]:
    """Group indices per worker, round-robin in plan order."""
    return [list(range(i, len(groups), workers)) for i in range(workers)]


def worker_folder(run_path: Path, i: int) -> Path:
    return Path(run_path) / "workers" / str(i)


def merge_workers(run) -> int:
    """Move every finished worker cell into the run (raw arrays included); returns how many."""
    from .store import Run

    moved = 0
    skipped: set[str] = set()
    for folder in sorted((run.path / "workers").glob("*")):
        if not (folder / "manifest.json").is_file():
            continue
        part = Run(folder)
        skipped.update(part.manifest().get("dataset", {}).get("skipped_files", []))
        for rec in part.records():
            raw_name = rec.get("raw")
            if raw_name and (folder / raw_name).is_file():
                (run.path / "raw").mkdir(exist_ok=True)
                shutil.copyfile(folder / raw_name, run.path / raw_name)
            run.add_record({**rec, "run_id": run.id})
            moved += 1
    if skipped:
        manifest = run.manifest()
        ds = manifest.setdefault("dataset", {})
        files = sorted(skipped | set(ds.get("skipped_files", [])))
        ds["skipped_corrupt"], ds["skipped_files"] = len(files), files
        run.write_manifest(manifest)
    shutil.rmtree(run.path / "workers", ignore_errors=True)
    return moved


def spawn(run, pool: list[str], n_groups: int, threads: int | None, reporter) -> None:
    """Run ``n_groups`` planned groups in ``len(pool)`` worker processes, then merge their cells."""
    shares = deal(list(range(n_groups)), len(pool))
    procs = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    for i, (dev, share) in enumerate(zip(pool, shares)):
        if not share:
            continue
        cmd = [sys.executable, "-m", "bench.worker", str(run.path), str(i), dev, ",".join(map(str, share))]
        if threads:
            cmd.append(str(threads))
        procs.append((i, dev, subprocess.Popen(cmd, env=env)))
        reporter.print(f"worker {i} on {dev}: {len(share)} model configurations")
    failed = []
    try:
        for i, dev, p in procs:
            if p.wait() != 0:
                failed.append(f"worker {i} ({dev}) exited {p.returncode}")
    except KeyboardInterrupt:
        for _, _, p in procs:
            p.terminate()
        for _, _, p in procs:
            p.wait()
        merge_workers(run)
        raise
    merge_workers(run)
    if failed:
        raise UsageError(f"{'; '.join(failed)}; finished cells are saved, finish with `bench run --resume {run.id}`")
