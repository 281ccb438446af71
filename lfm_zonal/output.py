"""Result folders that appear only when complete, and plain table writers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from lfm_zonal.errors import InputError

FLOAT_FORMAT = "%.10g"  # stable text: the same numbers give the same bytes


@contextlib.contextmanager
def result_folder(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write into a hidden sibling folder; move it to ``out`` only when the block succeeds.

    An interrupted or failed run leaves no folder named ``out`` (the partial one
    is removed), so nothing half-written is ever passed off as a result.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise InputError(f"output folder {out} exists and is not empty (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def write_csv(frame: pd.DataFrame | pd.Series, path: Path, index: bool = True) -> None:
    frame.to_csv(path, index=index, float_format=FLOAT_FORMAT, lineterminator="\n")


def write_json(data: dict, path: Path) -> None:
    path.write_text(
        json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n", encoding="utf-8"
    )


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    return str(value)
