"""Reading input text files (scenario TOML, profiles and resources CSV, grid JSON).

One door for every input file: :func:`read_input_text` returns its text or raises an
:class:`~lfm_zonal.errors.InputError` of one line that names the file and says what is
wrong with it (missing, a folder, unreadable, binary, UTF-16, Latin-1, too large).
Every path read is remembered, so that a results folder holding an input is never
replaced (see :mod:`lfm_zonal.files.outputs`).

Standard library only at import (pandas is loaded by :func:`read_csv_cells` when called):
importing it costs nothing.
"""

from __future__ import annotations

import codecs
import csv
import os
import re
import sys
import tomllib
from pathlib import Path

from lfm_zonal.errors import InputError

MAX_INPUT_BYTES = 2 * 1024**3  # an input file beyond this is refused before reading
SHIPPED = "lfm_zonal.scenarios"  # the package of the shipped scenarios and parameter sets

_READ: set[Path] = set()  # every input file read in this process (resolved)


def read_input_text(path: str | os.PathLike, what: str, *, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The text of the input file ``path`` (a ``what``: "scenario TOML", "profiles CSV" ...).

    UTF-8, with or without a byte-order mark; line endings as in the file. Anything else
    is refused with one line naming the file:

    * missing, a folder, unreadable (permissions, a device), larger than ``max_bytes``;
    * binary (a NUL byte), UTF-16 or UTF-32 (byte-order mark), or not UTF-8 (e.g. Latin-1),
      with the line and column of the first byte that is not UTF-8.
    """
    p = Path(path)
    if str(path) == "":
        raise InputError(f"{what}: empty file name")
    try:
        require_file(p, what)
        size = p.stat().st_size
        if size > max_bytes:
            raise InputError(
                f"{what} {p} is {size / 1024**2:.0f} MiB; at most {max_bytes / 1024**2:.0f} MiB "
                "are read"
            )
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    remember_input(p)
    return decode_input(data, p, what)


def require_file(path: Path, what: str) -> None:
    """``path`` is an existing regular file, or one InputError line naming the ``what`` and
    saying what it is instead (missing, a folder, a device or pipe)."""
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a regular file")


def parse_toml(text: str, origin: str) -> dict:
    """TOML text as a dict, or one InputError line naming ``origin``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{origin}: not valid TOML ({exc})") from None


def _shipped(folder: str):
    import importlib.resources

    root = importlib.resources.files(SHIPPED)
    return root.joinpath(folder) if folder else root


def shipped_tomls(folder: str = "") -> dict[str, str]:
    """The TOML files shipped in ``folder`` of lfm_zonal/scenarios: name -> description."""
    out = {}
    for entry in sorted(_shipped(folder).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[entry.name[:-5]] = str(data.get("description", ""))
    return out


def shipped_toml_text(name: str, folder: str = "") -> str:
    """The text of the shipped TOML file ``name`` in ``folder`` of lfm_zonal/scenarios."""
    return _shipped(folder).joinpath(f"{name}.toml").read_text(encoding="utf-8")


def read_csv_cells(path: Path, what: str):
    """A CSV table of the user as text cells (a DataFrame of str, empty cells ""), or one
    InputError line naming the file, and the row and column where there is one (row 1
    is the header): missing (``what`` names the file: "profile file"), not CSV, a value
    without a header (also beyond the header's columns), a column twice. The empty
    column a trailing comma on the header line makes is dropped."""
    import pandas as pd

    require_file(path, what)
    _require_row_widths(path)
    try:
        # index_col=False: a trailing comma on the data rows is not an index column.
        table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except Exception as exc:
        reason = " ".join(str(exc).split())  # one line
        # A row one value wider than the others, the extra one empty (1,5, in a row whose
        # neighbours have no trailing comma): pandas' tokenizer says so in its own words.
        wide = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", reason)
        if wide is not None:
            width, row, values = (int(g) for g in wide.groups())
            raise _too_wide(path, row, values, width) from None
        raise InputError(f"{path}: not a readable CSV file ({reason})") from None
    for pos, name in enumerate(list(table.columns)):
        text = str(name)
        if text.startswith("Unnamed:"):
            filled = [i for i, cell in enumerate(table[name]) if cell.strip() != ""]
            if filled:
                row = filled[0] + 2
                raise InputError(f"{path}, row {row}, column {pos + 1}: a value without a header")
            table = table.drop(columns=name)  # a trailing comma on the header line
        elif re.fullmatch(r"(.+)\.\d+", text) and text.rsplit(".", 1)[0] in table.columns:
            raise InputError(f"{path}: column '{text.rsplit('.', 1)[0]}' appears twice")
    return table


def _require_row_widths(path: Path) -> None:
    """No row of the CSV file ``path`` has a value beyond its header's columns: pandas
    (index_col=False) drops them, so that a decimal comma (1,5) shifted the row's later
    values one column on. Empty cells there (trailing commas) are allowed. Rows are
    counted as pandas counts them (the header row 1, blank lines skipped)."""
    # A cell may be long; the module's limit is the process's: given back afterwards.
    before = csv.field_size_limit(min(sys.maxsize, MAX_INPUT_BYTES))
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as file:
            rows = (fields for fields in csv.reader(file) if fields)
            width = len(next(rows, []))
            for number, fields in enumerate(rows, start=2):
                if len(fields) > width and any(cell.strip() for cell in fields[width:]):
                    raise _too_wide(path, number, len(fields), width)
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from None
    finally:
        csv.field_size_limit(before)


def _too_wide(path: Path, row: int, values: int, width: int) -> InputError:
    columns = f"{width} column{'s' if width != 1 else ''}"
    return InputError(
        f"{path}, row {row}: {values} values, the header has {columns} (a decimal comma? "
        "write 1.5, not 1,5)"
    )


def decode_input(data: bytes, origin: str | os.PathLike, what: str) -> str:
    """``data`` as UTF-8 text (BOM dropped), or one-line refusal naming ``origin``."""
    for bom, name in (
        (codecs.BOM_UTF32_LE, "UTF-32"),
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if data.startswith(bom):
            raise InputError(f"{origin}: {what} is {name} text; save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if b"\x00" in data:
        if _looks_utf16(data):
            raise InputError(f"{origin}: {what} is UTF-16 text; save it as UTF-8")
        raise InputError(f"{origin}: {what} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        hint = " (Latin-1 or Windows-1252?)" if _is_latin1(data) else ""
        raise InputError(
            f"{origin}: {what} is not UTF-8 text{hint}: byte 0x{data[exc.start]:02x} at line "
            f"{line}, column {column}; save it as UTF-8"
        ) from None


def remember_input(path: str | os.PathLike) -> None:
    """Record ``path`` as an input of this run (a results folder holding it is never replaced)."""
    try:
        _READ.add(Path(path).resolve())
    except (OSError, RuntimeError):
        pass


def inputs_read() -> frozenset[Path]:
    """Every input file read (or remembered) in this process, resolved."""
    return frozenset(_READ)


def _looks_utf16(data: bytes) -> bool:
    head = data[:4096]
    if len(head) < 4:
        return False
    even, odd = head[0::2], head[1::2]
    return odd.count(0) > 0.4 * len(odd) or even.count(0) > 0.4 * len(even)


def _is_latin1(data: bytes) -> bool:
    """Text bytes that decode as Latin-1 / CP1252 to printable characters."""
    try:
        text = data[:65536].decode("cp1252")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)
