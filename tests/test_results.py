"""``ssl-ops results``: a campaign's runs -> one row per method, checked against hand-computed values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ssl_ops import results
from ssl_ops.methods import METHODS


def _run(run_id, seed, start, *, method=None, pretext=None, status="FINISHED", **metrics):
    tags = {"git_commit": "abcdef1234567", **({"method": method} if method else {}),
            **({"pretext": pretext} if pretext else {})}
    if method == "supervised":
        tags["presets"] = "presets/fmnist_10pc/supervised.yaml"
    return {"run_id": run_id, "status": status, "start_time": start, "params": {"split.seed": str(seed)},
            "metrics": metrics, "tags": tags}


RUNS = [
    _run("s0-old", 0, 1, method="supervised", test_top1=0.10, val_top1=0.1),  # replaced by the later run of split 0
    _run("s0", 0, 5, method="supervised", test_top1=0.70, val_top1=0.60, cpu_seconds=60.0, loadavg_mean=1.0,
         test_max_class_fraction=0.2),
    _run("s1", 1, 5, method="supervised", test_top1=0.72, val_top1=0.62, cpu_seconds=120.0, loadavg_mean=2.0,
         test_max_class_fraction=0.3),
    _run("s2", 2, 5, method="supervised", test_top1=0.74, val_top1=0.64, cpu_seconds=180.0, loadavg_mean=3.0,
         test_max_class_fraction=0.1),
    _run("v0", 0, 6, method="vat", test_top1=0.75, val_top1=0.7, cpu_seconds=600.0, test_max_class_fraction=0.2),
    _run("v1", 1, 6, method="vat", test_top1=0.73, val_top1=0.7, cpu_seconds=1200.0, test_max_class_fraction=0.2),
    _run("m0", 0, 7, method="moam", test_top1=0.10, val_top1=0.1, test_max_class_fraction=0.9),
    _run("bad", 2, 9, method="vat", status="FAILED", test_top1=0.99),  # not finished: never counted
    _run("untested", 2, 9, method="pi_model", val_top1=0.5),  # never evaluated: not a row
    _run("p0", 0, 8, pretext="paws", paws_nn_top1=0.80, knn_top1=0.7, cpu_seconds=300.0),
    _run("r", 0, 2, pretext="rotation", knn_top1=0.5, linear_top1=0.6, cpu_seconds=120.0, knn_val_top1=0.52,
         loadavg_mean=1.5),
]


def test_rows_against_hand_values():
    rows = {r.name: r for r in results.rows_of([r for r in map(results.parse, RUNS) if r])}
    assert set(rows) == {"supervised", "vat", "moam", "paws_nn"}
    sup, vat, moam = rows["supervised"], rows["vat"], rows["moam"]
    assert sup.seeds == [0, 1, 2] and sup.mean == pytest.approx(0.72) and sup.std == pytest.approx(0.02)
    assert sup.delta is None and sup.val == pytest.approx(0.62) and sup.cpu_minutes == pytest.approx(2.0)
    assert sup.load == pytest.approx(2.0) and sup.max_class_fraction == pytest.approx(0.3) and not sup.collapsed
    # vat on splits 0 and 1: (0.75 - 0.70 + 0.73 - 0.72) / 2 = 0.03, paired on the same splits
    assert vat.delta == pytest.approx(0.03) and vat.mean == pytest.approx(0.74) and vat.cpu_minutes == pytest.approx(15)
    # issue 17's budget is per split: the costliest split's run (180 s, 1200 s), not the mean
    assert sup.max_cpu_minutes == pytest.approx(3.0) and vat.max_cpu_minutes == pytest.approx(20.0)
    assert moam.collapsed and moam.std is None
    assert rows["paws_nn"].mean == pytest.approx(0.80) and rows["paws_nn"].delta == pytest.approx(0.10)
    ordered = [r.name for r in results.rows_of([r for r in map(results.parse, RUNS) if r])]
    assert ordered == ["supervised", "paws_nn", "vat", "moam"]  # the baseline first, then best first


def test_write_outputs_and_names_the_best_uncollapsed(tmp_path):
    out = tmp_path / "reports" / "results_x.md"
    curve = [(0, 0.7), (1, 0.5), (2, 0.6)]  # step 0: evaluate's final value, not an epoch
    rows = results.write(RUNS, lambda run_id, key: curve, out, source="experiment `x`")
    assert len(rows) == 4
    md = out.read_text()
    assert "Best method: **paws_nn**, 80.00 % (+10.00 points over supervised)" in md
    assert ("| supervised | 0,1,2 | 72.00 ± 2.00 | — | 62.00 | 2.00 (max 3.00) | 0.30 | "
            "presets/fmnist_10pc/supervised.yaml |") in md
    assert "| moam | 0 | 10.00 | -60.00 |" in md and "0.90 collapsed" in md
    # the pre-trainings table: CPU-min, k-NN and linear test probes, last val k-NN, commit, load, budget
    # (machine "—": these runs carry no machine tag)
    assert "| rotation | 0 | 2.00 | 50.00 | 60.00 | 52.00 | abcdef1234 | 1.5 | — | — |" in md
    # a run started from a dirty tree keeps the mark after the short commit
    dirty = [dict(RUNS[1], tags=dict(RUNS[1]["tags"], git_commit="0123456789abcdef-dirty"))]
    assert results.rows_of([results.parse(r) for r in dirty])[0].commits == ["0123456789-dirty"]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["curves"]["supervised"]["0"] == [[1, 0.5], [2, 0.6]]
    # a label-free pre-training's val monitor is plotted too (has it flattened?); PAWS's is its PAWS-NN row's
    assert data["curves"]["pretrain rotation (k-NN)"]["0"] == [[1, 0.5], [2, 0.6]]
    assert not any(k.startswith("pretrain paws") for k in data["curves"])
    for png in (out.with_suffix(".png"), tmp_path / "reports" / "results_x_curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _on_machine(run, where):
    """``run`` as if it had been tagged with the machine ``where``."""
    return dict(run, tags=dict(run["tags"], machine=where))


def test_each_row_says_which_machine_its_runs_ran_on(tmp_path):
    """CPU-minutes differ severalfold between machines: a table whose runs ran on several keys each row's machines
    ("—" for a run without the tag) and spells the keys out below. M1, M2... follow each machine's first run shown,
    not the order the table meets them, so a machine keeps its key when a later session adds rows from another."""
    fast, slow = "Intel Xeon, 2 CPUs, AVX512, bf16 native", "AMD EPYC, 2 CPUs, AVX2, bf16 emulated"
    on = _on_machine
    # fast's first run is the RotNet (start 2), slow's the supervised run of split 1 (start 5)
    runs = [on(RUNS[1], fast), on(RUNS[2], slow), RUNS[3], on(RUNS[4], slow), on(RUNS[10], fast)]
    out = tmp_path / "results_x.md"
    results.write(runs, lambda run_id, key: [], out, source="experiment `x`")
    md = out.read_text()
    sup = next(line for line in md.splitlines() if line.startswith("| supervised |"))
    assert sup.endswith("| 2.0 | — M1 M2 | — |")  # its machines in key order, though the table meets slow first
    assert next(line for line in md.splitlines() if line.startswith("| vat |")).endswith("| M2 | — |")
    assert "| rotation | 0 | 2.00 | 50.00 | 60.00 | 52.00 | abcdef1234 | 1.5 | M1 | — |" in md
    assert (f"**machine**: M1 = {fast}; M2 = {slow}; — = not recorded (a run logged before ssl-ops tagged runs "
            "with their machine).") in md
    assert results.rows_of([results.parse(r) for r in runs[:3]])[0].machines == ["", slow, fast]
    # a later run from a third machine gets the next key and moves none of the others
    later = dict(on(RUNS[5], "ARM Neoverse, 2 CPUs"), start_time=99)
    results.write([*runs, later], lambda run_id, key: [], out, source="experiment `x`")
    assert f"M1 = {fast}; M2 = {slow}; M3 = ARM Neoverse, 2 CPUs;" in out.read_text()


def test_cost_panel_names_each_points_machine_and_hollows_rows_off_one_machine(tmp_path, monkeypatch):
    """The accuracy-against-cost panel puts rows from machines severalfold apart on one x axis: each point is named
    with its machine keys, and a row whose runs span machines or did not record theirs is drawn hollow."""
    slow, on = "AMD EPYC, 2 CPUs, AVX2, bf16 emulated", _on_machine
    figures = []
    monkeypatch.setattr(results, "save_png", lambda fig, path, dpi=100: figures.append(fig))
    runs = [on(RUNS[1], slow), RUNS[2], on(RUNS[4], slow)]  # supervised on M1 and untagged; vat on M1 only
    results.write(runs, lambda run_id, key: [], tmp_path / "r.md", source="x")
    right = figures[0].axes[1]
    assert sorted(t.get_text() for t in right.texts) == ["supervised [— M1]", "vat [M1]"]
    faces = {t.get_text(): bar.lines[0].get_markerfacecolor() for t, bar in zip(right.texts, right.containers)}
    assert faces["supervised [— M1]"] == "none" and faces["vat [M1]"] != "none"


def test_rows_not_measured_yet_are_named(tmp_path):
    """Issue 17 keeps every method in the campaign's table: the expected rows without an evaluated run are listed
    (a run that failed or was never evaluated does not count); PAWS-NN's curve is its own val monitor."""
    out = tmp_path / "r.md"
    keys = []
    rows = results.write(RUNS, lambda run_id, key: keys.append((run_id, key)) or [], out, source="x",
                         expected=["supervised", "pi_model", "vat", "alternating", "paws_nn"])
    assert results.missing_rows(rows, ["pi_model", "supervised", "alternating"]) == ["pi_model", "alternating"]
    assert "Not measured yet (no evaluated run in the sources above): pi_model, alternating." in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["missing"] == ["pi_model", "alternating"]
    assert ("p0", "paws_nn_val_top1") in keys and ("s0", "val_top1") in keys


def test_no_evaluated_run_writes_nothing(tmp_path):
    out = tmp_path / "r.md"
    assert results.write([RUNS[-1]], lambda *a: [], out, source="x") == []
    assert not out.exists()


def test_budget_is_the_method_section_over_train():
    """steps x batch as the run resolved them: the method's (or PAWS's) own value, else train's."""
    p = {"split.seed": "0", "train.epochs": "10", "train.steps_per_epoch": "50", "train.batch_size": "64",
         "supervised.epochs": "None", "paws.epochs": "20", "paws.steps_per_epoch": "None", "paws.batch_size": "32"}
    run = {"run_id": "x", "status": "FINISHED", "start_time": 1, "params": p, "metrics": {"test_top1": 0.7},
           "tags": {"method": "supervised"}}
    assert results.parse(run).budget == "500 x 64"
    paws = {**run, "metrics": {"paws_nn_top1": 0.7}, "tags": {"pretext": "paws"}}
    assert results.parse(paws).budget == "1000 x 32"
    assert results.parse({**run, "params": {"split.seed": "0"}}).budget == "—"


@pytest.mark.parametrize(("method", "extra", "expected"), [
    # Noroozi et al. §3's cluster classification: 60 epochs x 50 steps before the 20 of fine-tuning
    ("cluster_transfer", {"cluster_transfer.cluster_epochs": "60"}, "3000 cluster + 1000 x 64"),
    # a teacher trained in the run (S4L §4.2's pseudo-label teacher, SimCLRv2's fine-tuned teacher) counts ...
    ("pseudo_label", {"pseudo_label.teacher": "None", "pseudo_label.teacher_epochs": "10"}, "500 teacher + 1000 x 64"),
    ("simclrv2", {"simclrv2.teacher_epochs": "20"}, "1000 teacher + 1000 x 64"),
    # ... one read from a checkpoint does not (its cost is its own row's)
    ("pseudo_label", {"pseudo_label.teacher": "models/supervised.pt", "pseudo_label.teacher_epochs": "10"},
     "1000 x 64"),
    # a run logged without the param: the phase is there, its length unknown
    ("cluster_transfer", {}, "? cluster + 1000 x 64"),
])
def test_budget_counts_the_phase_before_the_main_one(method, extra, expected):
    """The cluster phase and in-run teachers are optimiser steps too: leaving them out under-stated cluster_transfer's
    budget by 3x. They take the run's steps per epoch and batch, as the methods train them."""
    p = {"split.seed": "0", "train.epochs": "20", "train.steps_per_epoch": "50", "train.batch_size": "64", **extra}
    run = {"run_id": "x", "status": "FINISHED", "start_time": 1, "params": p, "metrics": {"test_top1": 0.7},
           "tags": {"method": method}}
    assert results.parse(run).budget == expected


@pytest.mark.parametrize("method", sorted(METHODS))
def test_what_the_report_reads_names_params_the_method_has(method):
    """The report reads a run back from its logged params by the names each method's Params declares; a renamed
    param would silently drop a phase from the budget column or a pre-training from the recipe cell, so each name
    must be a field of that Params: a phase's length an int of epochs, its skip switch and every start a path."""
    params = METHODS[method].Params
    fields = params.model_fields
    for phase in params.pre_phases:
        assert fields[phase.epochs].annotation is int
        assert phase.skip_if_set is None or "Path" in str(fields[phase.skip_if_set].annotation)
    assert params.start_params and all("Path" in str(fields[k].annotation) for k in params.start_params)
    # and a param defaulting to a pre-training's checkpoint is one the row must name ("from paws.pt"), not hide
    pretrain = {k for k, f in fields.items() if str(f.default).startswith("models/pretrain/")}
    assert pretrain <= set(params.start_params)


def test_the_methods_with_a_phase_before_their_main_one():
    """The in-run phases the budget column must count (tested above for their params), so that a method that loses
    its declaration fails here rather than under-stating its budget."""
    assert {m: [ph.name for ph in METHODS[m].Params.pre_phases] for m in METHODS if METHODS[m].Params.pre_phases} == {
        "cluster_transfer": ["cluster"], "pseudo_label": ["teacher"], "simclrv2": ["teacher"]}


def test_a_chain_is_costed_by_its_last_step(tmp_path):
    """Issue 17 counts MOAM by its last step (S4L §5's chain moam -> moam_retrain -> moam_finetune), so that row
    also carries the whole chain's CPU-minutes: 5 + 2 + 1 here; a chain with a missing step has no total."""
    runs = [_run("m", 0, 1, method="moam", test_top1=0.7, cpu_seconds=300.0),
            _run("r", 0, 2, method="moam_retrain", test_top1=0.71, cpu_seconds=120.0),
            _run("f", 0, 3, method="moam_finetune", test_top1=0.72, cpu_seconds=60.0)]
    # each step names the model it started from, as the runs log it
    runs[1]["params"]["moam_retrain.previous"] = "models/moam.pt"
    runs[2]["params"]["moam_finetune.previous"] = "models/moam_retrain.pt"
    rows = {r.name: r for r in results.rows_of([results.parse(r) for r in runs])}
    assert rows["moam"].chain_cpu_minutes is None  # the first step is no chain's end
    assert rows["moam_retrain"].chain_cpu_minutes == pytest.approx(7.0)
    assert rows["moam_finetune"].cpu_minutes == pytest.approx(1.0)
    assert rows["moam_finetune"].chain_cpu_minutes == pytest.approx(8.0)
    results.write(runs, lambda run_id, key: [], tmp_path / "r.md", source="x")
    assert "| moam_finetune | 0 | 72.00 | — | — | 1.00 (chain 8.00) |" in (tmp_path / "r.md").read_text()
    # the cost plot places each step at what its model cost: the last step at the whole chain, not its own 1 minute
    assert [rows[m].cost_minutes for m in ("moam", "moam_retrain", "moam_finetune")] == pytest.approx([5.0, 7.0, 8.0])
    broken = {r.name: r for r in results.rows_of([results.parse(r) for r in runs if r["run_id"] != "r"])}
    assert broken["moam_finetune"].chain_cpu_minutes is None
    assert broken["moam_finetune"].cost_minutes is None  # an unknown chain: no point rather than a wrong one


def test_a_chain_is_capped_per_split(tmp_path):
    """Issue 17's 20 CPU-minute budget is per split, so the report gives the costliest split's whole chain, the
    same split's run of every step: split 0's chain 5 + 2 + 1 = 8 minutes, split 1's 7 + 1 + 1 = 9. The sum of each
    step's costliest run (7 + 2 + 1 = 10) would over-state it, the mean chain (8.5) under-state it."""
    runs = []
    for seed, cpu in ((0, (300.0, 120.0, 60.0)), (1, (420.0, 60.0, 60.0))):
        runs += [_run(f"m{seed}", seed, 1, method="moam", test_top1=0.7, cpu_seconds=cpu[0]),
                 _run(f"r{seed}", seed, 2, method="moam_retrain", test_top1=0.71, cpu_seconds=cpu[1]),
                 _run(f"f{seed}", seed, 3, method="moam_finetune", test_top1=0.72, cpu_seconds=cpu[2])]
        runs[-2]["params"]["moam_retrain.previous"] = "models/moam.pt"
        runs[-1]["params"]["moam_finetune.previous"] = "models/moam_retrain.pt"
    rows = {r.name: r for r in results.rows_of([results.parse(r) for r in runs])}
    assert rows["moam_finetune"].chain_cpu_minutes == pytest.approx(8.5)
    assert rows["moam_finetune"].max_cpu_minutes == pytest.approx(9.0)
    assert rows["moam_retrain"].max_cpu_minutes == pytest.approx(8.0)  # 5 + 2 (split 0) against 7 + 1 (split 1)
    assert rows["moam"].max_cpu_minutes == pytest.approx(7.0)  # a first step: its own costliest run
    results.write(runs, lambda run_id, key: [], tmp_path / "r.md", source="x")
    assert "| 1.00 (chain 8.50, max 9.00) |" in (tmp_path / "r.md").read_text()
    # a step missing on one split: that split's chain is unknown, so no maximum rather than a wrong one
    partial = {r.name: r for r in results.rows_of([results.parse(r) for r in runs if r["run_id"] != "r1"])}
    assert partial["moam_finetune"].max_cpu_minutes is None


def test_a_transfer_row_names_the_checkpoint_it_started_from(tmp_path):
    """Rebuffi et al.'s "with T.L." rows start from a pre-training (``<method>.init``, or ``.pretrained`` for
    SimCLRv2 / cluster transfer): the recipe cell says which, so it is not read as from scratch."""
    runs = [_run("s", 0, 1, method="supervised", test_top1=0.70),
            _run("t", 0, 2, method="mean_teacher", test_top1=0.71),
            _run("c", 0, 3, method="simclrv2", test_top1=0.72),
            _run("h", 0, 4, method="cluster_transfer", test_top1=0.73)]
    runs[0]["params"]["supervised.init"] = "None"  # as logged when unset
    runs[1]["params"]["mean_teacher.init"] = "../models/pretrain/rotation.pt"
    runs[2]["params"]["simclrv2.pretrained"] = "../models/pretrain/simclr.pt"
    # CC+HOG logs its unused checkpoint default too; the row must not claim it started from Jigsaw++
    runs[3]["params"].update({"cluster_transfer.source": "hog",
                              "cluster_transfer.pretrained": "models/pretrain/jigsaw_pp.pt"})
    rows = {r.name: r for r in results.rows_of([results.parse(r) for r in runs])}
    assert rows["supervised"].starts_from == [] and rows["mean_teacher"].starts_from == ["rotation.pt"]
    assert rows["cluster_transfer"].starts_from == ["HOG"]
    results.write(runs, lambda run_id, key: [], tmp_path / "r.md", source="x")
    md = (tmp_path / "r.md").read_text()
    assert "| params.yaml<br>from rotation.pt |" in md and "| params.yaml<br>from simclr.pt |" in md
    assert "| params.yaml<br>from HOG |" in md and "jigsaw_pp" not in md
    assert "| presets/fmnist_10pc/supervised.yaml |" in md


def test_the_ledger_rebuilds_the_report_without_the_store(tmp_path):
    """`ssl-ops results --ledger runs`: the runs the report reads go into committed records; a clone whose MLflow
    store is empty (mlflow.db is not in git) then writes the same report from the ledger alone."""
    def history(run_id, key):
        return [(1, 0.5), (2, 0.6)] if key in ("val_top1", "knn_val_top1", "paws_nn_val_top1") else []

    with_store, ledger = tmp_path / "a" / "r.md", tmp_path / "runs"
    results.write(RUNS, history, with_store, source="x")
    # one file per (row, split) and per pre-training; the replaced, failed and never-evaluated runs are not kept
    assert results.update_ledger(ledger, RUNS, history) == 8
    assert sorted(p.stem for p in ledger.glob("*.json")) == [
        "moam-seed0", "pretrain-paws-seed0", "pretrain-rotation-seed0", "supervised-seed0", "supervised-seed1",
        "supervised-seed2", "vat-seed0", "vat-seed1"]
    assert json.loads((ledger / "supervised-seed0.json").read_text())["run_id"] == "s0"
    assert results.update_ledger(ledger, RUNS, history) == 0  # nothing new: no file rewritten
    records = results.read_ledger(ledger)
    without_store = tmp_path / "b" / "r.md"
    results.write(records, results.ledger_history(records), without_store, source="x")
    assert without_store.read_text() == with_store.read_text()
    assert (json.loads(without_store.with_suffix(".json").read_text())
            == json.loads(with_store.with_suffix(".json").read_text()))


def test_the_ledger_keeps_the_latest_run_of_a_split(tmp_path):
    """A re-run replaces its record; an older run (e.g. from a store that lags the ledger) never does; a record
    keeps only the params of the sections the report reads."""
    ledger = tmp_path / "runs"
    old = _run("v0-old", 0, 1, method="vat", test_top1=0.70, cpu_seconds=60.0)
    new = _run("v0-new", 0, 9, method="vat", test_top1=0.76, cpu_seconds=60.0)
    new["params"].update({"vat.eps": "1.5", "train.lr": "0.03", "tracking.uri": "sqlite:///secret.db"})
    assert results.update_ledger(ledger, [new], lambda *a: []) == 1
    assert results.update_ledger(ledger, [old], lambda *a: []) == 0
    record = json.loads((ledger / "vat-seed0.json").read_text())
    assert record["run_id"] == "v0-new" and record["metrics"]["test_top1"] == 0.76
    assert record["params"] == {"split.seed": "0", "vat.eps": "1.5", "train.lr": "0.03"}
    newer = _run("v0-newer", 0, 10, method="vat", test_top1=0.74, cpu_seconds=60.0)
    assert results.update_ledger(ledger, [old, newer], lambda *a: []) == 1
    assert json.loads((ledger / "vat-seed0.json").read_text())["run_id"] == "v0-newer"
    assert results.read_ledger(tmp_path / "none") == []


def test_training_losses_are_plotted_and_kept_in_the_ledger(tmp_path):
    """Issue 17: a row below its bar keeps its val *and* training curves. Every logged loss term of a row's runs
    (``loss``, ``loss_<term>``) goes into the report's JSON per split (epochs only: evaluate's step 0 is not one),
    a label-free pre-training's under ``pretrain <name>``, into ``_losses.png``, and into the ledger, so a clone
    without the store draws the same curves. A ledger record written before it held the losses is refreshed."""
    runs = [_run("s0", 0, 5, method="supervised", test_top1=0.70, loss=0.1),
            _run("v0", 0, 6, method="vat", test_top1=0.75, loss=0.4, loss_sup=0.01, loss_vat=0.3, lr=0.1),
            _run("v1", 1, 6, method="vat", test_top1=0.73, loss=0.5, loss_sup=0.02, loss_vat=0.2),
            _run("r", 0, 2, pretext="rotation", knn_top1=0.5, cpu_seconds=60.0, loss=1.2)]

    def history(run_id, key):  # a distinct curve per (run, key), with evaluate's final value at step 0
        base = {"s0": 1.0, "v0": 2.0, "v1": 3.0, "r": 4.0}[run_id] + len(key) / 100
        return [(0, 99.0), (1, base), (2, base / 2)]

    assert results.loss_keys(runs[1]) == ["loss", "loss_sup", "loss_vat"]  # lr is not a loss
    out = tmp_path / "a" / "r.md"
    results.write(runs, history, out, source="x")
    losses = json.loads(out.with_suffix(".json").read_text())["losses"]
    assert sorted(losses) == ["pretrain rotation", "supervised", "vat"]
    assert sorted(losses["vat"]) == ["loss", "loss_sup", "loss_vat"]
    assert losses["vat"]["loss_vat"] == {"0": [[1, 2.08], [2, 1.04]], "1": [[1, 3.08], [2, 1.54]]}
    assert losses["pretrain rotation"]["loss"] == {"0": [[1, 4.04], [2, 2.02]]}
    assert (tmp_path / "a" / "r_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training losses per epoch](r_losses.png)" in out.read_text()

    ledger = tmp_path / "runs"
    assert results.update_ledger(ledger, runs, history) == 4  # 3 (row, split) records + the pre-training
    assert set(json.loads((ledger / "vat-seed1.json").read_text())["history"]) == {
        "val_top1", "loss", "loss_sup", "loss_vat"}
    records = results.read_ledger(ledger)
    rebuilt = tmp_path / "b" / "r.md"
    results.write(records, results.ledger_history(records), rebuilt, source="x")
    assert json.loads(rebuilt.with_suffix(".json").read_text())["losses"] == losses

    # a record from before the losses were kept: the same run, the same metrics, no loss curves -> rewritten once
    old = json.loads((ledger / "vat-seed0.json").read_text())
    old["history"] = {"val_top1": old["history"]["val_top1"]}
    (ledger / "vat-seed0.json").write_text(json.dumps(old))
    assert results.update_ledger(ledger, runs, history) == 1
    assert "loss_vat" in json.loads((ledger / "vat-seed0.json").read_text())["history"]
    assert results.update_ledger(ledger, runs, history) == 0


def test_compare_sets_each_rerun_beside_its_ledger_record(tmp_path):
    """`ssl-ops results --ledger runs --compare`: a re-run of a stage is checked against the committed record of the
    same (row, split), metric by metric (its cost and the machine's load left out) and epoch by epoch."""
    def history(run_id, key):
        return {"val_top1": [(1, 0.5), (2, 0.6)], "loss": [(1, 2.0), (2, 1.0)]}.get(key, [])

    ledger = tmp_path / "runs"
    first = [_run("v0", 0, 1, method="vat", test_top1=0.75, loss=1.0, cpu_seconds=60.0, loadavg_mean=1.0),
             _run("v1", 1, 1, method="vat", test_top1=0.73, loss=1.0, cpu_seconds=60.0),
             _run("p0", 0, 1, pretext="paws", paws_nn_top1=0.8, cpu_seconds=300.0)]
    first[0]["params"]["vat.eps"] = "1.5"
    results.update_ledger(ledger, first, history)
    records = results.read_ledger(ledger)
    assert results.compare_to_ledger(first, history, records) == []  # the ledger's own runs: nothing re-ran

    same = _run("v0b", 0, 2, method="vat", test_top1=0.75, loss=1.0, cpu_seconds=99.0, loadavg_mean=2.0)
    same["params"]["vat.eps"] = "1.5"
    moved = _run("v1b", 1, 2, method="vat", test_top1=0.7301, loss=1.0, cpu_seconds=60.0)
    moved["params"]["vat.eps"] = "2.0"  # a changed recipe: named, since its numbers need not agree
    new = _run("s0", 0, 2, method="supervised", test_top1=0.7)
    paws = _run("p0b", 0, 2, pretext="paws", paws_nn_top1=0.8, cpu_seconds=300.0)
    paws["tags"]["machine"] = "another CPU"

    def rerun_history(run_id, key):
        if run_id == "p0b" and key == "paws_nn_val_top1":
            return [(1, 0.5), (3, 0.6)]  # other epochs logged: no number can say how far apart
        return [(1, 0.5), (2, 0.6 + (0.02 if run_id == "v1b" else 0))] if key == "val_top1" else history(run_id, key)

    got = {c.name: c for c in results.compare_to_ledger([*first, same, moved, new, paws], rerun_history, records)}
    assert sorted(got) == ["pretrain-paws-seed0", "supervised-seed0", "vat-seed0", "vat-seed1"]
    assert got["vat-seed0"].same and got["vat-seed0"].ledger_commit == "abcdef1234"
    # its cost is not compared (99 CPU-s against 60 is still "same"), but shown: 1.65 times the ledger run's
    assert got["vat-seed0"].cpu_minutes == (1.0, 1.65) and got["vat-seed0"].cpu_ratio == pytest.approx(1.65)
    assert got["vat-seed0"].load == (1.0, 2.0)
    assert got["supervised-seed0"].ledger_commit is None and not got["supervised-seed0"].same
    assert got["supervised-seed0"].cpu_minutes == (None, None) and got["supervised-seed0"].cpu_ratio is None
    c = got["vat-seed1"]
    assert not c.same and c.params == (("vat.eps", None, "2.0"),) and c.metrics == (("test_top1", 0.73, 0.7301),)
    assert [key for key, _ in c.curves] == ["val_top1"] and c.curves[0][1] == pytest.approx(0.02)
    p = got["pretrain-paws-seed0"]
    assert p.machine_differs and p.curves == (("paws_nn_val_top1", float("inf")),) and not p.metrics

    loose = {c.name: c for c in results.compare_to_ledger([moved], rerun_history, records, tolerance=0.03)}
    assert loose["vat-seed1"].metrics == () and loose["vat-seed1"].curves == () and not loose["vat-seed1"].same
    assert results.compare_to_ledger([moved], rerun_history, records, tolerance=0.0001)[0].metrics == ()


def test_compare_exits_1_when_a_rerun_differs_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from ssl_ops import tracking
    from ssl_ops.cli import main

    ledger = tmp_path / "runs"
    results.update_ledger(ledger, [_run("v0", 0, 1, method="vat", test_top1=0.75, cpu_seconds=60.0)], lambda *a: [])
    before = {p.name: p.read_bytes() for p in ledger.iterdir()}
    store = [_run("v0b", 0, 2, method="vat", test_top1=0.75, cpu_seconds=90.0)]
    monkeypatch.setattr(tracking, "search_runs", lambda cfg, experiment: store)
    monkeypatch.setattr(tracking, "metric_history", lambda cfg, run_id, key: [])
    monkeypatch.chdir(tmp_path)
    args = ["results", "--params", str(Path(__file__).parents[1] / "params.yaml"), "--ledger", "runs", "--compare"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "1 of 1 the same as the ledger; CPU-minutes 1.50-1.50x the ledger's" in text
    assert "1.0 → 1.5" in text and "(1.50x)" in text  # the cost column: ledger → store CPU-minutes (may wrap)
    store[0]["metrics"]["test_top1"] = 0.74
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "differ: vat-seed0" in text and "metric test_top1: 0.75 → 0.74" in text
    assert main([*args, "--tolerance", "0.02"]) == 0
    assert {p.name: p.read_bytes() for p in ledger.iterdir()} == before and sorted(os.listdir(tmp_path)) == ["runs"]

    assert main([a for a in args if a not in ("--ledger", "runs")]) == 2  # no ledger named
    assert "--ledger DIR" in capsys.readouterr().err
    assert main([a for a in args if a != "--compare"] + ["--tolerance", "0.01"]) == 2  # a check's option alone
    assert "only applies to --compare" in capsys.readouterr().err
    store[0] = _run("v0", 0, 1, method="vat", test_top1=0.75)  # the ledger's own run: nothing re-ran
    assert main(args) == 2
    assert "re-run a stage first" in capsys.readouterr().err
