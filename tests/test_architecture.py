"""The architecture contract (docs/architecture.md): import-linter's contracts in pyproject.toml hold, they fail
on an upward import, and no ssl_ops modules import each other in a cycle, imports inside functions included.

The broken-on-purpose cases copy the package to a temporary folder and add one import there, so the real tree is
never touched."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the ssl_ops package under ``root`` with ``root``/pyproject.toml's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's ssl_ops, not an installed copy
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


# grimp reads the files (it imports nothing) and records every import statement: inside functions and under
# TYPE_CHECKING too. In a subprocess, so that it finds the ssl_ops of ``root`` rather than the one imported here.
EDGES = ("import json, grimp; g = grimp.build_graph('ssl_ops', cache_dir=None); "
         "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))")


def import_graph(root: Path) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, "-c", EDGES], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def import_cycles(edges: dict[str, list[str]]) -> list[tuple[str, ...]]:
    """Each group of modules that import each other in a loop (directly or through others), sorted."""
    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(edges.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += edges.get(m, ())
        return seen

    reach = {m: reachable(m) for m in edges}
    return sorted({tuple(sorted({m} | {n for n in reach[m] if m in reach[n]})) for m in edges if m in reach[m]})


@pytest.fixture
def copy_of_tree(tmp_path):
    """The package and pyproject.toml copied to tmp_path; ``add(module_path, line)`` appends a line to a module."""
    shutil.copytree(ROOT / "ssl_ops", tmp_path / "ssl_ops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)

    def add(rel: str, line: str) -> Path:
        path = tmp_path / rel
        path.write_text((path.read_text() if path.exists() else "") + "\n" + line + "\n")
        return tmp_path

    return add


def test_contracts_hold():
    p = lint_imports(ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "3 kept, 0 broken" in p.stdout


@pytest.mark.parametrize("module, line, message", [
    # an engine helper reaching up for a stage's constant, inside a function (still an import)
    ("ssl_ops/engine.py", "def _models_dir():\n    from ssl_ops.stages import MODELS\n    return MODELS",
     "ssl_ops.engine is not allowed to import ssl_ops.stages"),
    # a building block reading the params composition (the old knot: sections importing the registries)
    ("ssl_ops/augment.py", "from ssl_ops.params import load_params",
     "ssl_ops.augment is not allowed to import ssl_ops.params"),
    ("ssl_ops/results.py", "import mlflow", "Illegal imports of protected package mlflow"),
])
def test_an_upward_import_breaks_the_contract(copy_of_tree, module, line, message):
    p = lint_imports(copy_of_tree(module, line))
    assert p.returncode != 0 and message in p.stdout, p.stdout[-4000:]


def test_a_new_top_level_module_must_be_placed_in_a_layer(copy_of_tree):
    root = copy_of_tree("ssl_ops/newthing.py", "X = 1")
    p = lint_imports(root)
    assert p.returncode != 0 and "newthing" in p.stdout, p.stdout[-4000:]


def test_no_import_cycle_counting_imports_inside_functions():
    assert import_cycles(import_graph(ROOT)) == []


def test_the_cycle_check_sees_an_import_inside_a_function(copy_of_tree):
    """The same check fails once ``ssl_ops.sections`` (a leaf) imports the registries inside a validator, as
    params.py did before its checks moved up: grimp's graph counts function-level imports."""
    root = copy_of_tree("ssl_ops/sections.py",
                        "def _known():\n    from ssl_ops.methods import METHODS\n    return METHODS")
    cycles = import_cycles(import_graph(root))
    assert any({"ssl_ops.sections", "ssl_ops.methods.base"} <= set(c) for c in cycles), cycles


def test_a_model_logged_before_the_rename_still_loads(tmp_path, monkeypatch, mlflow_uri):
    """Models logged before issue 19 carry the old entry point, ``registry_model.py``, whose import of
    ``ssl_ops.registry`` names a module that no longer exists; ``load_model`` (``ssl-ops predict``) still loads them."""
    import mlflow
    import numpy as np

    from ssl_ops.backbones import build_backbone
    from ssl_ops.heads import Classifier, Normalize
    from ssl_ops.serving import model_registry as registry

    old_entry = tmp_path / "registry_model.py"  # the file as it was, word for word, before the rename
    old_entry.write_text("import mlflow\n\nfrom ssl_ops.registry import ImageClassifierModel\n\n"
                         "mlflow.models.set_model(ImageClassifierModel())\n")
    monkeypatch.setattr(registry, "MODEL_CODE", old_entry)
    mlflow.set_tracking_uri(mlflow_uri)
    net = Classifier(Normalize([0.5], [0.5]), build_backbone("convnet", 1, width=0.25, image_size=8), 2)
    with monkeypatch.context() as then:  # logged while the module had its old name (MLflow runs the file to check it)
        then.setitem(sys.modules, "ssl_ops.registry", registry)
        with mlflow.start_run() as run:
            registry.log_classifier(net, registry.model_spec("convnet", 0.25, (1, 8, 8), ["a", "b"]))
    assert "ssl_ops.registry" not in sys.modules

    class NoOldModule:  # now the file is gone (an older checkout on the import path would otherwise serve it)
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "ssl_ops.registry":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(sys, "meta_path", [NoOldModule, *sys.meta_path])
    loaded = registry.load_model(f"runs:/{run.info.run_id}/model", mlflow_uri)
    out = loaded.model.predict(np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32))
    assert loaded.classes == ["a", "b"] and list(out.columns) == ["predicted", "p_a", "p_b"]
    assert "ssl_ops.registry" not in sys.modules  # the alias lasted only for the load: later tests see no old name
