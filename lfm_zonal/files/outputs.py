"""Where results go: checked output paths, one writer per path, folders that appear only
when complete, and plain table writers.

Rules (every refusal is an :class:`~lfm_zonal.errors.InputError` of one line):

* ``--out`` is never empty, the working directory or a folder above it, a system folder
  (``/etc``, ``/usr/lib``, ``/proc``, ... ``SYSTEM_FOLDERS``), a path under a file, or a
  folder that cannot be written;
* an existing non-empty folder is replaced only with ``overwrite`` and only if lfm-zonal
  wrote it (the marker file :data:`MARKER` inside), and never if it holds an input of the
  run; an existing file is replaced only with ``overwrite``, and never an input;
* one run per output path: a lock file ``.NAME.lock`` beside it, taken atomically
  (``flock``, released by the kernel when the process dies), refuses a second run;
* results are written under ``.NAME.partial-<pid>`` and renamed at the end; leftovers of
  a killed run (partial or ``.NAME.old-<pid>`` folders) are removed by the next run on
  the same path, which holds the lock, so no live run can still be writing them.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import gzip
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from lfm_zonal.errors import InputError, LfmError
from lfm_zonal.files.inputs import inputs_read
from lfm_zonal.progress import raise_if_signalled

try:  # POSIX: a kernel lock, released however the process ends
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger("lfm_zonal")

FLOAT_FORMAT = "%.10g"  # stable text: the same numbers give the same bytes
MARKER = ".lfm-zonal"
MARKER_TEXT = (
    "This folder was written by lfm-zonal. `--overwrite` may replace it as a whole;\n"
    "do not keep your own files in it.\n"
)
#: The operating system's own folders: never a results folder, even for a user allowed to
#: write there (root). Not /run, /usr or /dev as a whole: /run/media and /run/user (mounted
#: disks, a user's runtime folder), /usr/local and /usr/src (a container's usual working
#: folder) and /dev/shm are places users write to.
SYSTEM_FOLDERS = (
    "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys",
    "/usr/bin", "/usr/include", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/sbin",
    "/usr/share", "/private/etc", "/System",
)  # fmt: skip

_HELD: dict[Path, int] = {}  # output paths locked by this process -> nesting depth
_COMPLETED: set[Path] = set()  # output paths completed by this process


def completed(out: str | Path) -> bool:
    """Whether this process finished writing ``out`` (for the message after an interrupt)."""
    try:
        return Path(out).resolve() in _COMPLETED
    except (OSError, RuntimeError):
        return False


# --------------------------------------------------------------------------- path checks


def check_output_path(
    out: str | Path,
    *,
    kind: str = "folder",
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    markers: tuple[str, ...] = (MARKER,),
    exists_ok: bool = False,
    not_empty: str | None = None,
) -> Path:
    """The resolved output path, or an InputError of one line saying why it cannot be used.

    ``kind`` is "folder" (a results folder) or "file" (one table). ``markers``: files
    whose presence shows that lfm-zonal wrote an existing folder. ``exists_ok``: leave
    the refusal of an existing output without ``overwrite`` to the time of writing
    (the command line claims --out before the inputs are validated, and an input
    mistake is the more useful message). ``not_empty``: what the refusal of an existing,
    non-empty folder advises (None: --overwrite where lfm-zonal wrote it, else another
    --out).
    """
    text = str(out)
    noun = "folder" if kind == "folder" else "file"
    if not text.strip():
        raise InputError(f"--out is empty: give a {noun} name")
    if "\x00" in text:
        raise InputError(f"--out {text!r}: not a valid {noun} name")
    try:
        target = Path(out).expanduser().resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as exc:
        raise InputError(f"--out {out}: not a usable path ({exc})") from None
    if target == cwd or target in cwd.parents:
        where = "the working directory" if target == cwd else "a folder above the working directory"
        example = "results" if kind == "folder" else "powerflow.csv"
        raise InputError(f"--out {out} is {where}; give a new {noun} name (e.g. --out {example})")
    require_outside_system_folders(target, f"--out {out}")
    # The nearest existing folder above must be a folder (not a file) we may write in.
    above = target.parent
    while not above.exists():
        if above.is_symlink():
            raise InputError(f"--out {out}: {above} is a broken symbolic link")
        above = above.parent
    if not above.is_dir():
        raise InputError(f"--out {out}: {above} is a file, not a folder")
    if kind == "file" and above != target.parent:
        raise InputError(f"--out {out}: folder {target.parent} does not exist (create it first)")
    if not os.access(above, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot write in {above} (permission denied)")
    protected = {Path(p).resolve() for p in inputs if str(p)} | set(inputs_read())
    if kind == "folder":
        _check_folder(out, target, overwrite, protected, markers, exists_ok, not_empty)
    else:
        _check_file(out, target, overwrite, protected, exists_ok)
    return target


def _check_folder(
    out,
    target: Path,
    overwrite: bool,
    protected: set[Path],
    markers: tuple[str, ...],
    exists_ok: bool,
    not_empty: str | None,
) -> None:
    held = sorted(p for p in protected if target == p or target in p.parents)
    if held:
        raise InputError(
            f"--out {out} holds an input of this run ({held[0]}); choose another --out"
        )
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    try:
        empty = not any(target.iterdir())
    except OSError as exc:
        raise InputError(f"--out {out}: cannot read the folder ({exc.strerror})") from None
    if empty:
        return
    ours = any((target / m).is_file() for m in markers)
    if not overwrite:
        if exists_ok:
            return
        if not_empty is None:  # --overwrite replaces only what lfm-zonal wrote
            not_empty = (
                "use --overwrite; overwrite=True in Python"
                if ours
                else f"lfm-zonal did not write it, no {MARKER} file in it: choose another --out"
            )
        raise InputError(f"output folder {out} exists and is not empty ({not_empty})")
    if not ours:
        raise InputError(
            f"--overwrite: {out} was not written by lfm-zonal (no {MARKER} file in it), "
            "so it is not replaced; remove it yourself or choose another --out"
        )


def _check_file(out, target: Path, overwrite: bool, protected: set[Path], exists_ok: bool) -> None:
    if target in protected:
        raise InputError(f"--out {out} is an input file of this run; choose another file name")
    if target.is_dir():
        raise InputError(
            f"--out {out} is a folder; give a file name (e.g. --out {Path(out) / 'powerflow.csv'})"
        )
    if target.exists() or target.is_symlink():
        if not target.is_file():
            raise InputError(f"--out {out} exists and is not a regular file")
        if not overwrite and not exists_ok:
            raise InputError(
                f"file {out} exists (use --overwrite to replace it; overwrite=True in Python)"
            )


# --------------------------------------------------------------------------- one writer


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def claim_output(out: str | Path, **check) -> Iterator[Path]:
    """Check ``out`` and hold its lock for the block (re-entrant in one process).

    ``check``: the rules of :func:`check_output_path` (``kind``, ``overwrite``,
    ``inputs``, ``markers``, ``exists_ok``, ``not_empty``), applied before and again after the lock is
    taken. Creates the missing folders above ``out`` (removed again if the block leaves
    nothing in them), takes the lock ``.NAME.lock`` beside it (a second run is refused
    with one line naming the pid that holds it), then removes leftovers of killed runs.
    """
    check["inputs"] = list(check.get("inputs", ()))  # read twice
    target = check_output_path(out, **check)
    if target in _HELD:
        _HELD[target] += 1
        try:
            yield target
        finally:
            _HELD[target] -= 1
        return
    created: list[Path] = []
    lock = None
    try:
        with deferred_signals():  # a signal now would leave a lock or folders unrecorded
            created = _make_parents(out, target.parent)
            lock = _Lock.take(out, target)
            _HELD[target] = 1
        check_output_path(out, **check)  # again, now that it is held
        remove_leftovers(target)
        yield target
    finally:
        with deferred_signals():
            if lock is not None:
                _HELD.pop(target, None)
                lock.release()
            if not target.exists():
                _remove_empty(created)


def _make_parents(out, folder: Path) -> list[Path]:
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_empty(missing[missing.index(p) + 1 :])
            raise InputError(f"--out {out}: cannot create folder {p} ({exc.strerror})") from None
    return missing  # deepest first


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first
        with contextlib.suppress(OSError):
            p.rmdir()


class _Lock:
    """An exclusive lock file beside the output path, holding the owner's pid."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, out, target: Path) -> _Lock:
        path = target.parent / f".{target.name}.lock"
        for _ in range(100):
            if fcntl is None:  # pragma: no cover - Windows: exclusive create, stale if pid gone
                return cls._take_exclusive(out, target, path)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(
                    f"--out {out}: cannot write in {target.parent} ({exc.strerror})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise _busy(out, holder) from None
                raise InputError(f"--out {out}: cannot lock {path} ({exc.strerror})") from None
            try:  # the file may have been released and removed since we opened it
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return cls(path, fd)
        raise InputError(f"--out {out}: could not take the lock {path}")

    @classmethod
    def _take_exclusive(cls, out, target: Path, path: Path) -> _Lock:  # pragma: no cover
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    holder = int(path.read_text().strip() or 0)
                except (OSError, ValueError):
                    holder = 0
                if holder and pid_alive(holder):
                    raise _busy(out, holder) from None
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            except OSError as exc:
                raise InputError(
                    f"--out {out}: cannot write in {target.parent} ({exc.strerror})"
                ) from None
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            return cls(path, None)
        raise InputError(f"--out {out}: could not take the lock {path}")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still held: a waiting run re-opens a fresh file
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _busy(out, holder: int | None) -> InputError:
    who = f"another lfm-zonal run (pid {holder})" if holder else "another lfm-zonal run"
    return InputError(f"--out {out} is being written by {who}; wait for it or choose another --out")


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)$")


def require_outside_system_folders(target: Path, what: str) -> None:
    """Refuse a ``target`` (resolved) in a system folder (SYSTEM_FOLDERS); ``what`` names it."""
    for system in SYSTEM_FOLDERS:
        if target == Path(system) or Path(system) in target.parents:
            raise InputError(f"{what} is under {system}, a system folder; choose your own")


def _removed(entry: Path) -> bool:
    """Remove a file or folder ``entry``; whether it is gone (a read-only folder's files
    stay)."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()
    return not (entry.exists() or entry.is_symlink())


def remove_leftovers(target: Path) -> list[Path]:
    """Remove ``.NAME.partial-<pid>`` and ``.NAME.old-<pid>`` beside ``target`` left by a run
    that was killed. Call it only while holding ``target``'s lock: then no live run writes
    them (the pid is gone, or reused by an unrelated process)."""
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != target.name or int(m["pid"]) == os.getpid():
            continue
        if not _removed(entry):
            log.warning("could not remove %s (left by an earlier run): remove it by hand", entry)
            continue
        log.info(
            "removed %s, left by an interrupted run (pid %s%s)",
            entry,
            m["pid"],
            "" if pid_alive(int(m["pid"])) else ", no longer running",
        )
        removed.append(entry)
    return removed


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block (a rename that must not be cut in half); a
    signal received meanwhile is delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


@contextlib.contextmanager
def result_folder(
    out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Write into a hidden sibling folder; move it to ``out`` only when the block succeeds.

    An interrupted or failed run leaves no folder named ``out`` (the partial one is
    removed; a killed run's is removed by the next run on ``out``), so nothing
    half-written is ever passed off as a result. ``overwrite`` replaces only a folder
    lfm-zonal wrote (see the module docstring).
    """
    with claim_output(out, kind="folder", overwrite=overwrite, inputs=inputs) as target:
        partial = partial_path(target)
        if partial.exists():
            shutil.rmtree(partial)
        try:  # from the mkdir on: any exception or signal removes the partial folder
            try:
                partial.mkdir()
            except OSError as exc:
                raise InputError(f"--out {out}: cannot create {partial} ({exc.strerror})") from None
            yield partial
            raise_if_signalled()  # one swallowed on the way (progress.SIGNALLED)
            (partial / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
            # Checked again: the block may have read inputs that live in ``out``.
            check_output_path(out, kind="folder", overwrite=overwrite, inputs=inputs)
        except BaseException:
            with deferred_signals():
                shutil.rmtree(partial, ignore_errors=True)
            raise
        with deferred_signals():
            _swap_in(partial, target)
            _COMPLETED.add(target)


def _swap_in(partial: Path, target: Path) -> None:
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    try:
        os.rename(partial, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if old is not None and not _removed(old):
        log.warning(
            "%s is written; what could not be removed of the one it replaced is in %s: "
            "remove it by hand",
            target,
            old,
        )


def partial_path(target: Path) -> Path:
    """Where ``target`` is written before it is renamed: ``.NAME.partial-<pid>`` beside it."""
    return target.parent / f".{target.name}.partial-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """The one atomic writer: a path to write ``target`` to; it becomes ``target`` only when
    the block succeeds, in one rename, and is removed when the block fails.

    A process killed in the block leaves ``.NAME.partial-<pid>`` beside ``target``; the
    caller, holding the lock of the output it writes in, removes such leftovers (see
    :func:`remove_leftovers`). It takes no lock: :func:`result_file` does, for a file
    given as ``--out``.
    """
    target = Path(target)
    partial = partial_path(target)
    try:
        yield partial
        raise_if_signalled()
        if not partial.is_file():
            raise LfmError(f"nothing was written for {target}")
    except BaseException:
        with deferred_signals(), contextlib.suppress(OSError):
            partial.unlink()
        raise
    with deferred_signals():
        os.replace(partial, target)
        _COMPLETED.add(target)


@contextlib.contextmanager
def result_file(
    out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """A path to write one file to; it becomes ``out`` only when the block succeeds.

    ``out`` is replaced only with ``overwrite`` and never if it is an input.
    """
    with (
        claim_output(out, kind="file", overwrite=overwrite, inputs=inputs) as target,
        atomic_file(target) as partial,
    ):
        yield partial


def write_csv(
    frame: pd.DataFrame | pd.Series, path: Path, index: bool = True, map_parts=None
) -> None:
    """``frame`` as CSV (``to_csv`` with CSV_OPTIONS); ``map_parts`` as ``_write_rows``'s."""
    if not isinstance(frame, pd.DataFrame) or len(frame) < FAST_WRITER_FROM_ROWS:
        frame.to_csv(path, index=index, **CSV_OPTIONS)
        return
    with open(path, "w", encoding="utf-8", newline="") as handle:
        _write_rows(frame, handle, index, map_parts)


#: ``to_csv``'s options for every table written: the float text and the line ending.
CSV_OPTIONS = {"float_format": FLOAT_FORMAT, "lineterminator": "\n"}
#: Tables from this many rows are written by ``_write_rows``.
FAST_WRITER_FROM_ROWS = 1000
#: Cells in one chunk of rows of a CSV file: pandas' ``_DEFAULT_CHUNKSIZE_CELLS``.
CSV_CHUNK_CELLS = 100_000
#: Chunks of rows whose text one call of ``_write_rows``'s ``map_parts`` makes (a part of
#: about 2M cells: SimBench MV+LV's activations, 2.4M rows of 12 columns, are 15 parts).
CSV_PART_CHUNKS = 20


def _write_rows(frame: pd.DataFrame, handle, index: bool, map_parts=None) -> None:
    """``frame`` as CSV text to ``handle``, the bytes of ``frame.to_csv(handle, index=index,
    **CSV_OPTIONS)`` in about half the time.

    pandas writes the header; the rows go in pandas' own chunks (pandas decides a datetime
    column's format chunk by chunk), a part of them at a time in memory: each column as the
    cells pandas writes for it (``_cells``), the rows written by the same ``csv.writer`` as
    pandas' (its quoting). pandas formats a value through several Python calls, and builds
    its rows again from object arrays: on SimBench MV's activations (178k rows, 12 columns)
    1.39 s -> 0.6-0.8 s. A chunk with a column of another kind (categorical, time zone,
    ...) is written by pandas, its float columns as text first (``as_text``); a frame
    without columns, with column levels, or with a datetime level in its row MultiIndex
    (which pandas formats over all rows, not chunk by chunk) is written by pandas whole.

    The text is made in parts of CSV_PART_CHUNKS chunks, ``map_parts(make, starts)`` giving
    ``make(start)`` for every part's first row in order (default ``map``): processes can
    make them at once while this one writes (``study.workers.in_order``), the same bytes.
    """
    options = CSV_OPTIONS
    levels = frame.index.levels if index and isinstance(frame.index, pd.MultiIndex) else []
    if (
        len(frame.columns) == 0
        or isinstance(frame.columns, pd.MultiIndex)
        or any(getattr(level.dtype, "kind", "") == "M" for level in levels)
    ):
        frame.to_csv(handle, index=index, **options)
        return
    rows = (CSV_CHUNK_CELLS // len(frame.columns)) or 1
    frame.iloc[:0].to_csv(handle, index=index, **options)  # pandas' header: its label text
    if index:  # the index levels as leading columns
        frame = frame.reset_index(names=[f"\0{i}" for i in range(frame.index.nlevels)])
    part_rows = rows * CSV_PART_CHUNKS
    starts = range(0, len(frame), part_rows)
    make = functools.partial(_rows_text, frame, rows=rows, part_rows=part_rows)
    for text in (map if map_parts is None else map_parts)(make, starts):
        handle.write(text)


def _rows_text(frame: pd.DataFrame, start: int, rows: int, part_rows: int) -> str:
    """The CSV text of ``frame``'s rows from ``start`` (``part_rows`` of them at most), chunk by
    chunk of ``rows`` (``_write_rows``)."""
    options = CSV_OPTIONS
    text = io.StringIO()
    writer = csv.writer(text, lineterminator=options["lineterminator"])
    for first in range(start, min(start + part_rows, len(frame)), rows):
        part = frame.iloc[first : first + rows]
        cells = [_cells(part.iloc[:, i]) for i in range(part.shape[1])]
        if any(c is None for c in cells):
            as_text(part).to_csv(text, header=False, index=False, chunksize=rows, **options)
        else:
            writer.writerows(zip(*cells, strict=True))
    return text.getvalue()


def _cells(column: pd.Series) -> list | None:
    """The cells ``to_csv`` writes for ``column`` (numbers, text, or what ``str`` makes of
    them, as pandas hands them to ``csv.writer``); None for a kind left to pandas."""
    dtype = column.dtype
    if not isinstance(dtype, np.dtype):
        return None
    values = column.to_numpy()
    if dtype.kind == "f":
        return _float_text(values)
    if dtype.kind in "iub":
        return values.tolist()
    if dtype.kind == "O":
        cells = values.copy()
        cells[pd.isna(values)] = ""
        return cells.tolist()
    if dtype.kind == "M":  # pandas' text of the distinct times, as it decides for the chunk
        distinct, where = np.unique(values, return_inverse=True)
        lines = pd.DataFrame({"t": distinct, "x": 0}).to_csv(
            index=False, header=False, lineterminator="\n"
        )
        return np.array([line[:-2] for line in lines.splitlines()], dtype=object)[where].tolist()
    return None


def _float_text(values: np.ndarray) -> list[str]:
    """FLOAT_FORMAT text of ``values``, empty for NaN (as ``to_csv`` writes them)."""
    text = [FLOAT_FORMAT % v for v in values.tolist()]
    for i in np.flatnonzero(np.isnan(values)).tolist():
        text[i] = ""
    return text


def as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its float columns already as the text ``to_csv`` writes for them
    (``FLOAT_FORMAT``, empty for NaN): the same bytes, about twice as fast (pandas formats a
    float column value by value through several Python calls). Other columns, the index and
    the header are left to pandas."""
    out = None
    for i, dtype in enumerate(frame.dtypes):
        if not isinstance(dtype, np.dtype) or dtype.kind != "f":
            continue
        text = np.array(_float_text(frame.iloc[:, i].to_numpy()), dtype=object)
        if out is None:
            out = frame.copy(deep=False)
        out.isetitem(i, text)
    return frame if out is None else out


#: A results table of more rows than this is written gzip-compressed, ``NAME.csv.gz`` (the
#: same columns; ``pandas.read_csv`` reads it as it is). The shipped scenarios' tables stay
#: far below (SimBench MV: 178k rows of activations, 16 MB); SimBench MV+LV's activations
#: (about 2M rows, 198 MB) shrink about 10x (9.7x measured on one zonal market's 287k rows).
GZIP_ABOVE_ROWS = 500_000
GZIP_LEVEL = {"compresslevel": 6, "mtime": 0}  # mtime 0: the same bytes each run


def write_table(frame: pd.DataFrame, path: Path, index: bool = False, map_parts=None) -> Path:
    """A results table as CSV, or as gzip-compressed CSV (``path`` + ``.gz``) above
    ``GZIP_ABOVE_ROWS`` rows; returns the path written. ``map_parts``: as ``_write_rows``'s."""
    if len(frame) <= GZIP_ABOVE_ROWS:
        write_csv(frame, path, index=index, map_parts=map_parts)
        return path
    path = path.with_name(path.name + ".gz")
    with (  # as pandas' to_csv opens a gzip file: the same bytes
        gzip.GzipFile(filename=path, mode="wb", **GZIP_LEVEL) as packed,
        io.TextIOWrapper(packed, encoding="utf-8", newline="") as handle,
    ):
        _write_rows(frame, handle, index, map_parts)
    return path


def write_npz(arrays: dict, path: Path) -> None:
    """Numeric and text arrays in one uncompressed numpy ``.npz`` (``np.load`` reads it
    without pickle; compression saved 10-30% of dense sensitivities at 30-60x the time)."""
    plain = {name: np.asarray(value) for name, value in arrays.items()}
    objects = [name for name, value in plain.items() if value.dtype == object]
    if objects:
        raise LfmError(f"{path}: array '{objects[0]}' holds Python objects (a bug)")
    with open(path, "wb") as handle:  # a file object: numpy adds no suffix
        np.savez(handle, **plain)


def json_text(data, origin: str = "JSON output") -> str:
    """Standard JSON (RFC 8259) of ``data``: never ``Infinity`` or ``NaN``.

    A non-finite number raises an LfmError naming its key (``a.b[2]``).
    """
    data = _plain(data)
    bad = _non_finite(data)
    if bad is not None:
        where, value = bad
        raise LfmError(
            f"{origin}: '{where}' is {value}, which standard JSON cannot hold "
            "(an inf or NaN result is a bug; please report it)"
        )
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(data: dict, path: Path) -> None:
    Path(path).write_text(json_text(data, Path(path).name), encoding="utf-8")


def _plain(value):
    """``value`` with numpy/pandas scalars and arrays as Python numbers, lists and strings."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if hasattr(value, "tolist") and not hasattr(value, "item"):
        return _plain(value.tolist())
    if hasattr(value, "item"):
        try:
            return _plain(value.item())
        except (ValueError, TypeError):
            return _plain(value.tolist()) if hasattr(value, "tolist") else str(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _non_finite(value, where: str = ""):
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)", value
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return None
