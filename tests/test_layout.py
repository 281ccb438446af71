"""The package layout: stages import only the stages before them (CONTRIBUTING.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "lfm_zonal"

#: Layers from the bottom up. A module may import modules of its own layer and of the
#: layers below it, never of a layer above.
LAYERS = (
    {"errors", "config", "limits", "files", "report", "progress"},
    {"grid"},
    {"check"},
    {"zones"},
    {"market"},
    {"tender"},
    {"study"},
    {"cli", "__init__"},
)


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _part(module: str) -> str | None:
    """The top-level part of an ``lfm_zonal.<part>...`` module name (None: another package)."""
    names = module.split(".")
    return names[1] if names[0] == "lfm_zonal" and len(names) > 1 else None


def _is_part(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def imports() -> list[tuple[str, str]]:
    """(importing part, imported part) for every import inside lfm_zonal/ (lazy ones too)."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
                if node.module == "lfm_zonal":  # a module, or a name of the package's face
                    targets = [
                        f"lfm_zonal.{a.name if _is_part(a.name) else '__init__'}"
                        for a in node.names
                    ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges += [(own, p) for t in targets if (p := _part(t)) and p != own]
    return edges


def test_every_part_of_the_package_has_a_layer():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    assert parts <= set().union(*LAYERS), parts - set().union(*LAYERS)


def test_no_import_runs_back_up():
    upward = sorted({(a, b) for a, b in imports() if _layer(b) > _layer(a)})
    assert not upward, f"imports from a lower stage to a higher one: {upward}"
