"""pipelines/fmnist_10pc (issue 17): the campaign's DVC graph and its run.sh, on a copy that trains on digits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import migrated_mlflow_db

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ROOT / "pipelines" / "fmnist_10pc"
BIN = Path(sys.executable).parent  # dvc and ssl-ops of this environment


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # run.sh picks the campaign's store
    return {**env, "PATH": f"{BIN}:{env['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check and res.returncode:
        pytest.fail(f"{args} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture
def campaign(tmp_path) -> Path:
    """A git repo holding the campaign folder, params.yaml and the presets as in this tree, and the package
    (linked); the campaign's params switched to digits, 2 splits, 2 methods, 1 pretext, a few steps each."""
    (tmp_path / "pipelines").mkdir()
    shutil.copytree(CAMPAIGN, tmp_path / "pipelines" / "fmnist_10pc",
                    ignore=shutil.ignore_patterns("seed*", "data", "models", "metrics", "mlflow.db", "dvc.lock",
                                                  "runs"))
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "ssl_ops").symlink_to(ROOT / "ssl_ops")
    path = tmp_path / "pipelines" / "fmnist_10pc" / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    tree["data"] = {"name": "digits"}
    tree["train"].update(epochs=2, steps_per_epoch=2, batch_size=16, eval_batch_size=256, warmup_epochs=0)
    tree["pipeline"].update(seeds=[0, 1], methods=["supervised", "vat"], pretexts=["rotation"])
    for section in ("rotation", "paws", "paws_finetune", "vat"):
        tree[section] = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8}
    path.write_text(yaml.safe_dump(tree))
    _run(["git", "init", "-q"], tmp_path)
    _run(["dvc", "init", "-q", "--subdir"], tmp_path / "pipelines")  # as in this repo: pipelines/ is its own project
    return tmp_path / "pipelines" / "fmnist_10pc"


@pytest.mark.slow
def test_every_method_has_a_recipe_and_the_graph_resolves(campaign):
    """Every stage's preset exists (run.sh refuses a method without one), and the graph orders a transfer method
    after the pre-training it starts from."""
    stages = _run(["dvc", "stage", "list", "--name-only"], campaign).stdout.split()
    assert {"method@0-supervised", "method@1-vat", "pretrain@rotation", "alternating@1", "paws@0",
            "paws_finetune@1", "moam_finetune@0", "report"} <= set(stages)
    dry = _run(["dvc", "repro", "--dry", "--force", "alternating@0"], campaign).stdout
    assert dry.index("pretrain@rotation") < dry.index("alternating@0")
    (campaign.parents[1] / "presets" / "fmnist_10pc" / "pi_model.yaml").unlink()
    missing = _run(["./run.sh", "0", "train", "pi_model"], campaign, check=False)
    assert missing.returncode == 2 and "no recipe" in missing.stderr and "pi_model.yaml" in missing.stderr


@pytest.mark.slow
def test_campaign_runs_per_split_and_reports(campaign):
    """A scratch method on two splits, PAWS per split, the report: one MLflow store, rows per split, and `dvc status`
    of the same targets finds everything up to date."""
    targets = ["method@0-supervised", "method@1-supervised", "paws@0", "report"]
    migrated_mlflow_db(campaign / "mlflow.db")  # run.sh's store, tables made (the first ssl-ops process saves ~14 s)
    _run(["dvc", "repro", *targets[:-1]], campaign)  # with what they need: prepare, the splits
    for seed in (0, 1):
        assert (campaign / f"seed{seed}" / "models" / "supervised.pt").is_file()
    # the report stage needs every split's metrics (dvc repro runs it last); mid-campaign, run.sh runs it alone
    report = ["./run.sh", "shared", "results", "--ledger", "runs", "--out", "../../reports/results_fmnist_10pc.md"]
    _run(report, campaign)
    md = (campaign.parents[1] / "reports" / "results_fmnist_10pc.md").read_text()
    assert "| supervised | 0,1 |" in md and "| paws_nn | 0 |" in md
    assert sorted(p.name for p in (campaign / "runs").iterdir()) == [
        "pretrain-paws-seed0.json", "supervised-seed0.json", "supervised-seed1.json"]
    # a clone has the ledger (in git) but not the MLflow store: the same table from the ledger alone
    (campaign / "mlflow.db").rename(campaign / "moved.db")
    _run(report, campaign)
    again = (campaign.parents[1] / "reports" / "results_fmnist_10pc.md").read_text()
    assert again == md
    (campaign / "moved.db").rename(campaign / "mlflow.db")
    status = _run(["dvc", "status", *targets[:-1]], campaign).stdout
    assert "up to date" in status, status
    # issue 17: `dvc exp run -S` of one recipe value re-runs that method's stages and no other (`++` adds a key the
    # recipe does not set yet, as README's example does)
    repo = campaign.parents[1]
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "campaign"], repo)
    exp = _run(["dvc", "exp", "run", "-S", "../../presets/fmnist_10pc/supervised.yaml:++train.nesterov=false",
                *targets[:-1]], campaign).stdout
    ran = {line.split("'")[1] for line in exp.splitlines() if line.startswith("Running stage '")}
    assert ran == {"method@0-supervised", "method@1-supervised"}, exp
    recipe = yaml.safe_load((repo / "presets" / "fmnist_10pc" / "supervised.yaml").read_text())
    assert recipe["train"]["nesterov"] is False


@pytest.mark.slow  # demo.sh end to end: dvc and ssl-ops subprocesses, a minute
def test_demo_trains_both_rows_and_states_the_gain(campaign):
    """`make demo` (issue 17 item 5): the supervised baseline and PAWS-NN on split 0, a table with the gain, all in
    demo/ (its own MLflow store), leaving the campaign's store and reports/ alone."""
    recipe = campaign.parents[1] / "presets" / "fmnist_10pc" / "paws.yaml"  # the campaign's, shortened here
    recipe.write_text(yaml.safe_dump({"paws": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8}}))
    (campaign / "demo").mkdir()
    demo_store = migrated_mlflow_db(campaign / "demo" / "mlflow.db")  # tables made: its first process saves ~14 s
    res = _run(["./demo.sh"], campaign)
    table = res.stdout[res.stdout.index("results: experiment fmnist-10pc-demo"):]
    assert "supervised" in table and "paws_nn" in table, res.stdout
    md = (campaign / "demo" / "results.md").read_text()
    sup, paws = (next(line for line in md.splitlines() if line.startswith(f"| {row} | 0 |"))
                 for row in ("supervised", "paws_nn"))
    sup_test, (paws_test, delta) = float(sup.split("|")[3]), map(float, paws.split("|")[3:5])
    assert abs(paws_test - sup_test - delta) < 0.011  # one split: the gain is the difference of the two test top-1
    assert "Best method: paws_nn" in table and f"({delta:+.2f} points over supervised)" in table, table
    import mlflow

    client = mlflow.MlflowClient(demo_store)  # the demo's runs are in its own store
    names = {r.info.run_name for r in client.search_runs([client.get_experiment_by_name("fmnist-10pc-demo").experiment_id])}
    assert names >= {"supervised", "pretrain-paws"}, names
    assert not (campaign / "mlflow.db").exists()
    assert not (campaign.parents[1] / "reports").exists()


def test_training_stages_ignore_code_that_only_reports(tmp_path):
    """The campaign's stages depend on training_code.sha256, not on the package: an edit to the report code
    leaves the listing (and so hours of trainings) unchanged; an edit to the training loop changes its line."""
    sys.path.insert(0, str(CAMPAIGN))
    try:
        import training_code
    finally:
        sys.path.remove(str(CAMPAIGN))
    pkg = tmp_path / "ssl_ops"
    (pkg / "serving").mkdir(parents=True)
    for rel in ("engine.py", "results.py", "serving/model_registry.py", "methods.py"):
        (pkg / rel).write_text("x = 1\n")
    before = training_code.listing(pkg)
    assert [line.split()[1] for line in before.splitlines()] == ["ssl_ops/engine.py", "ssl_ops/methods.py"]
    (pkg / "results.py").write_text("x = 2\n")
    (pkg / "serving" / "model_registry.py").write_text("x = 2\n")
    assert training_code.listing(pkg) == before
    (pkg / "engine.py").write_text("x = 2\n")
    after = training_code.listing(pkg)
    assert after != before and after.splitlines()[1] == before.splitlines()[1]
    training_code.main(str(pkg), str(tmp_path / "listing"))
    assert (tmp_path / "listing").read_text() == after and not (tmp_path / "listing.tmp").exists()
