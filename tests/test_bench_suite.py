"""benchmarks/suite.py end to end on digits, a few steps: every registered method is measured (or its failure
recorded), the cost-vs-N parts say what they found, each method's peak memory comes from its own process."""

from __future__ import annotations

import json

import pytest

from benchmarks import suite
from ssl_ops.methods import METHODS


@pytest.mark.slow
def test_suite_on_digits(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    suite.main(["--dataset", "digits", "--steps", "2", "--repeats", "1", "--memory-steps", "1",
                "--augment-images", "256", "--cifar-train-per-class", "20", "--out-dir", str(tmp_path),
                "--set", "pseudo_label.teacher_epochs=1", "train.batch_size=8", "train.steps_per_epoch=2"])
    res = json.loads((tmp_path / "benchmarks.json").read_text())
    md = (tmp_path / "benchmarks.md").read_text()
    assert set(res["throughput"]) == set(METHODS)  # registry-driven: every method, none listed by hand
    for name, r in res["throughput"].items():
        assert "error" not in r, (name, r)
        assert r["ratio"]["mean"] > 0 and r["images_per_step"] >= 8
        assert f"| {name} | {r['images_per_step']} |" in md
        for per in res["memory"].values():
            m = per[name]
            assert "error" not in m, (name, m)
            assert m["peak_rss_mib_training"] >= m["rss_mib_at_start"] > 50  # torch alone is > 50 MiB
    for part in res["cost_vs_n"].values():
        assert part["available"] is False and "not available" in part["note"] or part["log_log_slope"] > 0
    assert res["augment"]["ratio"] > 0 and res["environment"]["torch"]
    for key in ("machine", "git_commit", "date"):
        assert res["environment"][key]


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
