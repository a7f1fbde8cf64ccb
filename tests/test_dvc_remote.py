"""A DVC remote (a local directory here; S3 / SSH in the README): push the prepared data and splits,
delete the cache and the outputs, pull, and get byte-identical files back."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline import REPO, _env, _run

DVC = str(Path(sys.executable).parent / "dvc")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".gitignore"}  # git tracks those


@pytest.mark.slow
def test_push_delete_pull_gives_identical_data(tmp_path):
    work, remote = tmp_path / "work", tmp_path / "remote"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "ssl_ops", work / "ssl_ops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "sources", work / "sources", symlinks=True)  # prepare's data-folder deps
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["name"] = "digits"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = _env(work)
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], [DVC, "remote", "add", "-d", "team", str(remote)],
                [DVC, "repro", "split"]):
        proc = _run(cmd, work, env)
        assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr
    before = _digests(work / "data")
    assert any(k.startswith("prepared/digits") for k in before) and any(k.startswith("splits") for k in before)

    proc = _run([DVC, "push", "--with-deps", "split"], work, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(work / ".dvc" / "cache")
    shutil.rmtree(work / "data")
    assert not (work / "data").exists()

    proc = _run([DVC, "pull", "--with-deps", "split"], work, env)  # the stages that ran
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _digests(work / "data") == before
