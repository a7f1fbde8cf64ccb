"""ssl-ops tune: search-space validation, a small study on digits, pruning, failures, interruption and resume,
two concurrent worker processes on one storage, and --apply editing params.yaml only when asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from conftest import TINY

from ssl_ops import tuning
from ssl_ops.cli import main
from ssl_ops.errors import ParamsError
from ssl_ops.params import apply_overrides, load_params
from ssl_ops.tuning import TuningError, as_override, run_study

SPACE = {
    "train.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
    "supervised.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
}
BIN = Path(sys.executable).parent


def _write_params(path: Path, space=None, **tune) -> None:
    tune = {"pruner": {"kind": "none"}, **tune, "spaces": {"supervised": space or SPACE}}
    path.write_text(yaml.safe_dump({"tune": tune}))


def _params(workdir: Path, *extra: str, space=None, **tune):
    _write_params(workdir / "params.yaml", space, **tune)
    return load_params("params.yaml", [*TINY, *extra])


def _trials(study_name: str, storage: str = tuning.DEFAULT_STORAGE) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study_name, storage=tuning.make_storage(storage)[0]).trials


def _trial_runs(uri: str, study: str) -> dict[int, mlflow.entities.Run]:
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.get_experiment_by_name("ssl-ops").experiment_id], f"tags.`optuna.study` = '{study}'")
    return {int(r.data.tags["optuna.trial_number"]): r for r in runs if "optuna.trial_number" in r.data.tags}


# ---------------------------------------------------------------------------------------------------------
# search-space validation (at params load, before any work)


@pytest.mark.parametrize(
    ("space", "extra", "expected"),
    [
        ({"train.lrr": {"type": "float", "low": 0.1, "high": 1}}, {},
         "tune.spaces.supervised.train.lrr: train has no key 'lrr'"),
        ({"data.name": {"type": "categorical", "choices": ["mnist"]}}, {}, "'data' cannot be tuned for supervised"),
        ({"split.seed": {"type": "int", "low": 0, "high": 3}}, {}, "'split' cannot be tuned"),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 1}}, {},
         "0.0 is not a valid train.lr: Input should be greater than 0"),
        ({"train.momentum": {"type": "float", "low": 0.5, "high": 1.5}}, {}, "1.5 is not a valid train.momentum"),
        ({"model.backbone": {"type": "categorical", "choices": ["convnet", "vgg"]}}, {},
         "'vgg' is not a valid model.backbone"),
        ({"model.backbone.depth": {"type": "int", "low": 1, "high": 3}}, {},
         "model.backbone is a value, not a section"),
        ({"train.lr": {"type": "float", "low": 0.01, "high": 0.1}}, {"supervised": {"lr": 0.05}},
         "supervised.lr is set and overrides train.lr"),
        ({"train.lr": {"type": "float", "low": 0.3, "high": 0.1}}, {}, "low (0.3) must be below high (0.1)"),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, {}, "a log-scale range needs low > 0"),
        ({"train.lr": {"type": "uniform", "low": 0.0, "high": 0.1}}, {}, "tune.spaces.supervised.train.lr"),
    ],
)
def test_invalid_search_space_names_the_key(tmp_path, space, extra, expected):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tune": {"spaces": {"supervised": space}}, **extra}))
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    assert expected in str(exc.value), str(exc.value)


def test_unknown_method_and_threshold_pruner_errors(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tune": {"spaces": {"fixmatch2": {}}}}))
    with pytest.raises(ParamsError, match=r"tune.spaces.fixmatch2: unknown method or pretext"):
        load_params(path)
    path.write_text(yaml.safe_dump({"tune": {"pruner": {"kind": "threshold"}}}))
    with pytest.raises(ParamsError, match=r"tune.pruner: .*needs lower"):
        load_params(path)


def test_method_without_space_is_a_clear_error(workdir, tiny):
    with pytest.raises(TuningError, match=r"no search space for supervised: add tune.spaces.supervised"):
        run_study("supervised", tiny(), trials=1)
    assert not Path("tuning/optuna.db").exists()


@pytest.mark.parametrize("value", [1e-05, 0.03, 3, True, None, "convnet", "1.0", 0.0])
def test_trial_values_survive_the_set_syntax(value):
    key, _, raw = as_override("a.b", value).partition("=")
    assert apply_overrides({}, [f"{key}={raw}"]) == {"a": {"b": value}}


# ---------------------------------------------------------------------------------------------------------
# studies on digits


def test_four_trial_study_completes_and_writes_best(workdir, mlflow_uri):
    params = _params(workdir)
    res = run_study("supervised", params, trials=4)
    trials = res.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    # the objective's value is the last epoch's val top-1, reported each epoch
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2] and t.value == t.intermediate_values[2]
        assert 0.01 <= t.params["train.lr"] <= 0.3 and 0 <= t.params["supervised.label_smoothing"] <= 0.2
        # issue 17 budgets count CPU seconds: recorded per trial, and a 1-thread run cannot use more CPU than wall time
        # (+ 2 s of slack for the MLflow/Optuna bookkeeping outside the timed epochs)
        assert 0 < t.user_attrs["cpu_seconds"] <= t.duration.total_seconds() * torch.get_num_threads() + 2
    assert res.study.best_value == max(t.value for t in trials)

    best = yaml.safe_load(Path("tuning/supervised.best.yaml").read_text())
    assert best == {"train": {"lr": res.study.best_params["train.lr"]},
                    "supervised": {"label_smoothing": res.study.best_params["supervised.label_smoothing"]}}
    # the best values load as params (the shape of params sections)
    tuned = load_params("params.yaml", [*TINY, f"train.lr={best['train']['lr']!r}"])
    assert tuned.train.lr == best["train"]["lr"]
    assert {p.name for p in res.plots} == {"history.png", "parallel_coordinate.png", "importances.png"}
    assert not list(Path("tuning/supervised-digits").glob("trial-*.pt"))  # keep_checkpoints: false

    # MLflow: one parent run with the plots; a nested run per trial with its values, curve, state and number
    parent = res.study.user_attrs["mlflow_parent_run_id"]
    client = mlflow.MlflowClient(mlflow_uri)
    assert {a.path for a in client.list_artifacts(parent, "plots")} == {f"plots/{p.name}" for p in res.plots}
    assert client.get_run(parent).data.metrics["best_val_top1"] == res.study.best_value
    runs = _trial_runs(mlflow_uri, "supervised-digits")
    assert sorted(runs) == [0, 1, 2, 3]
    for t in trials:
        run = runs[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["optuna.state"] == "COMPLETE"
        assert float(run.data.params["train.lr"]) == t.params["train.lr"]
        curve = client.get_metric_history(run.info.run_id, "val_top1")
        assert [m.value for m in sorted(curve, key=lambda m: m.step)] == [t.intermediate_values[s] for s in (1, 2)]

    # the CLI: --trials 0 only reports; params.yaml changes only with --apply, and then to the best values
    before = Path("params.yaml").read_text()
    sets = [x for s in TINY for x in ("--set", s)]
    assert main(["tune", "supervised", "--trials", "0", *sets]) == 0
    assert Path("params.yaml").read_text() == before
    assert main(["tune", "supervised", "--trials", "0", "--apply", *sets]) == 0
    applied = load_params("params.yaml")
    assert applied.train.lr == best["train"]["lr"]
    assert applied.supervised.label_smoothing == best["supervised"]["label_smoothing"]


@pytest.mark.parametrize(("pretext", "metric"), [("paws", "paws_nn_val_top1"), ("rotation", "knn_val_top1")])
def test_pretext_study_maximises_its_val_monitor(workdir, mlflow_uri, pretext, metric):
    """Issue 17: a pretext (no classifier) is tuned on its own val monitor - PAWS-NN for PAWS (PAWS §5), the k-NN
    monitor otherwise - with no test-set probe in any trial, and no checkpoint or metrics file written."""
    space = {f"{pretext}.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True}}
    if pretext == "paws":  # a tuple-valued param: list choices
        space["paws.large_scale"] = {"type": "categorical", "choices": [[0.5, 1.0], [0.75, 1.0]]}
    Path("params.yaml").write_text(yaml.safe_dump({"tune": {"pruner": {"kind": "none"}, "spaces": {pretext: space}}}))
    params = load_params("params.yaml", [*TINY, f"{pretext}.epochs=2", f"{pretext}.steps_per_epoch=2",
                                         f"{pretext}.batch_size=16"])
    assert tuning.val_metric(pretext) == metric
    res = run_study(pretext, params, trials=2)
    runs = _trial_runs(mlflow_uri, f"{pretext}-digits")
    client = mlflow.MlflowClient(mlflow_uri)
    for t in res.study.trials:
        assert t.state.name == "COMPLETE" and sorted(t.intermediate_values) == [1, 2]
        curve = {m.step: m.value for m in client.get_metric_history(runs[t.number].info.run_id, metric)}
        assert t.intermediate_values == {1: curve[1], 2: curve[2]} and t.value == curve[2]
        assert not {"knn_top1", "linear_top1", "paws_nn_top1"} & set(runs[t.number].data.metrics)  # no test probe
    assert not Path(f"models/pretrain/{pretext}.pt").exists() and not Path(f"metrics/pretrain_{pretext}.json").exists()
    assert yaml.safe_load(Path(f"tuning/{pretext}.best.yaml").read_text()) == {
        pretext: {k.split(".")[1]: v for k, v in tuning.trial_values(res.study.best_params).items()}}
    if pretext == "paws":
        scales = [tuning.trial_values(t.params)["paws.large_scale"] for t in res.study.trials]
        assert all(s in ([0.5, 1.0], [0.75, 1.0]) for s in scales), scales


def test_list_choice_round_trips_through_optuna():
    """A tuple-valued param (crop scales) as a categorical choice: Optuna holds JSON text, the trial gets the list,
    and its --set override parses back to the list."""
    space = tuning.CategoricalSpace(type="categorical", choices=[[0.5, 1.0], [0.75, 1.0], 3])
    assert tuning.suggest(optuna.trial.FixedTrial({"k": "[0.75, 1.0]"}), "k", space) == [0.75, 1.0]
    assert tuning.suggest(optuna.trial.FixedTrial({"k": 3}), "k", space) == 3
    key, _, raw = as_override("paws.large_scale", [0.75, 1.0]).partition("=")
    assert apply_overrides({}, [f"{key}={raw}"]) == {"paws": {"large_scale": [0.75, 1.0]}}


def test_grid_sampler_runs_each_listed_point_once(workdir, mlflow_uri):
    """sampler grid: the 2 x 2 listed values run once each over two calls, and the study stops when the grid is
    visited (the second call asks for 5 and runs 1); a list choice is a grid point too; a range is refused."""
    space = {"train.lr": {"type": "categorical", "choices": [0.05, 0.1]},
             "supervised.label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]}}
    params = _params(workdir, space=space, sampler="grid")
    run_study("supervised", params, trials=3, study_name="grid")
    trials = run_study("supervised", params, trials=5, study_name="grid").study.trials
    assert sorted((t.params["train.lr"], t.params["supervised.label_smoothing"]) for t in trials) == [
        (0.05, 0.0), (0.05, 0.1), (0.1, 0.0), (0.1, 0.1)]

    listed = tuning.CategoricalSpace(type="categorical", choices=[[0.5, 1.0], [0.75, 1.0], 3])
    study = optuna.create_study(sampler=tuning.make_sampler(tuning.TuneParams(sampler="grid"), 0, {"k": listed}))
    got = []
    study.optimize(lambda t: got.append(tuning.suggest(t, "k", listed)) or 0.0, n_trials=5)
    assert sorted(got, key=str) == sorted(listed.choices, key=str)

    with pytest.raises(TuningError, match="train.lr is a range; give it {type: categorical"):
        run_study("supervised", _params(workdir, sampler="grid"), trials=1, study_name="grid-range")


def test_pruner_prunes(workdir, mlflow_uri):
    # a threshold no accuracy can reach: every trial must stop after its warm-up epoch
    params = _params(workdir, pruner={"kind": "threshold", "lower": 1.01, "n_warmup_steps": 1})
    res = run_study("supervised", params, trials=2, study_name="prune")
    assert [t.state.name for t in res.study.trials] == ["PRUNED", "PRUNED"]
    assert all(t.last_step == 1 and list(t.intermediate_values) == [1] for t in res.study.trials)
    assert res.best_file is None
    runs = _trial_runs(mlflow_uri, "prune")
    assert {r.data.tags["optuna.state"] for r in runs.values()} == {"PRUNED"}
    assert all(r.info.status == "FINISHED" for r in runs.values())


@pytest.mark.parametrize(("kind", "cls"), [("median", optuna.pruners.MedianPruner),
                                           ("hyperband", optuna.pruners.HyperbandPruner),
                                           ("none", optuna.pruners.NopPruner)])
def test_pruner_kinds(kind, cls, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tune": {"pruner": {"kind": kind}}}))
    assert isinstance(tuning.make_pruner(load_params(path).tune.pruner, epochs=5), cls)


def test_diverging_trial_fails_and_study_goes_on(workdir, mlflow_uri):
    # lr 1e10 turns the loss into NaN/Inf in the first epoch (TrainingDivergedError); lr 0.05 trains
    params = _params(workdir, space={"train.lr": {"type": "categorical", "choices": [0.05, 1.0e10]}})
    store, _ = tuning.make_storage(tuning.DEFAULT_STORAGE)
    study = optuna.create_study(storage=store, study_name="nan", direction="maximize")
    study.enqueue_trial({"train.lr": 1.0e10})
    study.enqueue_trial({"train.lr": 0.05})
    res = run_study("supervised", params, trials=2, study_name="nan")
    failed, ok = res.study.trials
    assert failed.state.name == "FAIL" and "TrainingDivergedError" in failed.user_attrs["fail_reason"]
    assert "loss became" in failed.user_attrs["fail_reason"]
    assert ok.state.name == "COMPLETE" and res.study.best_trial.number == 1
    assert yaml.safe_load(Path("tuning/supervised.best.yaml").read_text()) == {"train": {"lr": 0.05}}
    run = _trial_runs(mlflow_uri, "nan")[0]
    assert run.data.tags["optuna.state"] == "FAIL" and "loss became" in run.data.tags["optuna.fail_reason"]


def test_call_whose_every_trial_fails_is_an_error(workdir):
    params = _params(workdir, space={"train.lr": {"type": "categorical", "choices": [1.0e10]}})
    with pytest.raises(TuningError, match=r"all 1 trials of this call failed; the first: TrainingDivergedError"):
        run_study("supervised", params, trials=1, study_name="allfail")
    assert [t.state.name for t in _trials("allfail")] == ["FAIL"]


def test_interrupted_study_resumes_with_earlier_trials(workdir, mlflow_uri, monkeypatch):
    params = _params(workdir)
    real = tuning.train_stage

    def ctrl_c_in_trial_1(name, p, epoch_end, **kw):
        def interrupting(epoch, metrics):
            if kw["run_tags"]["optuna.trial_number"] == "1":
                raise KeyboardInterrupt  # what Ctrl-C raises in the middle of training
            epoch_end(epoch, metrics)
        return real(name, p, epoch_end=interrupting, **kw)

    monkeypatch.setattr(tuning, "train_stage", ctrl_c_in_trial_1)
    with pytest.raises(KeyboardInterrupt):
        run_study("supervised", params, trials=3, study_name="resume")
    first = _trials("resume")
    assert [t.state.name for t in first] == ["COMPLETE", "FAIL"]
    assert first[1].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    assert _trial_runs(mlflow_uri, "resume")[1].data.tags["optuna.state"] == "FAIL"
    # the parent run the interrupted call opened (a study attribute: trials do not carry it)
    parent = optuna.load_study(study_name="resume", storage=tuning.make_storage(tuning.DEFAULT_STORAGE)[0]
                               ).user_attrs["mlflow_parent_run_id"]

    monkeypatch.setattr(tuning, "train_stage", real)
    res = run_study("supervised", params, trials=2, study_name="resume")
    again = res.study.trials
    assert [t.state.name for t in again] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert again[0].params == first[0].params and again[0].value == first[0].value
    assert again[2].params != again[0].params  # the resumed sampler does not replay the first suggestions
    assert res.study.user_attrs["mlflow_parent_run_id"] == parent  # the resumed call reopened that run
    assert {r.data.tags["mlflow.parentRunId"] for r in _trial_runs(mlflow_uri, "resume").values()} == {parent}


def test_cli_ctrl_c_exits_130_with_resume_hint(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tuning, "run_study", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["tune", "supervised"])
    assert exc.value.code == 130
    assert "Run the same command again to resume" in capsys.readouterr().err


def test_resume_under_other_params_is_refused(workdir):
    run_study("supervised", _params(workdir), trials=0, study_name="fixed")
    with pytest.raises(TuningError, match=r"other params \(train.epochs: 2 -> 3\)"):
        run_study("supervised", _params(workdir, "train.epochs=3"), trials=0, study_name="fixed")


@pytest.mark.slow
def test_two_workers_share_one_study(workdir, mlflow_uri):
    """Two `ssl-ops tune` processes started together on one journal storage: the study holds the union."""
    storage = f"journal:{workdir}/tuning/study.log"
    params = _params(workdir)
    run_study("supervised", params, trials=0, storage=storage, study_name="par")  # MLflow store migrated once
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": mlflow_uri}
    sets = [x for s in TINY for x in ("--set", s)]
    procs = [subprocess.Popen([str(BIN / "ssl-ops"), "tune", "supervised", "--trials", "3", "--storage", storage,
                               "--study", "par", *sets, "--set", f"tune.seed={seed}"], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 100)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    trials = _trials("par", storage)
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials)
    ran = [{int(line.split()[1]) for line in err.splitlines() if line.startswith("trial ")} for _, err in outs]
    assert len(ran[0]) == len(ran[1]) == 3 and ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(range(6))
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # different seeds: no repeated points
    assert sorted(_trial_runs(mlflow_uri, "par")) == list(range(6))


# ---------------------------------------------------------------------------------------------------------
# --repeats: several training seeds per trial (a tiny val set and one seed cannot rank close points)


def _runs_of(uri: str, study: str) -> list[mlflow.entities.Run]:
    return mlflow.MlflowClient(uri).search_runs(
        [mlflow.get_experiment_by_name("ssl-ops").experiment_id], f"tags.`optuna.study` = '{study}'")


def test_repeats_score_the_mean_of_each_seeds_run(workdir, mlflow_uri):
    """Each trial trains at train.seed and train.seed + REPEAT_STRIDE, one nested MLflow run each; its value is the
    mean of the two runs' last-epoch val top-1; the pruner saw the first seed's curve."""
    params = _params(workdir, "train.seed=3")
    res = run_study("supervised", params, trials=2, study_name="rep", repeats=2)
    client = mlflow.MlflowClient(mlflow_uri)
    runs = {r.info.run_id: r for r in _runs_of(mlflow_uri, "rep") if "optuna.trial_number" in r.data.tags}
    assert len(runs) == 4
    for t in res.study.trials:
        assert t.state.name == "COMPLETE"
        assert t.user_attrs["train_seeds"] == [3, 3 + tuning.REPEAT_STRIDE]
        ids, scores = t.user_attrs["mlflow_run_ids"], t.user_attrs["val_per_seed"]
        assert t.user_attrs["mlflow_run_id"] == ids[0] and len(set(ids)) == 2
        assert t.value == pytest.approx(sum(scores) / 2)
        for k, run_id in enumerate(ids):
            run = runs[run_id]
            assert run.data.tags["optuna.trial_number"] == str(t.number) and run.data.tags["optuna.repeat"] == str(k)
            assert run.data.tags["optuna.state"] == "COMPLETE" and run.info.status == "FINISHED"
            assert int(run.data.params["train.seed"]) == t.user_attrs["train_seeds"][k]
            assert float(run.data.params["train.lr"]) == t.params["train.lr"]  # both seeds train the trial's point
            curve = sorted(client.get_metric_history(run_id, "val_top1"), key=lambda m: m.step)
            assert curve[-1].value == scores[k]
            if k == 0:
                assert [m.value for m in curve] == [t.intermediate_values[s] for s in (1, 2)]
    assert not list(Path("tuning/rep").glob("trial-*.pt"))  # every seed's checkpoint removed (keep_checkpoints: false)
    best = res.study.best_trial
    header = Path("tuning/supervised.best.yaml").read_text().splitlines()[0]
    assert f"mean of train.seed 3: {best.user_attrs['val_per_seed'][0]:.4g}, 1003: " in header
    table = tuning.top_trials_table(res.study)
    assert [c.header for c in table.columns][:4] == ["trial", "state", "val top-1", "per seed"]

    # the study is scored over 2 seeds: resuming it with another count is refused (its means would not compare)
    with pytest.raises(TuningError, match=r"tune.repeats: 2 -> None"):
        run_study("supervised", params, trials=0, study_name="rep")
    with pytest.raises(TuningError, match="--repeats must be >= 1"):
        run_study("supervised", params, trials=1, study_name="rep0", repeats=0)


def test_repeat_that_fails_fails_the_trial_and_tags_every_run(workdir, mlflow_uri, monkeypatch):
    """The second seed's run dies after its first epoch: the trial is FAIL with the seed in its reason, and both its
    runs (the finished first seed's and the dead one's) carry the trial's state."""
    real = tuning.train_stage

    def dies_at_second_seed(name, params, **kw):
        if params.train.seed == tuning.REPEAT_STRIDE:
            def boom(epoch, metrics):
                raise RuntimeError("worker lost")
            kw["epoch_end"] = boom
        return real(name, params, **kw)

    monkeypatch.setattr(tuning, "train_stage", dies_at_second_seed)
    with pytest.raises(TuningError, match=r"train.seed 1000 \(repeat 1 of 2\): RuntimeError: worker lost"):
        run_study("supervised", _params(workdir), trials=1, study_name="rep-fail", repeats=2)
    (t,) = _trials("rep-fail")
    assert t.state.name == "FAIL" and "val_per_seed" not in t.user_attrs
    runs = [r for r in _runs_of(mlflow_uri, "rep-fail") if "optuna.trial_number" in r.data.tags]
    assert sorted(r.data.tags["optuna.repeat"] for r in runs) == ["0", "1"]
    assert all(r.data.tags["optuna.state"] == "FAIL" and "worker lost" in r.data.tags["optuna.fail_reason"]
               for r in runs)
    assert not list(Path("tuning/rep-fail").glob("trial-*.pt"))


def test_cli_repeats_prints_each_seed(workdir, mlflow_uri, capsys):
    _write_params(workdir / "params.yaml", {"train.lr": {"type": "categorical", "choices": [0.05]}})
    sets = [x for s in TINY for x in ("--set", s)]
    assert main(["tune", "supervised", "--trials", "1", "--repeats", "2", "--study", "rep-cli", *sets]) == 0
    out = capsys.readouterr().out
    assert "per seed" in out and "(mean of train.seed 0: " in out and ", 1000: " in out
    assert main(["tune", "supervised", "--trials", "1", "--repeats", "0", "--study", "rep-cli0", *sets]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
