"""Fingerprints of the ssl_ops code that decides what each campaign stage computes: one listing per stage kind,
one line per file with its sha256.

    python3 training_code.py ../../ssl_ops fingerprints

writes ``fingerprints/core.sha256`` (what every stage runs: the engine, data, backbones, losses, the registries'
base classes) and ``fingerprints/<name>.sha256`` for every registered method and pretext: the core lines plus the
module that registers ``name`` and every method or pretext module it imports, directly or not (mean_teacher_refine
pulls in alternating and mean_teacher; paws_finetune pulls in the PAWS pretext).

Each training stage of dvc.yaml depends on its own listing, not on the whole package, so
- an edit to code that only reads, reports or serves results (the report tables, the tuner, the Model Registry,
  progress bars, error wording: ``NOT_TRAINING``) marks no training stale;
- an edit to one method's module re-runs that method's stages (and those that import it), not hours of others;
- an edit to the core re-runs everything, as it must.
The `code` stage depends on the whole package and costs a second; DVC re-runs a training stage only when its
listing changed, and ``git diff fingerprints/`` names the file that did it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
from pathlib import Path

# Relative to ssl_ops/: code that never changes a trained model, a pre-training or a metrics file.
NOT_TRAINING = ("serving/", "results.py", "tuning.py", "report.py", "progress.py", "cli.py", "errors.py",
                "faults.py")
# The packages whose modules each register one method or pretext (found by pkgutil at run time). A stage runs
# only its own module of these (and what that imports); the packages' base.py and __init__.py are core.
REGISTRIES = ("methods", "pretexts")
# A chained method (its Params' `previous: Path = Path("models/<name>.pt")`) loads that method's checkpoint through
# the registry (METHODS[name], e.g. its exported_prefix), so it runs <name>'s module too, with no import to find.
PREVIOUS = re.compile(r"^\s+previous:.*Path\(\s*[\"']models/(\w+)\.pt[\"']", re.MULTILINE)
REGISTERS = re.compile(r"^@register_(?:method|pretext)\(\s*[\"'](\w+)[\"']", re.MULTILINE)


def _line(package: Path, path: Path) -> str:
    return f"{hashlib.sha256(path.read_bytes()).hexdigest()}  ssl_ops/{path.relative_to(package).as_posix()}\n"


def _is_registered_module(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] in REGISTRIES and parts[1] not in ("__init__.py", "base.py")


def core_files(package: Path) -> list[Path]:
    """Every training file that is not one method's or one pretext's own module."""
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if not rel.startswith(NOT_TRAINING) and not _is_registered_module(rel):
            out.append(path)
    return out


def _imported_modules(package: Path, path: Path) -> set[Path]:
    """The method / pretext module files that ``path`` imports anywhere in its body (absolute or relative)."""
    here = path.relative_to(package).parent.parts  # the importing module's package, inside ssl_ops
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing file's package, up level - 1
                base = ".".join(("ssl_ops", *here[: len(here) - node.level + 1]))
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from ssl_ops.methods import vat`
        else:
            continue
        for name in names:
            parts = name.split(".")
            if len(parts) >= 3 and parts[0] == "ssl_ops" and parts[1] in REGISTRIES:
                file = package / parts[1] / f"{parts[2]}.py"
                if file.is_file() and _is_registered_module(file.relative_to(package).as_posix()):
                    found.add(file)
    return found


def own_files(package: Path, module: Path, modules: dict[str, Path]) -> list[Path]:
    """``module`` and every method / pretext module it imports or chains from (``PREVIOUS``), transitively;
    ``modules`` maps registered names to their modules."""
    seen, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            chained = {modules[n] for n in PREVIOUS.findall(path.read_text()) if n in modules}
            todo.extend((_imported_modules(package, path) | chained) - seen)
    return sorted(seen)


def registered(package: Path) -> dict[str, Path]:
    """Method / pretext name -> the module that registers it (read from the decorators, nothing imported)."""
    out: dict[str, Path] = {}
    for kind in REGISTRIES:
        for path in sorted((package / kind).glob("*.py")):
            if not _is_registered_module(path.relative_to(package).as_posix()):
                continue  # base.py names the decorator in a comment; it registers nothing
            for name in REGISTERS.findall(path.read_text()):
                if name in out:
                    raise SystemExit(f"error: {name!r} is registered twice: {out[name]} and {path}")
                out[name] = path
    return out


def listings(package: Path) -> dict[str, str]:
    """{"core": core listing, name: core + that name's own files, for every registered name}."""
    core = "".join(_line(package, p) for p in core_files(package))
    out = {"core": core}
    modules = registered(package)
    for name, module in modules.items():
        out[name] = core + "".join(_line(package, p) for p in own_files(package, module, modules))
    return out


def main(package: str, out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    new = listings(Path(package))
    for name, text in new.items():
        path = folder / f"{name}.sha256"
        if path.is_file() and path.read_text() == text:
            continue  # unchanged: keep the file (and its mtime) as it is
        tmp = folder / f"{name}.sha256.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)  # never a half-written listing
    for stale in folder.glob("*.sha256"):  # a method that was removed or renamed
        if stale.stem not in new:
            stale.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python3 training_code.py PACKAGE_DIR OUT_DIR   (e.g. ../../ssl_ops fingerprints)")
    main(*sys.argv[1:3])
