"""benchmarks/val_studies_fmnist_10pc.py on hand-made Optuna journals laid out as the campaign's (the script itself
reads pipelines/fmnist_10pc/seed<S>/tuning/*.journal, which a fresh clone does not have)."""

from __future__ import annotations

import optuna
import pytest

from benchmarks.val_studies_fmnist_10pc import collect, flatness, images, main, summed_curve
from ssl_ops.errors import SslOpsError
from ssl_ops.tuning import make_storage

DIST = {"paws.small_crops": optuna.distributions.CategoricalDistribution([0, 2]),
        "paws.large_scale": optuna.distributions.CategoricalDistribution(["[0.5, 1.0]", "[0.9, 1.0]"])}


def add(campaign, split, journal, study, values, curve, cpu_seconds=600.0, state="COMPLETE", epochs=None,
        per_seed=None):
    storage, _ = make_storage(f"journal:{campaign / f'seed{split}' / 'tuning' / journal}")
    s = optuna.create_study(study_name=f"{study}-s{split}", storage=storage, direction="maximize",
                            load_if_exists=True)
    complete = state == "COMPLETE"
    s.add_trial(optuna.trial.create_trial(
        params=values, distributions={k: DIST[k] for k in values},
        value=(sum(per_seed) / len(per_seed) if per_seed else curve[-1]) if complete else None,
        intermediate_values=dict(zip(epochs or range(1, len(curve) + 1), curve)),
        # as `ssl-ops tune --repeats R` stores a trial: each seed's last val, the value their mean
        user_attrs={"cpu_seconds": cpu_seconds, **({"val_per_seed": per_seed} if per_seed else {})},
        state=getattr(optuna.trial.TrialState, state)))


def test_flatness_is_last_window_minus_the_window_before_in_points():
    assert flatness([0.5] * 10 + [0.6] * 10, window=10) == pytest.approx(10.0)
    assert flatness([0.1] * 5 + [0.7] * 4 + [0.8] * 4, window=4) == pytest.approx(10.0)  # only the last 8 count
    assert flatness([0.5] * 19, window=10) is None  # too short to tell


def test_images_counts_val_images_and_refuses_a_wrong_val_size():
    assert images(0.8399999737739563, 50, "x") == 42  # a float32 metric
    with pytest.raises(SslOpsError, match="--val-size"):
        images(0.84, 40, "study x")  # 33.6 images: not this split's val size


def test_points_are_matched_across_splits_by_their_values(tmp_path):
    a, b = {"paws.small_crops": 0}, {"paws.small_crops": 2}
    for split, (va, vb) in enumerate([(0.76, 0.80), (0.90, 0.88)]):
        add(tmp_path, split, "x.journal", "x-fmnist", a, [0.5] * 10 + [va] * 10)
        add(tmp_path, split, "x.journal", "x-fmnist", b, [vb] * 20, cpu_seconds=900.0)
    add(tmp_path, 1, "x.journal", "x-fmnist", {"paws.large_scale": "[0.9, 1.0]"}, [0.7], state="RUNNING")
    study = collect(tmp_path, [0, 1], 50)["x-fmnist"]
    points = {tuple(p["values"].items()): p["runs"] for p in study["points"].values()}
    assert [r["images"] for r in points[(("paws.small_crops", 0),)].values()] == [38, 45]
    assert [r["images"] for r in points[(("paws.small_crops", 2),)].values()] == [40, 44]
    assert points[(("paws.small_crops", 0),)][1]["flatness"] == pytest.approx(40.0)
    assert points[(("paws.small_crops", 2),)][0]["cpu_min"] == pytest.approx(15.0)
    assert study["other"] == {"RUNNING": 1}


def test_report_ranks_points_by_sum_decodes_list_values_and_skips_one_split_studies(tmp_path):
    wide, narrow = {"paws.large_scale": "[0.5, 1.0]"}, {"paws.large_scale": "[0.9, 1.0]"}
    for split, (vw, vn) in enumerate([(0.74, 0.80), (0.86, 0.84), (0.70, 0.78)]):
        add(tmp_path, split, "crops.journal", "crops", wide, [vw] * 20)
        add(tmp_path, split, "crops.journal", "crops", narrow, [vn] * 20)
    add(tmp_path, 0, "one.journal", "one-split-only", wide, [0.9] * 20)
    out = tmp_path / "report"
    studies = main(["--campaign", str(tmp_path), "--out", str(out)])
    assert list(studies) == ["crops"]
    assert out.with_suffix(".png").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| paws.")]
    # narrow: 40 + 42 + 39 = 121 before wide: 37 + 43 + 35 = 115; the JSON text of a list choice read back as a list
    assert rows[0].startswith("| paws.large_scale=[0.9, 1.0] | 40 | 42 | 39 | **121** | 10.0 | +0.0 |")
    assert rows[1].startswith("| paws.large_scale=[0.5, 1.0] | 37 | 43 | 35 | **115** |")
    assert all(r.endswith("| 20 |") for r in rows)  # the budget: every run's last scored epoch
    with pytest.raises(SystemExit, match="--val-size"):  # 0.74 x 40 = 29.6 images: a clear exit, no traceback
        main(["--campaign", str(tmp_path), "--out", str(out), "--val-size", "40"])
    with pytest.raises(SystemExit, match="one-split-only"):
        main(["--campaign", str(tmp_path), "--out", str(out), "--study", "one-split-only"])


def test_the_same_point_twice_in_one_split_is_an_error_not_a_silent_overwrite(tmp_path):
    for _ in range(2):
        add(tmp_path, 0, "d.journal", "dup", {"paws.small_crops": 0}, [0.8] * 20)
    with pytest.raises(SslOpsError, match="twice"):
        collect(tmp_path, [0], 50)


def test_summed_curve_adds_the_splits_at_the_epochs_every_split_scored(tmp_path):
    point = {"paws.small_crops": 0}
    add(tmp_path, 0, "s.journal", "sparse", point, [0.5, 0.6, 0.7], epochs=[1, 3, 4])  # no val score at epoch 2
    add(tmp_path, 1, "s.journal", "sparse", point, [0.4, 0.5, 0.6, 0.8], epochs=[1, 2, 3, 4])
    study = collect(tmp_path, [0, 1], 50)["sparse"]
    (p,) = study["points"].values()
    assert p["runs"][0]["epochs"] == 4  # the last scored epoch, not the count of scores
    epochs, summed = summed_curve(p, [0, 1], 50)
    assert epochs == [1, 3, 4]
    assert summed == pytest.approx([45.0, 60.0, 75.0])  # (0.5 + 0.4) x 50, (0.6 + 0.6) x 50, (0.7 + 0.8) x 50
    assert summed_curve(p, [0, 1, 2], 50) is None  # split 2 never ran


def test_a_point_run_at_several_seeds_counts_their_mean_and_lists_each(tmp_path):
    """`ssl-ops tune --repeats 3`: a split's cell is the mean of its seeds' val images with each seed's listed, the sum
    adds the means, and a run's CPU-minutes are the trial's divided by its seeds."""
    point = {"paws.small_crops": 2}
    add(tmp_path, 0, "r.journal", "rep", point, [0.80] * 20, cpu_seconds=2700.0, per_seed=[0.80, 0.82, 0.78])
    add(tmp_path, 1, "r.journal", "rep", point, [0.90] * 20, cpu_seconds=2700.0, per_seed=[0.90, 0.84, 0.86])
    runs = next(iter(collect(tmp_path, [0, 1], 50)["rep"]["points"].values()))["runs"]
    assert runs[0]["per_seed"] == [40, 41, 39] and runs[0]["images"] == pytest.approx(40.0)
    assert runs[1]["images"] == pytest.approx(130 / 3) and runs[0]["cpu_min"] == pytest.approx(15.0)
    out = tmp_path / "report"
    main(["--campaign", str(tmp_path), "--out", str(out), "--splits", "0", "1"])
    row = next(line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| paws."))
    assert row.startswith("| paws.small_crops=2 | 40.0 (40 / 41 / 39) | 43.3 (45 / 42 / 43) | **83.3** | 15.0 |")
