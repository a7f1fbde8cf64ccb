"""benchmarks/paws_seed_spread.py without training: the runs it finds in an MLflow store (the resume rule), the variance
split, the report's tables, and the campaign params it trains with (those of the paws@S stage, but train.seed)."""

from __future__ import annotations

import statistics

import mlflow
import pytest

from benchmarks import paws_seed_spread as spread


def _log(uri: str, experiment: str, split: int, seed: int, test: float, val: float, status: str = "FINISHED",
         curve: list[float] = (), **changed: str) -> None:
    """A run as pretrain_stage logs one: the recipe's params (``changed`` overriding some), PAWS-NN's metrics."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, tags={"machine": "M", "git_commit": "abc1234def"})
    params = spread.recipe(split, seed) | {k.replace("__", "."): v for k, v in changed.items()}
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    for epoch, v in enumerate(curve or [val], 1):  # the per-epoch val monitor, whose last value is the run's val
        client.log_metric(run.info.run_id, "paws_nn_val_top1", v, step=epoch)
    for k, v in {"paws_nn_top1": test, "cpu_seconds": 600.0, "loadavg_mean": 2.0}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, status=status)


def test_finished_runs_of_the_recipe_are_keyed_by_split_and_seed_and_others_retrain(mlflow_uri):
    _log(mlflow_uri, "spread-a", 0, 0, 0.76, 0.80)
    _log(mlflow_uri, "spread-a", 0, 1000, 0.77, 0.82)
    _log(mlflow_uri, "spread-a", 1, 1001, 0.70, 0.84, status="FAILED")  # a killed run: trained again
    _log(mlflow_uri, "spread-a", 1, 1, 0.99, 0.99, data__name="digits")  # another dataset: not the campaign's
    _log(mlflow_uri, "spread-a", 2, 2, 0.70, 0.70, paws__epochs="40")  # an earlier recipe: trained again
    runs = spread.finished(mlflow_uri, "spread-a")
    assert sorted(runs) == [(0, 0), (0, 1000)]
    assert runs[(0, 1000)]["paws_nn_top1"] == 0.77 and runs[(0, 1000)]["cpu_min"] == 10.0
    assert spread.finished(mlflow_uri, "no-such-experiment") == {}


def test_variance_parts_separate_seeds_of_a_split_from_the_split_means():
    runs = [{"split": 0, "paws_nn_top1": x} for x in (0.74, 0.76)] + [{"split": 1, "paws_nn_top1": x}
                                                                       for x in (0.80, 0.82)]
    parts = spread.variance_parts(runs)
    assert parts["seed_sd"] == pytest.approx(statistics.stdev([74, 76]))  # both splits' seeds differ by 2 points
    assert parts["split_means_sd"] == pytest.approx(statistics.stdev([75, 81]))
    one_each = spread.variance_parts([{"split": 0, "paws_nn_top1": 0.7}, {"split": 1, "paws_nn_top1": 0.8}])
    assert one_each["seed_sd"] != one_each["seed_sd"]  # NaN: no split has two seeds


def test_report_lists_each_run_and_each_split_beside_the_ledger(mlflow_uri, tmp_path, monkeypatch):
    for split, seed, test, val in [(0, 0, 0.76, 0.80), (0, 1000, 0.78, 0.84), (1, 1, 0.795, 0.92)]:
        _log(mlflow_uri, "spread-b", split, seed, test, val,
             curve=[0.7] * 10 + [0.8] * 9 + [val] if seed == 1000 else [])
    monkeypatch.setattr(spread, "OUT", tmp_path / "paws_seed_spread")
    out = spread.report(mlflow_uri, "spread-b")
    md = (tmp_path / "paws_seed_spread.md").read_text()
    # the val curve's last 10 epochs against the 10 before: (0.8 x 9 + 0.84) / 10 - 0.7 = +10.4 points
    assert "| 0 | 1000 | 78.00 | 42 | +10.4 | 3000 x 64 | 10.0 | 2.0 | M | abc1234def |" in md
    assert "| 0 | 0 | 76.00 | 40 | - | 3000 x 64 |" in md  # no curve to tell
    assert "| 0 | 2 | 77.00 | 76.00 to 78.00 | 41.0 |" in md  # split 0: its two seeds
    assert f"All 3 runs: PAWS-NN test top-1 **{statistics.mean([76, 78, 79.5]):.2f} ± " in md
    # the campaign's ledger (in git) gives the report's own paws@S runs
    assert sorted(out["ledger"]) == [0, 1, 2] and f"| {100 * out['ledger'][0]['paws_nn_top1']:.2f} |" in md
    with pytest.raises(spread.SslOpsError, match="no finished PAWS run"):
        spread.report(mlflow_uri, "empty-experiment")


def test_runs_use_the_paws_stage_params_at_another_training_seed():
    params = spread.campaign_params(2, 1002, "x")
    assert (params.split.seed, params.train.seed) == (2, 1002)
    assert params.model.backbone == "convnet_deep" and params.paws.epochs == 60  # the recipe's preset, not defaults
    assert params.split.labels_per_class == 10 and params.data.name == "fashion_mnist"  # the campaign's params.yaml
    assert params.tracking.experiment == "x"


def test_run_trains_only_the_missing_pairs_and_names_the_failed_ones(monkeypatch, tmp_path):
    """`run` starts one `one S T` subprocess per pair the store lacks (train.seed = split + offset) and fails naming
    the pairs whose process failed, after the others ran."""
    monkeypatch.setattr(spread, "HERE", tmp_path)
    # Its own split files: the check before training must not depend on what this clone has built.
    monkeypatch.setattr(spread, "CAMPAIGN", tmp_path)
    (tmp_path / "data" / "splits").mkdir(parents=True)
    for s in (0, 1):
        (tmp_path / "data" / "splits" / f"fashion_mnist-10pc-seed{s}.json").write_text("{}")
    monkeypatch.setattr(spread, "finished", lambda store, exp: {(0, 0): {}})
    started = []

    def fake_run(cmd, **kw):
        split, seed = int(cmd[4]), int(cmd[5])
        started.append((split, seed))
        assert kw["env"]["OMP_NUM_THREADS"] == "1"
        return type("Done", (), {"returncode": 1 if (split, seed) == (1, 1001) else 0})()

    monkeypatch.setattr(spread.subprocess, "run", fake_run)
    with pytest.raises(spread.SslOpsError, match=r"1 runs failed: \[\(1, 1001\)\]"):
        spread.run_all([0, 1], [0, 1000], "sqlite:///x.db", "e", jobs=2)
    assert sorted(started) == [(0, 1000), (1, 1), (1, 1001)]


def test_run_refuses_a_missing_split_before_training_anything(monkeypatch, tmp_path):
    """A split the campaign has not built stops `run` with the dvc command that builds it, and no process starts."""
    monkeypatch.setattr(spread, "HERE", tmp_path)
    monkeypatch.setattr(spread, "CAMPAIGN", spread.REPO / "no-such-campaign")
    monkeypatch.setattr(spread.subprocess, "run", lambda *a, **k: pytest.fail("trained with a split missing"))
    with pytest.raises(spread.SslOpsError, match=r"split 3 is missing: cd no-such-campaign && dvc repro -s prepare "
                                                 r"split@3"):
        spread.run_all([3], [0], "sqlite:///x.db", "e", jobs=1)
