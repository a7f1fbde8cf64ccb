"""How far the campaign's PAWS recipe moves on test when only its training seed changes (issue 17 measurement).

    python -m benchmarks.paws_seed_spread run --splits 0 1 2 --offsets 0 1000 2000 --jobs 2   # trains what is missing
    python -m benchmarks.paws_seed_spread report                                              # tables only

Every run is ``ssl-ops pretrain paws`` as the campaign's ``paws@<S>`` stage runs it (params.yaml, then
pipelines/fmnist_10pc/params.yaml, then presets/fmnist_10pc/paws.yaml; ``split.seed`` = S) except for
``train.seed`` = S + offset: the initialisation, the views and the unlabeled batches change, the labeled split, its
val set and the test set do not. Offset 0 is the stage's own command. The runs write no campaign output: each works
in ``pipelines/fmnist_10pc/seed_spread/s<S>-t<T>/`` (its checkpoint deleted at the end) and logs to the MLflow store
``--store`` (default ``pipelines/fmnist_10pc/seed_spread/mlflow.db``, experiment ``paws-seed-spread``), where each
finished run is found again: ``run`` trains only the (split, seed) pairs the store lacks, so a stopped campaign
resumes. ``--jobs 2`` runs two at a time, one thread each, as the campaign's stages ran.

The report (``reports/paws_seed_spread.md`` + ``.json``) gives, per run, PAWS-NN test and val top-1 (val as images of
the split's 50), CPU-minutes, load and machine; per split, the mean and spread over the training seeds; over all runs,
the mean ± std and how much of the variance lies between splits and how much between seeds of a split; and, for
comparison, the report's own paws@S runs (the campaign's ledger, ``pipelines/fmnist_10pc/runs/pretrain-paws-seed<S>``).
It reads the test set: it measures a frozen recipe and chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import environment
from benchmarks.paws_label_spreading import CAMPAIGN, REPO
from benchmarks.val_studies_fmnist_10pc import FLAT_WINDOW, flatness
from ssl_ops import io
from ssl_ops.errors import SslOpsError
from ssl_ops.results import read_ledger
from ssl_ops.sections import TrackingParams
from ssl_ops.tracking import metric_history, search_runs

HERE = CAMPAIGN / "seed_spread"
EXPERIMENT = "paws-seed-spread"
OUT = REPO / "reports" / "paws_seed_spread"
VAL_SIZE = 50  # 5 val images per class x 10 classes (the campaign's split.val_per_class)


def campaign_params(split: int, train_seed: int, experiment: str):
    """The params of the campaign's paws@<split> stage (run.sh's files, in its order), at ``train_seed``."""
    from ssl_ops.params import load_params

    return load_params(REPO / "params.yaml", [f"split.seed={split}", f"train.seed={train_seed}",
                                              "train.progress=false", f"tracking.experiment={experiment}"],
                       presets=[CAMPAIGN / "params.yaml", REPO / "presets" / "fmnist_10pc" / "paws.yaml"])


def recipe(split: int, train_seed: int) -> dict[str, str]:
    """What decides a run's training, as MLflow holds a run's params (flattened keys, ``str`` values): every key of
    data, split, model, train and paws but the progress bar."""
    from ssl_ops.params import flatten

    flat = flatten(campaign_params(split, train_seed, EXPERIMENT).model_dump(mode="json"))
    return {k: str(v) for k, v in flat.items()
            if k.split(".")[0] in ("data", "split", "model", "train", "paws") and k != "train.progress"}


def finished(store: str, experiment: str) -> dict[tuple[int, int], dict]:
    """{(split seed, train seed): run} of the finished runs in the store that hold PAWS-NN's test top-1 and trained
    today's recipe: a run of another one (paws.yaml edited since) is left out, so ``run`` trains the pair again."""
    cfg = TrackingParams(uri=store, experiment=experiment)
    runs, wanted = {}, {}
    for r in search_runs(cfg):
        m, p, t = r["metrics"], r["params"], r["tags"]
        if r["status"] != "FINISHED" or "paws_nn_top1" not in m or "split.seed" not in p or "train.seed" not in p:
            continue
        key = (int(p["split.seed"]), int(p["train.seed"]))
        want = wanted.setdefault(key, recipe(*key))
        if key in runs or any(p.get(k) != v for k, v in want.items()):  # a pair run twice keeps its first run
            continue
        curve = [v for _, v in metric_history(cfg, r["run_id"], "paws_nn_val_top1")]
        runs[key] = {
            "split": key[0], "train_seed": key[1], "run_id": r["run_id"],
            "paws_nn_top1": m["paws_nn_top1"], "paws_nn_val_top1": m["paws_nn_val_top1"],
            "cpu_min": m["cpu_seconds"] / 60, "loadavg_mean": m.get("loadavg_mean"),
            "git_commit": t.get("git_commit", "unknown"), "machine": t.get("machine", "unknown"),
            "epochs": int(p["paws.epochs"]), "steps_per_epoch": int(p["paws.steps_per_epoch"]),
            "batch_size": int(p["paws.batch_size"]), "flatness": flatness(curve)}
    return runs


def run_one(split: int, train_seed: int, store: str, experiment: str) -> None:
    """Train one (split, seed) pair in its own folder; nothing of the campaign's outputs is written."""
    from ssl_ops.stages.pretrain import pretrain_stage

    params = campaign_params(split, train_seed, experiment)
    work = HERE / f"s{split}-t{train_seed}"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        (work / "data").symlink_to(CAMPAIGN / "data", target_is_directory=True)
    os.chdir(work)  # the split file and the prepared data are found under data/, as run.sh's seed<S>/ has them
    os.environ["MLFLOW_TRACKING_URI"] = store
    ckpt = work / "last.pt"
    pretrain_stage("paws", params, write_outputs=False, checkpoint=ckpt,
                   run_tags={"benchmark": "paws_seed_spread", "preset": "presets/fmnist_10pc/paws.yaml"})
    ckpt.unlink(missing_ok=True)


def run_all(splits: list[int], offsets: list[int], store: str, experiment: str, jobs: int) -> None:
    for s in splits:
        if not (CAMPAIGN / "data" / "splits" / f"fashion_mnist-10pc-seed{s}.json").exists():
            raise SslOpsError(f"split {s} is missing: cd {CAMPAIGN.relative_to(REPO)} && dvc repro -s prepare "
                              f"split@{s}")
    done = finished(store, experiment)
    todo = [(s, s + o) for o in offsets for s in splits if (s, s + o) not in done]
    print(f"{len(done)} runs in {store} ({experiment}); {len(todo)} to train: {todo}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def train(pair: tuple[int, int]) -> bool:
        s, t = pair
        log = HERE / f"s{s}-t{t}.log"
        print(f"started split {s} train.seed {t} -> {log}", flush=True)
        with log.open("w") as out:
            code = subprocess.run([sys.executable, "-m", "benchmarks.paws_seed_spread", "one", str(s), str(t),
                                   "--store", store, "--experiment", experiment], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
        if code:
            print(f"split {s} train.seed {t} failed: see {log}", flush=True)
        return code == 0

    with ThreadPoolExecutor(jobs) as pool:  # `jobs` subprocesses at a time, each one thread
        failed = [pair for pair, ok in zip(todo, pool.map(train, todo)) if not ok]
    if failed:
        raise SslOpsError(f"{len(failed)} runs failed: {failed}; run again to retry them")


def ledger() -> dict[int, dict]:
    """The report's own paws@S runs (the campaign's ledger, in git)."""
    return {int(rec["params"]["split.seed"]): {
        "paws_nn_top1": rec["metrics"]["paws_nn_top1"], "paws_nn_val_top1": rec["metrics"]["paws_nn_val_top1"],
        "cpu_min": rec["metrics"]["cpu_seconds"] / 60, "machine": rec["tags"].get("machine", "unknown")}
        for rec in read_ledger(CAMPAIGN / "runs") if rec["tags"].get("pretext") == "paws"}


def variance_parts(runs: list[dict]) -> dict[str, float]:
    """One-way split of PAWS-NN test top-1 (points): the mean variance between seeds of one split, and the variance
    of the split means (each split weighted alike; splits with one run count only in the latter)."""
    by_split: dict[int, list[float]] = {}
    for r in runs:
        by_split.setdefault(r["split"], []).append(100 * r["paws_nn_top1"])
    within = [statistics.variance(v) for v in by_split.values() if len(v) > 1]
    means = [statistics.fmean(v) for v in by_split.values()]
    return {"seed_sd": statistics.fmean(within) ** 0.5 if within else float("nan"),
            "split_means_sd": statistics.stdev(means) if len(means) > 1 else float("nan")}


def render(runs: list[dict], ref: dict[int, dict], env: dict) -> str:
    splits = sorted({r["split"] for r in runs})
    tests = [100 * r["paws_nn_top1"] for r in runs]
    parts = variance_parts(runs)
    flats = [r["flatness"] for r in runs if r["flatness"] is not None]
    lines = [
        "# PAWS recipe: the spread from the training seed alone (issue 17)", "",
        ("`python -m benchmarks.paws_seed_spread run` then `report`. The campaign's `paws@<S>` command "
         "(presets/fmnist_10pc/paws.yaml) at `train.seed` = S + offset: the labeled split, its val set and the test "
         "set stay; the initialisation, views and batches change. Test is only reported: nothing here chooses."), "",
        f"Report written {env['date']} at git {env['git_commit'][:10]} on {env['machine']}.", "",
        ("| split | train.seed | PAWS-NN test top-1 | PAWS-NN val (of 50) | val: last "
         f"{FLAT_WINDOW} epochs vs {FLAT_WINDOW} before (points) | steps x batch | CPU-min | load | machine | git |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(runs, key=lambda r: (r["split"], r["train_seed"])):
        flat = "-" if r["flatness"] is None else f"{r['flatness'] + 0.0:+.1f}"  # + 0.0: no "-0.0"
        lines.append(f"| {r['split']} | {r['train_seed']} | {100 * r['paws_nn_top1']:.2f} | "
                     f"{round(r['paws_nn_val_top1'] * VAL_SIZE)} | {flat} | "
                     f"{r['epochs'] * r['steps_per_epoch']} x {r['batch_size']} | {r['cpu_min']:.1f} | "
                     f"{r['loadavg_mean'] or float('nan'):.1f} | {r['machine']} | {r['git_commit'][:10]} |")
    lines += ["", "Per split, over its training seeds, beside the campaign's report (its paws@S run, train.seed S):",
              "",
              ("| split | runs | PAWS-NN test: mean | min to max | val images: mean | the report's run: test | "
               "val | machine |"), "|---:|---:|---:|---|---:|---:|---:|---|"]
    for s in splits:
        rs = [r for r in runs if r["split"] == s]
        t = [100 * r["paws_nn_top1"] for r in rs]
        v = [r["paws_nn_val_top1"] * VAL_SIZE for r in rs]
        ref_s = ref.get(s)
        lines.append(f"| {s} | {len(rs)} | {statistics.fmean(t):.2f} | {min(t):.2f} to {max(t):.2f} | "
                     f"{statistics.fmean(v):.1f} | "
                     + (f"{100 * ref_s['paws_nn_top1']:.2f} | {round(ref_s['paws_nn_val_top1'] * VAL_SIZE)} | "
                        f"{ref_s['machine']} |" if ref_s else "- | - | - |"))
    lines += ["", f"All {len(runs)} runs: PAWS-NN test top-1 **{statistics.fmean(tests):.2f}"
              + (f" ± {statistics.stdev(tests):.2f}**" if len(tests) > 1 else "**")
              + f" (sample std); between seeds of one split, sd {parts['seed_sd']:.2f} points (the mean of the "
              f"splits' variances); between the splits' means, sd {parts['split_means_sd']:.2f}."
              + (f" Val curves at the end: the last {FLAT_WINDOW} epochs against the {FLAT_WINDOW} before moved by "
                 f"{min(flats):+.1f} to {max(flats):+.1f} points." if flats else ""),
              f"The report's three paws@S runs: {statistics.fmean(100 * r['paws_nn_top1'] for r in ref.values()):.2f}"
              f" ± {statistics.stdev(100 * r['paws_nn_top1'] for r in ref.values()):.2f}." if len(ref) > 1 else "",
              "", "Issue 17's bar for PAWS-NN is 80 % (mean over splits 0-2)."]
    return "\n".join(lines) + "\n"


def report(store: str, experiment: str) -> dict:
    runs = list(finished(store, experiment).values())
    if not runs:
        raise SslOpsError(f"no finished PAWS run in {store} (experiment {experiment}): run "
                          "`python -m benchmarks.paws_seed_spread run` first")
    env, ref = environment(), ledger()
    io.write_text(OUT.with_suffix(".md"), render(runs, ref, env))
    io.write_text(OUT.with_suffix(".json"), json.dumps(
        {"env": env, "store": store, "experiment": experiment, "runs": runs, "ledger": ref,
         "variance": variance_parts(runs)}, indent=1) + "\n")
    print(f"wrote {OUT.with_suffix('.md')} ({len(runs)} runs)")
    return {"runs": runs, "ledger": ref}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "one"):
        p = sub.add_parser(name)
        p.add_argument("--store", default=f"sqlite:///{HERE / 'mlflow.db'}", help="MLflow tracking URI")
        p.add_argument("--experiment", default=EXPERIMENT)
        if name == "run":
            p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
            p.add_argument("--offsets", type=int, nargs="+", default=[0, 1000, 2000],
                           help="train.seed = split seed + offset (0: the campaign's own command)")
            p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
        if name == "one":
            p.add_argument("split", type=int)
            p.add_argument("train_seed", type=int)
    args = ap.parse_args(argv)
    try:
        HERE.mkdir(parents=True, exist_ok=True)
        if args.cmd == "one":
            run_one(args.split, args.train_seed, args.store, args.experiment)
            return
        if args.cmd == "run":
            if args.jobs < 1:
                raise SslOpsError(f"--jobs must be >= 1, got {args.jobs}")
            run_all(args.splits, args.offsets, args.store, args.experiment, args.jobs)
        report(args.store, args.experiment)
    except SslOpsError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
