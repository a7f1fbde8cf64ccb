"""Security (issue 10): every checkpoint/array load refuses pickled code, every server command in the code
and docs binds 127.0.0.1 unless it turns MLflow's authentication on, and credentials in URIs (params or the
MLFLOW_TRACKING_URI environment value) are masked wherever ssl-ops prints, logs or writes them. The malicious
pickle itself is refused in tests/test_registry.py (test_checkpoint_with_pickled_payload_is_refused)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from ssl_ops import tracking
from ssl_ops.cli import main

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted([*(ROOT / "ssl_ops").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            yield f"{node.func.value.id}.{node.func.attr}", {k.arg: k.value for k in node.keywords}, node.lineno


def test_every_load_refuses_pickled_code():
    seen = 0
    for path in CODE:
        for name, kw, line in _calls(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if name == "torch.load":
                seen += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if name == "np.load" and "allow_pickle" in kw:
                assert isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False, where
            assert name not in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load"), where
    assert seen >= 1  # ssl_ops.io.torch_load: the one place checkpoints are read


SERVER = re.compile(r"mlflow\s+(ui|server|models\s+serve)\s+-")  # a command line (with options), not prose
TEXT = [ROOT / "Makefile", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *CODE]


def test_servers_bind_localhost_unless_authenticated():
    commands = [(f"{p.relative_to(ROOT)}:{i}", line) for p in TEXT
                for i, line in enumerate(p.read_text().splitlines(), 1) if SERVER.search(line)]
    assert len(commands) >= 3  # make ui, the report hint, docs/registry.md's serving example, README
    for where, line in commands:
        host = re.search(r"--host[ =]([0-9A-Za-z.:]+)", line)
        assert host, f"{where}: no explicit --host: {line.strip()}"
        assert host.group(1).strip("`'\",[]") in ("127.0.0.1", "localhost") or "--app-name basic-auth" in line, \
            f"{where}: exposed without MLflow authentication: {line.strip()}"


def test_uri_credentials_are_masked_in_printed_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # the report reads the (unreachable) server: a clear error that names it, its password masked
    assert main(["report"]) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert "alice:***@mlflow.example.org is unreachable while reading the runs" in out and "s3cret" not in out
    assert tracking.run_url(tracking.TrackingParams(), "r1") == "https://alice:***@mlflow.example.org run r1"


def test_optuna_storage_password_is_masked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tune": {"spaces": {"supervised": {
        "train.lr": {"type": "float", "low": 0.01, "high": 0.1}}}}}))
    assert main(["tune", "supervised", "--storage", "postgresql://bob:hunter2@127.0.0.1:1/optuna"]) == 2
    err = capsys.readouterr().err
    assert "postgresql://bob:***@127.0.0.1:1/optuna" in " ".join(err.split()) and "hunter2" not in err


@pytest.mark.parametrize(("uri", "masked"), [
    ("postgresql://u:p@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("https://u:p%40ss@host/path?x=1", "https://u:***@host/path?x=1"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"), ("http://host:5000", "http://host:5000"),
])
def test_mask_uri(uri, masked):
    assert tracking.mask_uri(uri) == masked
