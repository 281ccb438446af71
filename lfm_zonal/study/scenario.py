"""Scenario files (TOML): built-in scenarios, parsed and checked by the models of
:mod:`lfm_zonal.config`.

Every key has a type, a default and bounds there (the one source); an unknown key,
a wrong type, a number out of range, inf or NaN, or a broken rule across keys is
refused with one message that names the file and the dotted key. The schema is
documented in ``scenarios/README.md`` and printed by ``lfm-zonal scenarios --schema``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from lfm_zonal.config import (
    DEFAULT_SCENARIO,
    DEFAULTS,
    SECTIONS,
    ScenarioConfig,
    field_kind,
    nested_to_data,
    schema_text,
    section_fields,
    validate_scenario,
)
from lfm_zonal.errors import InputError
from lfm_zonal.files.inputs import parse_toml, read_input_text, shipped_toml_text, shipped_tomls

__all__ = [
    "DEFAULT_SCENARIO",
    "SCHEMA",
    "Key",
    "Scenario",
    "builtin_scenarios",
    "load_scenario",
    "parse_scenario",
    "schema_text",
    "validate_values",
]


@dataclass(frozen=True)
class Key:
    """One scenario key as the models of :mod:`lfm_zonal.config` define it (read-only view)."""

    kind: type | tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


#: section ("" the top level) -> key -> Key, derived from the config models.
SCHEMA: dict[str, dict[str, Key]] = {
    section: {
        key: Key(field_kind(section, key), DEFAULTS[section].get(key), info.description or "")
        for key, info in section_fields(section).items()
    }
    for section in SECTIONS
}


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: ``values[section][key]``, with defaults filled in."""

    path: str
    values: dict[str, dict[str, Any]]
    #: Keys a command-line flag set ("zones.k": "--k"): a later check that refuses one of
    #: them names the flag (``where``), not the file.
    flags: dict[str, str] = field(default_factory=dict, compare=False)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    def where(self, key: str) -> str:
        """Who set ``key`` ("section.key"): its flag, else the scenario file."""
        return self.flags.get(key, self.path)

    @property
    def name(self) -> str:
        return self.values[""]["name"]

    @property
    def seed(self) -> int:
        return self.values[""]["seed"]

    @cached_property
    def config(self) -> ScenarioConfig:
        """The typed model of this scenario."""
        return validate_scenario(nested_to_data(self.values), self.path)

    def resolve_path(self, value: str) -> str:
        """A path in the scenario file, relative to the file's folder."""
        p = Path(value)
        if p.is_absolute() or self.path.startswith("builtin:"):
            return str(p)
        return str(Path(self.path).parent / p)


def builtin_scenarios() -> dict[str, str]:
    """Names of the shipped scenarios, with their description."""
    return shipped_tomls()


def load_scenario(spec: str | Path | None = None) -> Scenario:
    """A scenario by built-in name or path to a TOML file (default: the built-in default)."""
    spec = str(spec) if spec is not None else DEFAULT_SCENARIO
    if not spec.endswith(".toml") and spec in builtin_scenarios():
        return parse_scenario(shipped_toml_text(spec), f"builtin:{spec}")
    path = Path(spec)
    if not path.exists():  # a folder or a device: read_input_text says which
        known = ", ".join(builtin_scenarios())
        raise InputError(f"scenario not found: {spec} (not a file; built-in scenarios: {known})")
    return parse_scenario(read_input_text(path, "scenario TOML"), str(path))


def parse_scenario(text: str, origin: str) -> Scenario:
    """A scenario from TOML text; ``origin`` names it in error messages."""
    config = validate_scenario(parse_toml(text, origin), origin)
    scenario = Scenario(origin, config.values())
    scenario.__dict__["config"] = config  # cached: no second validation
    return scenario


def validate_values(nested: dict[str, dict[str, Any]], origin: str) -> dict[str, dict[str, Any]]:
    """Check every key of ``nested`` (section -> key -> value, "" the top level) and fill in
    the defaults; one InputError line naming ``origin`` and the key otherwise."""
    return validate_scenario(nested_to_data(nested), origin).values()
