"""The accuracy report reads MLflow runs: mean ± std over seeds per method and budget, the supervised
baseline difference, latest-run de-duplication, the runs it must ignore, plot data and PNGs."""

from __future__ import annotations

import csv
import time

import pytest

from ssl_ops import report, tracking
from ssl_ops.errors import SslOpsError
from ssl_ops.params import TrackingParams
from ssl_ops.stages import report_stage


def _log(cfg, method, lpc, seed, acc, seconds=10.0, steps=(2, 3), status_ok=True, tags=None, evaluated=True):
    params = {"data": {"name": "digits"}, "split": {"labels_per_class": lpc, "label_fraction": None, "seed": seed},
              "train": {"seed": seed, "epochs": steps[0], "steps_per_epoch": steps[1], "batch_size": 16},
              method: {"epochs": None, "steps_per_epoch": None, "batch_size": None}}
    try:
        with tracking.start_run(cfg, run_name=method, params=params, tags={"method": method, **(tags or {})}):
            if evaluated:
                tracking.log_metrics({"test_top1": acc, "val_top1": acc, "train_seconds": seconds})
            if not status_ok:
                raise RuntimeError("a failed run")
    except RuntimeError:
        pass
    time.sleep(0.01)  # distinct start times (ms) for the latest-run rule


@pytest.fixture
def store(mlflow_uri, request):
    return TrackingParams(uri=mlflow_uri, experiment=f"report-{request.node.name}")


def test_mean_std_baseline_and_winner(store, tiny, tmp_path):
    sup, vat = [0.60, 0.62, 0.64], [0.70, 0.71, 0.75]
    for seed in range(3):
        _log(store, "supervised", 10, seed, sup[seed], seconds=5.0)
        _log(store, "vat", 10, seed, vat[seed], seconds=20.0)
    _log(store, "supervised", 25, 0, 0.80)  # one seed at another budget: no std, still reported
    _log(store, "vat", 10, 0, 0.10, seconds=20.0)  # re-run of vat seed 0: the latest run replaces the first
    vat[0] = 0.10
    _log(store, "pi_model", 10, 0, 0.99, status_ok=False)  # failed run: ignored
    _log(store, "pi_model", 10, 1, 0.99, evaluated=False)  # never evaluated: ignored
    _log(store, "rotation", 10, 0, 0.99, tags={"method": "rotation", "stage": "pretrain"}, evaluated=False)

    rows = report_stage(tiny(f"tracking.uri={store.uri}"), out_dir=tmp_path, experiment=store.experiment)
    assert sorted((r["method"], r["budget"]) for r in rows) == sorted(
        [("supervised", "10 labels/class")] * 3 + [("vat", "10 labels/class")] * 3
        + [("supervised", "25 labels/class")])
    text = (tmp_path / "summary.md").read_text()
    # by hand: supervised mean 0.62, sample std sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02; vat [0.10, 0.71, 0.75]:
    # mean 0.52, deviations -0.42, 0.19, 0.23 -> sqrt((0.1764 + 0.0361 + 0.0529) / 2) = sqrt(0.1327) = 0.36428
    assert "| supervised | 62.00% ± 2.00% (n=3) | 80.00% (n=1) |" in text
    assert "| vat | 52.00% ± 36.43% (n=3) [-10.00%] | — |" in text
    assert "1 older duplicate" in text and "6 steps x 16" in text
    assert "- 10 labels/class: **supervised** 62.00%" in text  # vat's mean fell below after the re-run
    assert "| vat | 20 | — |" in text  # mean wall time table

    with open(tmp_path / "plots/accuracy_vs_labels.csv") as f:
        by_labels = list(csv.DictReader(f))
    assert {(d["method"], d["labels_per_class"], d["seeds"]) for d in by_labels} == {
        ("supervised", "10", "3"), ("vat", "10", "3"), ("supervised", "25", "1")}
    vat10 = next(d for d in by_labels if d["method"] == "vat")
    assert float(vat10["test_top1"]) == pytest.approx(0.52)
    assert float(vat10["test_top1_std"]) == pytest.approx(0.36428, abs=1e-5)
    with open(tmp_path / "plots/accuracy_vs_time.csv") as f:
        assert len(list(csv.DictReader(f))) == 7  # one row per counted run
    for png in ("accuracy_vs_labels.png", "accuracy_vs_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedules_are_not_averaged_together(store, tiny, tmp_path):
    _log(store, "supervised", 10, 0, 0.5, steps=(2, 3))
    _log(store, "supervised", 10, 1, 0.7, steps=(4, 3))
    report_stage(tiny(f"tracking.uri={store.uri}"), out_dir=tmp_path, experiment=store.experiment)
    text = (tmp_path / "summary.md").read_text()
    assert "## digits, 6 steps x 16" in text and "## digits, 12 steps x 16" in text
    assert "50.00% (n=1)" in text and "70.00% (n=1)" in text


def test_method_section_overrides_the_schedule():
    run = {"run_id": "r", "status": "FINISHED", "start_time": 1, "tags": {"method": "vat"},
           "metrics": {"test_top1": 0.5},
           "params": {"data.name": "digits", "split.labels_per_class": "10", "split.label_fraction": "None",
                      "split.seed": "0", "train.seed": "0", "train.epochs": "2", "train.steps_per_epoch": "3",
                      "train.batch_size": "16", "vat.epochs": "5", "vat.steps_per_epoch": "None",
                      "vat.batch_size": "None"}}
    row = report.parse_run(run)
    assert row is not None and row.steps == 15 and row.batch_size == 16


def test_no_runs_is_a_clear_error(store, tiny, tmp_path):
    with pytest.raises(SslOpsError, match="no evaluated digits runs in MLflow experiment"):
        report_stage(tiny(f"tracking.uri={store.uri}"), out_dir=tmp_path, experiment="nothing-here")
    assert not (tmp_path / "summary.md").exists()


def test_dvc_plots_show_renders_one_colour_per_method(tmp_path):
    """The dvc.yaml plots definitions and .dvc/plots templates render the report's CSVs (no MLflow needed)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ssl_ops import io

    repo, bin_ = Path(__file__).resolve().parents[1], Path(sys.executable).parent
    rows = [report.RunRow(f"r{m}{s}", "digits", m, lpc, None, s, s, 6, 16, 0.5 + 0.1 * s, 0.5, 3.0, s, "x")
            for m in ("supervised", "vat") for lpc in (10, 25) for s in (0, 1)]
    by_labels, per_run = report.plot_tables(rows)
    io.write_text(tmp_path / "reports/plots/accuracy_vs_labels.csv", report._csv(by_labels))
    io.write_text(tmp_path / "reports/plots/accuracy_vs_time.csv", report._csv(per_run))
    shutil.copy(repo / "dvc.yaml", tmp_path / "dvc.yaml")
    # every list dvc.yaml's foreach stages iterate over must exist, even empty
    (tmp_path / "params.yaml").write_text("pipeline: {methods: [supervised], pretexts: [], chained: {}}\n"
                                          "data: {name: digits}\n")
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [str(bin_ / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    shutil.copytree(repo / ".dvc/plots", tmp_path / ".dvc/plots")
    proc = subprocess.run([str(bin_ / "dvc"), "plots", "show", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    plots = json.loads(proc.stdout)["data"]
    labels, timing = plots["accuracy_vs_labels"][0]["content"], plots["accuracy_vs_wall_time"][0]["content"]
    assert labels["encoding"]["color"]["field"] == "method" and timing["encoding"]["color"]["field"] == "method"
    assert len(labels["data"]["values"]) == 4 and len(timing["data"]["values"]) == 8  # 2 methods x 2 budgets; runs
