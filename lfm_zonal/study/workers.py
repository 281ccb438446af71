"""Work of one command spread over forked processes (the markets of a study, its plots).

    with forked([task_a, task_b, task_c], processes=2) as done:
        ...                          # this process goes on meanwhile
        for i, result in done:       # (task index, its return value), as they finish
            ...

Tasks are callables without arguments. With ``processes`` >= 1 they run in that many
processes forked when the block starts: a task and everything it reads are inherited with
the memory, not pickled (a study's grid, base case and sensitivities stay shared with this
process until written to); only its result is pickled back. The first free process takes
the next task in list order, so put the heaviest first. With ``processes`` = 0 the tasks
run here, one by one, in list order, as ``done`` is read.

A task's exception is raised by ``done`` in this process; the remaining tasks are dropped.
Fork is safe here because the processes are made before anything of this process runs a
thread pool of its own that a child would use (HiGHS solves its LPs serially, its
scheduler is never started; OpenBLAS restarts its threads after a fork), and each
process uses one BLAS thread: the processes share the cores already.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from lfm_zonal.errors import LfmError
from lfm_zonal.grid.sensitivity import one_blas_thread
from lfm_zonal.limits import release_free_memory

_TASKS: Sequence[Callable[[], Any]] = ()  # the tasks of the processes being forked


@contextlib.contextmanager
def forked(
    tasks: Sequence[Callable[[], Any]], processes: int
) -> Iterator[Iterator[tuple[int, Any]]]:
    """Run ``tasks`` in ``processes`` forked processes, or here if 0 (module docstring)."""
    processes = min(processes, len(tasks))
    if processes <= 0:
        yield ((i, task()) for i, task in enumerate(tasks))
        return
    global _TASKS
    _TASKS = tasks
    # The children share this process's pages until they write to them: its free heap goes
    # back to the system first, and its objects are moved out of the garbage collector's
    # reach, so the children's collections do not write to (and copy) every page of them.
    release_free_memory()
    gc.freeze()
    pool = ProcessPoolExecutor(
        max_workers=processes, mp_context=mp.get_context("fork"), initializer=_worker_signals
    )
    finished = False
    try:
        futures = {pool.submit(_run, i): i for i in range(len(tasks))}  # all forked here
        _TASKS = ()
        yield _finished(futures, processes)
        finished = True
    finally:
        _TASKS = ()
        if not finished:  # a failed task or an interrupt: the others are not waited for
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


def _finished(futures: dict, processes: int) -> Iterator[tuple[int, Any]]:
    for future in as_completed(futures):
        try:
            result = future.result()  # re-raises the task's exception here
        except BrokenProcessPool:
            raise LfmError(
                f"a worker process died (out of memory?): run with --workers 1 (each of the "
                f"{processes} worker processes held a market's LP or a plot at once)"
            ) from None
        yield futures[future], result


def _worker_signals() -> None:
    """A worker leaves signals to this process: Ctrl-C (sent to the whole process group) is
    ignored, SIGTERM (this process stopping it) ends it at once, without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(i: int) -> Any:
    with one_blas_thread():
        return _TASKS[i]()
