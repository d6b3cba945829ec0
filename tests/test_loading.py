"""Decoding workers (bench/loading.py): they start clean after the parent used PyAV's threaded
decoder, a worker stuck on a file becomes an error naming it, and workers die with the run."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.data import kinetics
from bench.errors import UsageError
from bench.loading import ShardBatches, decoded_batches
from conftest import ROOT
from test_kinetics import write_clip

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs and /proc are Linux features")

# Decode one clip in this process with PyAV's frame threads, then decode it again in two workers.
AFTER_THREADED_DECODE = """
import sys
from pathlib import Path
from bench.data import kinetics
from bench.loading import ShardBatches, decoded_batches

def main():
    clip = Path(sys.argv[1])
    kinetics.read_video(clip, 224)
    data = kinetics.VideoFiles([(clip, 0)] * 4, kinetics.Sampling(frames=8, stride=2))
    batches = list(decoded_batches(data, ShardBatches.of_shard(4, 1, (0, 1)), 2, kinetics.collate))
    print("decoded", sum(len(y) for _, y, _ in batches), "errors", sum(len(f) for _, _, f in batches))

if __name__ == "__main__":
    main()
"""

# Two workers blocked opening a FIFO (a file whose reads never return, like a hung mount).
BLOCKED_WORKERS = """
import sys
from pathlib import Path
from bench.data import kinetics
from bench.loading import ShardBatches, decoded_batches

if __name__ == "__main__":
    data = kinetics.VideoFiles([(Path(sys.argv[1]), 0)] * 2, kinetics.Sampling(frames=8, stride=2))
    print("started", flush=True)
    for _ in decoded_batches(data, ShardBatches.of_shard(2, 1, (0, 1)), 2, kinetics.collate, timeout_s=3600):
        pass
"""


def run_script(tmp_path, source: str):
    """``source`` as a script file, and the environment that imports this checkout's bench."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return script, env


def test_workers_decode_after_a_threaded_decode_in_the_parent(tmp_path):
    clip = write_clip(tmp_path / "a.mp4", frames=40, width=320, height=240)
    script, env = run_script(tmp_path, AFTER_THREADED_DECODE)
    done = subprocess.run([sys.executable, str(script), str(clip)], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "decoded 4 errors 0" in done.stdout


def fifo_has_reader(fifo: Path) -> bool:
    """Whether some process has ``fifo`` open (or is opening it) for reading."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader
        return False
    os.close(fd)
    return True


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@linux_only
def test_a_stuck_worker_is_an_error_naming_its_file_and_is_stopped(tmp_path):
    fifo = tmp_path / "abseiling" / "stuck.mp4"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    good = write_clip(tmp_path / "abseiling" / "good.mp4", frames=20)
    data = kinetics.VideoFiles([(good, 0), (fifo, 0)], kinetics.Sampling(frames=8, stride=2))
    batches = decoded_batches(data, ShardBatches.of_shard(2, 1, (0, 1)), 1, kinetics.collate, timeout_s=5)
    x, y, failed = next(batches)
    assert x.shape[0] == 1 and not failed
    with pytest.raises(UsageError, match=r"no progress for 5 s while decoding .*stuck\.mp4"):
        next(batches)
    assert wait_until(lambda: not fifo_has_reader(fifo), 30), "the stuck worker still holds the file"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@linux_only
def test_workers_blocked_in_a_read_die_with_the_run(tmp_path):
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)
    script, env = run_script(tmp_path, BLOCKED_WORKERS)
    run = subprocess.Popen([sys.executable, str(script), str(fifo)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert run.stdout.readline().strip() == "started"
        # the forkserver and the two workers, both of them blocked opening the FIFO
        assert wait_until(lambda: len(descendants(run.pid)) >= 3, 120), "the workers never started"
        workers = descendants(run.pid)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        assert wait_until(lambda: not any(alive(p) for p in workers), 30), "workers outlived the run"
    finally:
        run.kill()
        for pid in descendants(run.pid):
            os.kill(pid, signal.SIGKILL)
