"""One ``--devices`` worker process (started by ``bench.parallel.spawn``): measures its share of a
run's model configurations on its device, into ``workers/<index>/`` of the run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .errors import UsageError
from .progress import Reporter
from .runner import run_worker


def _worker_main(argv: list[str]) -> None:
    """``python -m bench.worker RUN INDEX DEVICE G1,G2,... [THREADS]``: one worker of ``spawn``."""
    err = Console(stderr=True)
    run_path, index, device, share = argv[:4]
    threads = int(argv[4]) if len(argv) > 4 else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run_worker(Path(run_path), int(index), device, [int(g) for g in share.split(",") if g], threads,
                   Reporter(console=err, quiet=True))
    except UsageError as e:
        err.print(f"[bold red]error:[/] worker {index}: {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
