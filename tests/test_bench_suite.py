"""benchmarks/suite.py end to end on digits, a few steps: every registered method is measured (or its failure
recorded), the cost-vs-N parts say what they found, each method's peak memory comes from its own process."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import suite
from ssl_ops.methods import METHODS


# One method per way a method starts: from scratch, with a teacher phase (pseudo_label), from a pre-trained
# pretext (paws_finetune), from the MOAM steps before it (moam_retrain). That every registered method is taken by
# default is checked below without training (test_the_suite_measures_every_registered_method_by_default); that
# each method trains at all is the fast tier's registry smoke tests'.
KINDS = ["moam_retrain", "paws_finetune", "pseudo_label", "supervised"]
MEMORY = ["moam_retrain", "supervised"]  # peak memory: a fresh process per method and dataset, ~14 s each loaded


@pytest.mark.slow
def test_suite_on_digits(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    suite.main(["--dataset", "digits", "--steps", "2", "--repeats", "1", "--memory-steps", "1",
                "--augment-images", "256", "--cifar-train-per-class", "20", "--out-dir", str(tmp_path),
                "--methods", *KINDS, "--memory-methods", *MEMORY,
                "--set", "pseudo_label.teacher_epochs=1", "train.batch_size=8", "train.steps_per_epoch=2"])
    res = json.loads((tmp_path / "benchmarks.json").read_text())
    md = (tmp_path / "benchmarks.md").read_text()
    assert list(res["throughput"]) == KINDS
    for name, r in res["throughput"].items():
        assert "error" not in r, (name, r)
        ours, bare = r["ssl_ops_images_per_s"]["mean"], r["bare_images_per_s"]["mean"]
        assert all(0 < v < math.inf for v in (ours, bare)) and r["images_per_step"] >= 8
        # one repeat: the ratio is the quotient of the two rates, and the report's row says so
        assert r["ratio"]["runs"] == [pytest.approx(ours / bare, rel=1e-12)]
        assert (f"| {name} | {r['images_per_step']} | {ours:,.0f} ± 0 | {bare:,.0f} ± 0 | "
                f"{ours / bare:.2f} ± 0.00 |") in md
    memory = md.split("## Peak memory")[1]
    for per in res["memory"].values():
        assert list(per) == MEMORY
        for name, m in per.items():
            assert "error" not in m, (name, m)
            assert m["peak_rss_mib_training"] >= m["rss_mib_at_start"] > 50  # torch alone is > 50 MiB
            assert f"{m['rss_mib_at_start']:,.0f} → {m['peak_rss_mib_training']:,.0f}" in memory
    assert "| pseudo_label | not measured | not measured |" in memory
    for part in res["cost_vs_n"].values():
        assert part["available"] is False and "not available" in part["note"] or part["log_log_slope"] > 0
    a = res["augment"]
    assert a["ratio"] == pytest.approx(a["batched_images_per_s"] / a["torchvision_per_image_images_per_s"], rel=1e-9)
    assert f"**{a['ratio']:.1f}x**" in md and res["environment"]["torch"]
    for key in ("machine", "git_commit", "date"):
        assert res["environment"][key]


def test_the_suite_measures_every_registered_method_by_default(tmp_path, monkeypatch):
    """Registry-driven: with no ``--methods`` every method of ``METHODS`` is timed and its memory measured, none
    listed by hand (the training parts are stubbed; test_suite_on_digits runs them for real)."""
    timed, measured = [], []
    monkeypatch.setattr(suite, "prepare_workdir", lambda work, datasets: None)
    monkeypatch.setattr(suite, "timed_parts", lambda args, base, datasets, methods: timed.extend(methods) or {})
    monkeypatch.setattr(suite, "peak_memory", lambda name, o, steps, work: measured.append(name) or {})
    monkeypatch.setattr(suite, "render", lambda res: "")
    res = suite.main(["--dataset", "digits", "--out-dir", str(tmp_path)])
    assert timed == sorted(METHODS) and measured == sorted(METHODS) * 2  # digits and the CIFAR-size set
    assert all(set(per) == set(METHODS) for per in res["memory"].values())


def test_find_function_discovers_by_name():
    found = suite.find_function(("sigmoid_rampup",))
    assert found is not None and found[0] == "ssl_ops.schedules.sigmoid_rampup"
    assert suite.find_function(("no_such_function_anywhere",)) is None
    assert suite.find_function(("rampup",), exclude=("rampup",)) is None


def test_cost_vs_n_reports_the_growth_exponent():
    assert suite._slope([1, 2, 4], [3.0, 12.0, 48.0]) == 2.0  # t = 3 N^2
    seen = []
    res = suite.cost_vs_n("test", ("m.f", lambda x, k: seen.append((len(x), k))), [100, 200], suite.kmeans_args)
    assert res["available"] and res["n"] == [100, 200] and len(res["seconds"]) == 2
    assert (100, 100) in seen and (200, 100) in seen  # N points, k = 100 clusters
    assert suite.cost_vs_n("k-means", None, [1], suite.kmeans_args)["note"].startswith("not available")
    broken = suite.cost_vs_n("k-means", ("m.g", lambda: None), [1], suite.kmeans_args)
    assert not broken["available"] and "could not call" in broken["note"]
