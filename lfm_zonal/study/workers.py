"""Work of one command spread over forked processes (the markets of a study, its plots).

    with forked([task_a, task_b, task_c], processes=2) as done:
        ...                          # this process goes on meanwhile
        for i, result in done:       # (call number, its return value), as they finish
            ...

Tasks are callables. With ``processes`` >= 1 they run in that many processes forked when
the block starts: a task and everything it reads are inherited with the memory, not
pickled (a study's grid, base case and sensitivities stay shared with this process until
written to); only a call's arguments and its result are pickled. By default each task is
called once without arguments; ``calls`` chooses the first calls instead, and
``done.submit(task, *args)`` adds one later (with arguments made after the fork: a study's
zones, while its nodal market already clears). Calls are numbered in submission order.
The first free process takes the next call, so submit the heaviest first. With
``processes`` = 0 the calls run here, one by one, in submission order, as ``done`` is read.

A task's exception is raised by ``done`` in this process; the remaining tasks are dropped:
their processes are stopped, and waited for, before ``forked`` returns. The processes end
with this process however it ends (a killed command leaves no worker behind holding its
output's lock and memory).

Fork: a child uses nothing of this process's threads. OpenBLAS stops its threads before a
fork and restarts them after; HiGHS starts its scheduler's threads at its first ``run``
(half the cores by default), which a ``run`` command never does in this process before
the markets are forked (a child would inherit a scheduler without threads: its serial
simplex does not use them, but do not rely on it); the progress reporter's timer thread
takes its lock for a moment at ``progress.HOLD_S`` (``progress`` renews the lock in a
child). Each process uses one BLAS thread: the processes share the cores already.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from lfm_zonal.errors import WorkerDied
from lfm_zonal.grid.sensitivity import one_blas_thread
from lfm_zonal.limits import release_free_memory, share_memory
from lfm_zonal.progress import COMMAND_SIGNALS, SIGNALLED, raise_if_signalled

_TASKS: Sequence[Callable[..., Any]] = ()  # the tasks of the forked processes (until the end)


class Calls:
    """The calls of a ``forked`` block: ``submit`` adds one, iterating yields (call number,
    result) of every call submitted, as they finish (here: in submission order)."""

    def __init__(self, tasks: Sequence[Callable[..., Any]], pool, processes: int) -> None:
        self._tasks, self._pool, self._processes = tasks, pool, processes
        self._futures: dict = {}  # future -> call number (processes)
        self._queued: list[tuple[int, int, tuple]] = []  # (number, task, args) to run here
        self._count = 0

    def submit(self, task: int, *args) -> int:
        """Call ``tasks[task](*args)``; returns the call's number."""
        number = self._count
        self._count += 1
        if self._pool is None:
            self._queued.append((number, task, args))
        else:
            try:
                future = self._pool.submit(_run, task, args)
            except BrokenProcessPool:  # a process died before this call (out of memory?)
                raise _died(self._processes) from None
            self._futures[future] = number
        return number

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self._pool is None:
            while self._queued:
                number, task, args = self._queued.pop(0)
                yield number, self._tasks[task](*args)
            return
        yield from _finished(self._futures, self._processes, self._pool)


@contextlib.contextmanager
def forked(
    tasks: Sequence[Callable[..., Any]],
    processes: int,
    calls: Sequence[tuple[int, tuple]] | None = None,
) -> Iterator[Calls]:
    """Run ``tasks`` in ``processes`` forked processes, or here if 0 (module docstring).
    ``calls``: the first calls, (task, args) each (default: every task once, no args)."""
    if calls is None:
        calls = [(i, ()) for i in range(len(tasks))]
        processes = min(processes, len(tasks))
    if processes > 0 and not calls:
        # The processes are forked by the first call, before this process closes its end of
        # the result pipe: processes forked by a later submit would inherit it closed.
        raise ValueError("forked: give at least one first call to run in processes")
    if processes <= 0:
        done = Calls(tasks, None, 0)
        for task, args in calls:
            done.submit(task, *args)
        yield done
        return
    global _TASKS
    outer = _TASKS  # a block within another's (its processes are forked already)
    pool = None
    finished = False
    # Signals wait until the processes exist and have their own handlers (_worker_setup):
    # one that came while they were being forked would run this process's handler in them.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, COMMAND_SIGNALS)
    try:
        _TASKS = tasks
        # The children share this process's pages until they write to them: its free heap
        # goes back to the system first, and its objects are moved out of the garbage
        # collector's reach, so the children's collections do not write to (and copy) every
        # page of them.
        release_free_memory()
        gc.freeze()
        pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=mp.get_context("fork"),
            initializer=_worker_setup,
            initargs=(os.getpid(), processes),
        )
        done = Calls(tasks, pool, processes)
        for task, args in calls:  # the first submission forks every process (fork context)
            done.submit(task, *args)
        # Only the processes write to the result pipe. Without this process's copy of its
        # end, a process that dies while sending its result (killed when out of memory, or
        # stopped by _stop) ends the pool's read of it (a broken pool) instead of leaving
        # the pool's thread waiting for the rest forever, and this process with it.
        pool._result_queue._writer.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending signal raises here
        # and one another thread took while this one forked, whose exception Python ignored
        # in the at-fork callbacks that ran its handler (progress.SIGNALLED)
        raise_if_signalled()
        yield done
        finished = True
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _TASKS = outer
        if pool is not None:
            if not finished:  # a failed task or an interrupt: the others are not waited for
                _stop(pool)
            pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


def in_order(task: Callable[[Any], Any], items: Sequence, processes: int) -> Iterator[Any]:
    """``task(item)`` of every item, in the items' order, made by ``processes`` forked
    processes (here, one by one, if fewer than 2 or one item) while the caller uses the
    results so far. At most IN_ORDER_AHEAD calls per process are made or held ahead of the
    caller (those done before their turn wait here): a table's text is not all in memory."""
    items = list(items)
    if processes < 2 or len(items) < 2:
        yield from map(task, items)
        return
    processes = min(processes, len(items))
    ahead = IN_ORDER_AHEAD * processes
    with forked([task], processes, [(0, (item,)) for item in items[:ahead]]) as done:
        waiting, turn = {}, 0
        for number, result in done:
            waiting[number] = result
            while turn in waiting:
                if turn + ahead < len(items):  # the next call, as one leaves
                    done.submit(0, items[turn + ahead])
                yield waiting.pop(turn)
                turn += 1


#: Calls per process ``in_order`` keeps made or running ahead of its caller.
IN_ORDER_AHEAD = 2


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the pool's processes now, and wait until they have (they may be writing in a
    folder the caller removes next)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def _finished(
    futures: dict, processes: int, pool: ProcessPoolExecutor
) -> Iterator[tuple[int, Any]]:
    ended = [p.sentinel for p in pool._processes.values()]  # readable once a process ends
    while futures:  # with the calls submitted meanwhile
        done, _ = wait(set(futures), timeout=_LIVENESS_S, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=futures.__getitem__):  # those done together: in order
            number = futures.pop(future)  # its result is the caller's alone from here
            try:
                result = future.result()  # re-raises the task's exception here
            except BrokenProcessPool:
                raise _died(processes) from None
            yield number, result
        # A process that died while sending its result leaves the pool reading the rest
        # of it (the other processes hold the pipe open): it never says the pool is broken.
        if not done and mp.connection.wait(ended, timeout=0):
            raise _died(processes)


#: Seconds between two looks at whether every process is still there.
_LIVENESS_S = 1.0


def _died(processes: int) -> WorkerDied:
    return WorkerDied(
        f"a worker process died (out of memory?) while {processes} of them held a market "
        "or a plot each: run with --workers 1 for one market at a time"
    )


def _worker_setup(parent: int, processes: int) -> None:
    """A worker's memory requests get their share of the budget (``limits.share_memory``:
    the ``processes`` may each hold one at once). It leaves signals to this process: Ctrl-C
    (sent to the whole process group) and a hang-up are ignored, SIGTERM (this process
    stopping it) ends it at once, without a traceback; and it ends with this process,
    however that ends (killed: no orphan holding the output's lock and the memory)."""
    share_memory(processes)
    SIGNALLED.clear()  # a signal the parent owes (raise_if_signalled) is the parent's to raise
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent:  # it ended before that was set
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, COMMAND_SIGNALS)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _run(task: int, args: tuple) -> Any:
    with one_blas_thread():
        return _TASKS[task](*args)
