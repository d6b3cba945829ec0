"""Imported by the decoding workers' forkserver when it starts (``bench.loading.WORKER_MODULES``):
the kernel kills the forkserver when the run's process exits, and with it every worker it forked
(each worker asks for the same, bench/loading.py). Without this the forkserver would wait for its
workers to exit, and a worker blocked in a read would wait for ever."""
from .loading import exit_with_parent

exit_with_parent()
