"""``ssl-ops``: one subcommand per pipeline stage. Thin: parse, validate params, call ``ssl_ops.stages``.

Every subcommand takes ``--params PATH`` (default params.yaml) and repeatable ``--set key.path=value``
overrides, validated like the file. Problems the user can fix print one paragraph and exit non-zero.
Each subcommand imports the stage it runs inside its function, so that ``ssl-ops --help`` and a params error
do not wait for torch and MLflow to load (the only reason for imports inside functions here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from ssl_ops.errors import ParamsError, SslOpsError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--preset", dest="presets", action="append", default=[], metavar="PATH",
                   help="params overlay merged onto --params before --set, e.g. presets/fmnist_10pc/supervised.yaml "
                        "(repeatable, in order)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a param, e.g. --set train.lr=0.1 (repeatable; YAML values)")


def _load(args):
    from ssl_ops.params import load_params

    _refuse_empty(Path(args.params))
    return load_params(args.params, args.overrides, args.presets)


def _preset_tag(args) -> dict[str, str]:
    """The presets a run was trained with, as an MLflow tag (reports name the recipe of each row)."""
    return {"presets": ",".join(args.presets)} if args.presets else {}


def _refuse_empty(path: Path) -> None:
    """An empty params file (or one of comments only) would silently mean "all defaults" (Fashion-MNIST...)."""
    if not path.is_file():
        return  # load_params: a missing params.yaml is the defaults, any other missing file an error
    try:
        empty = yaml.safe_load(path.read_text(errors="replace")) is None
    except yaml.YAMLError:
        return  # load_params reports the syntax error with its line
    if empty:
        raise ParamsError(f"params file {path} is empty, which would silently train with every default; put the "
                          "params in it (copy the project's params.yaml), or pass --params with another file")


def _warn_dvc_output(path: Path) -> None:
    """A one-off `ssl-ops train` outside `dvc repro` overwrites an output that dvc.lock pins: say so first."""
    lock = Path("dvc.lock")
    if os.environ.get("DVC_STAGE") or not lock.is_file() or f"path: {path.as_posix()}\n" not in lock.read_text():
        return
    err.print(f"[yellow]warning:[/yellow] {path} is an output of the DVC pipeline (dvc.lock); this one-off run "
              "overwrites it, so `dvc status` will show its stage changed and the pipeline's model is lost until "
              "`dvc repro` (or `dvc checkout`) restores it. Use `dvc exp run -S ...` to keep both.", highlight=False)


def cmd_prepare(args) -> None:
    import numpy as np

    from ssl_ops.stages import prepare_stage

    params = _load(args)
    path = prepare_stage(params)
    out.print(f"prepared [bold]{params.data.name}[/bold] -> {path}")
    manifest = json.loads((path / "manifest.json").read_text())
    y = np.load(path / "train_y.npy"), np.load(path / "test_y.npy")
    counts = [f"{c} {int((y[0] == i).sum())}+{int((y[1] == i).sum())}" for i, c in enumerate(manifest["classes"])]
    out.print(f"{len(counts)} classes (train+test images): " + ", ".join(counts), highlight=False)
    if "unlabeled_x" in manifest["shapes"]:
        out.print(f"{manifest['shapes']['unlabeled_x'][0]} unlabeled-only images (data.unlabeled_dir)")
    converted = manifest.get("converted", {})
    if converted:
        out.print(f"converted {sum(converted.values())} image(s) to {manifest['color_mode']} ("
                  + ", ".join(f"{n} {m}" for m, n in converted.items()) + "); predict converts the same way",
                  highlight=False)
    reasons = manifest.get("skip_reasons") or dict.fromkeys(manifest.get("skipped_files", []), "not an image")
    nonimg = [p for p, why in reasons.items() if why.startswith("not an image")]
    if nonimg:
        out.print(f"skipped {len(nonimg)} non-image file(s), listed in {path / 'manifest.json'}: " + _some(nonimg),
                  highlight=False)
    subdirs = [p for p, why in reasons.items() if why.startswith("sub-folder")]
    if subdirs:
        out.print(f"skipped {len(subdirs)} sub-folder(s) of class folders (only files directly in a class folder "
                  "are read): " + _some(subdirs), highlight=False)


def cmd_split(args) -> None:
    from ssl_ops.stages import split_stage

    path, split = split_stage(_load(args))
    extra = f", of which {split.unlabeled_only} from the unlabeled-only images" if split.unlabeled_only else ""
    out.print(f"split -> {path}: {len(split.labeled)} labeled, {len(split.val)} val, "
              f"{len(split.unlabeled)} unlabeled{extra} (seed {split.seed})")


def _sources(args) -> list[tuple[str, dict]]:
    """The layers ``_load`` merged, lowest first: the params file, each preset, the ``--set`` overrides."""
    from ssl_ops.params import apply_overrides

    def tree(path: str) -> dict:
        p = Path(path)
        return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}

    return [(args.params, tree(args.params)), *((p, tree(p)) for p in args.presets),
            ("--set", apply_overrides({}, args.overrides))]


def _source_of(sources: list[tuple[str, dict]], *path: str) -> str:
    """The last layer that sets ``path`` (where its value comes from); "default" when none does."""
    found = "default"
    for name, tree in sources:
        node = tree
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            found = name
    return found


def _dry_run(args, params, name: str) -> None:
    """What ``ssl-ops train|pretrain name`` would run with, and where each of its keys was set; trains nothing.

    The run logs these same values to MLflow; printing them first lets a user check a preset or a ``--set`` (and
    the checkpoints the run will read) before spending CPU-minutes on it."""
    from rich.markup import escape

    from ssl_ops.params import TrainParams

    section = getattr(params, name)
    sources = _sources(args)
    chain = " + ".join(layer for layer, tree in sources if tree or layer != "--set")
    table = Table(title=f"{name}: its params, after {escape(chain)}", title_justify="left")
    for column in (f"{name}.", "value", "set in"):
        table.add_column(column, overflow="fold")
    for key in type(section).model_fields:
        value = getattr(section, key)
        shown = "null" if value is None else escape(str(value))  # a value in [...] is not rich markup
        if value is None and key in TrainParams.model_fields:
            shown += f" (train.{key})"
        elif value is None and key == "freeze_blocks":
            shown += " (model.freeze_blocks)"
        if isinstance(value, Path) and not value.exists():
            shown += " [yellow](no such file here)[/yellow]"
        table.add_row(key, shown, escape(_source_of(sources, name, key)))
    out.print(table)
    t = section.train_params(params.train)
    out.print(f"train, with {name}'s overrides: {t.epochs} epochs x {t.steps_per_epoch} steps x batch {t.batch_size} "
              f"= {t.epochs * t.steps_per_epoch:,} steps; {t.optimizer} lr {t.lr:g} ({t.schedule}, warm-up "
              f"{t.warmup_epochs:g} epochs), weight decay {t.weight_decay:g}; seed {t.seed}, device {t.device}",
              highlight=False)
    out.print(f"data {params.data.name}, split seed {params.split.seed}, model {params.model.backbone} width "
              f"{params.model.width:g}; MLflow experiment {params.tracking.experiment!r}", highlight=False)
    out.print("dry run: params valid, nothing trained (drop --dry-run to train)", highlight=False)


def cmd_train(args) -> None:
    from ssl_ops.stages import train_stage

    params = _load(args)
    if args.dry_run:
        return _dry_run(args, params, args.method)
    if args.no_progress:
        params.train.progress = False
    _warn_dvc_output(Path("models") / f"{args.method}.pt")
    res = train_stage(args.method, params, resume=args.resume, run_tags=_preset_tag(args))
    out.print(f"trained [bold]{args.method}[/bold] in {res.metrics['train_seconds']:.1f}s, "
              f"val top-1 {res.metrics.get('val_top1', float('nan')):.2%} (MLflow run {res.run_id})")


def cmd_evaluate(args) -> None:
    from ssl_ops.stages import evaluate_stage

    m = evaluate_stage(args.method, _load(args))
    out.print(f"[bold]{args.method}[/bold]: test top-1 {m['test_top1']:.2%}, top-5 {m['test_top5']:.2%}, "
              f"val top-1 {m['val_top1']:.2%} -> metrics/{args.method}.json")


def cmd_report(args) -> None:
    from ssl_ops.stages import report_stage
    from ssl_ops.tracking import mask_uri, tracking_uri

    params = _load(args)
    rows = report_stage(params, out_dir=Path(args.out_dir), experiment=args.experiment)
    if args.quiet:
        out.print(f"{args.out_dir}/summary.md: {len(rows)} run(s)")
        return
    table = Table(title=f"ssl-ops runs: {params.data.name}, experiment {args.experiment or params.tracking.experiment}")
    for col in ("method", "budget", "seeds", "steps", "test top-1", "val top-1", "train s"):
        table.add_column(col, justify="left" if col in ("method", "budget") else "right")
    for r in rows:
        table.add_row(r["method"], r["budget"], f"{r['split_seed']}/{r['train_seed']}", str(r["steps"]),
                      f"{r['test_top1']:.2%}", f"{r['val_top1']:.2%}", f"{r['train_seconds']:.1f}")
    out.print(table)
    out.print(f"written {args.out_dir}/summary.md, plots/, accuracy_vs_labels.png, accuracy_vs_time.png")
    uri = mask_uri(tracking_uri(params.tracking))  # e.g. MLFLOW_TRACKING_URI=https://user:password@host
    if uri.startswith("sqlite:"):
        out.print(f"Browse the runs: [bold]mlflow ui --backend-store-uri {uri} --host 127.0.0.1[/bold] "
                  "then open http://127.0.0.1:5000")
    else:
        out.print(f"Runs are on the tracking server {uri}")


def cmd_results(args) -> int | None:
    from ssl_ops import results, tracking
    from ssl_ops.methods import METHODS

    params = _load(args)
    if args.tolerance and not args.compare:
        raise SslOpsError("--tolerance only applies to --compare: add --compare (and --ledger DIR), or drop it")
    experiment = args.experiment or params.tracking.experiment
    out_path = Path(args.out or f"reports/results_{experiment}.md")
    runs = tracking.search_runs(params.tracking, experiment)

    def store_history(run_id: str, key: str) -> list[tuple[int, float]]:
        return tracking.metric_history(params.tracking, run_id, key)

    if args.compare:
        return _compare_to_ledger(args, results, runs, store_history, experiment)
    history, source = store_history, f"experiment `{experiment}`"
    if args.ledger:  # the committed record of the campaign's runs: the store's runs join it, the report reads it
        ledger = Path(args.ledger)
        written = results.update_ledger(ledger, runs, store_history)
        runs = results.read_ledger(ledger)
        history = results.ledger_history(runs)
        source += f" and its ledger `{ledger.name}/` ({len(runs)} runs)"
        out.print(f"ledger {ledger}: {written} run records added or replaced, {len(runs)} in all")
    # a campaign's table keeps a line for every registered method not measured yet (issue 17)
    expected = [*sorted(METHODS), results.PAWS_NN] if args.all_methods else []
    rows = results.write(runs, history, out_path, source=source, expected=expected)
    if not rows:
        raise SslOpsError(f"no evaluated runs in MLflow experiment {experiment!r} at "
                          f"{tracking.mask_uri(tracking.tracking_uri(params.tracking))}: run the campaign first "
                          "(`make results`), or name the experiment with --experiment and the store with "
                          "tracking.uri / MLFLOW_TRACKING_URI")
    table = Table(title=f"results: experiment {experiment}")
    for col in ("method", "splits", "test top-1 %", "Δ vs supervised", "val top-1 %", "CPU-min"):
        table.add_column(col, justify="left" if col in ("method", "splits") else "right")
    for r in rows:
        table.add_row(r.name + (" (collapsed)" if r.collapsed else ""), ",".join(map(str, r.seeds)),
                      f"{100 * r.mean:.2f}" + (f" ± {100 * r.std:.2f}" if r.std is not None else ""),
                      "" if r.delta is None else f"{100 * r.delta:+.2f}",
                      "" if r.val is None else f"{100 * r.val:.2f}",
                      "" if r.cpu_minutes is None else f"{r.cpu_minutes:.1f}")
    out.print(table)
    if (line := results.best_line(rows)) is not None:
        out.print(line.replace("**", ""), highlight=False)
    if missing := results.missing_rows(rows, expected):
        out.print(f"not measured yet: {', '.join(missing)}", highlight=False)
    out.print(f"written {out_path} (+ .json, .png, _curves.png, _losses.png)")


def _compare_to_ledger(args, results, runs, history, experiment: str) -> int:
    """``ssl-ops results --ledger DIR --compare``: each re-run in the store beside the ledger's record of it; exit
    status 1 when any differs. Writes nothing: the report's ledger update would replace the records compared with."""
    from rich.markup import escape

    def _value(x: float | None) -> str:
        return "—" if x is None else f"{x:.6g}"

    def _num(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f}"

    if not args.ledger:
        raise SslOpsError("--compare sets the store's runs beside a ledger: name it with --ledger DIR "
                          "(the campaign's is pipelines/fmnist_10pc/runs)")
    if args.tolerance < 0:
        raise SslOpsError(f"--tolerance {args.tolerance}: give a difference >= 0 (0: bit for bit)")
    ledger = Path(args.ledger)
    if not ledger.is_dir():
        raise SslOpsError(f"ledger {ledger} is not a folder: name the one `ssl-ops results --ledger` writes")
    compared = results.compare_to_ledger(runs, history, results.read_ledger(ledger), args.tolerance)
    if not compared:
        raise SslOpsError(f"experiment {experiment!r} holds no evaluated run or pre-training besides the ledger's "
                          f"own records: re-run a stage first (e.g. `dvc repro -f -s <stage>`), then compare")
    table = Table(title=f"store runs of experiment {experiment} against the ledger {ledger}"
                        + (f" (tolerance {args.tolerance:g})" if args.tolerance else " (bit for bit)"))
    # on a narrow console every column wraps rather than lose its end (a commit's -dirty, a record's seed)
    for col in ("record", "ledger commit", "store commit", "CPU-min ledger → store", "load", "verdict"):
        table.add_column(col, overflow="fold", min_width=7 if col == "verdict" else None,
                         justify="right" if col in ("CPU-min ledger → store", "load") else "left")
    details = []  # every difference in full, below the table (a cell would cut them to the console's width)
    for c in compared:
        if c.ledger_commit is None:
            verdict = "[yellow]new: the ledger holds no such record[/yellow]"
        elif c.same:
            verdict = "[green]same[/green]"
        else:
            counts = [f"{len(x)} {what}" for x, what in ((c.metrics, "metrics"), (c.curves, "curves"),
                                                         (c.params, "params")) if x]
            verdict = f"[red]differs[/red]: {', '.join(counts)}"
            lines = [f"metric {key}: {_value(a)} → {_value(b)}" for key, a, b in c.metrics]
            lines += [f"curve {key}: off by up to {gap:.3g}" if gap != float("inf") else
                      f"curve {key}: other epochs logged" for key, gap in c.curves]
            # a changed recipe: its numbers need not agree (the ledger's run logged a value it did not run, or the
            # recipe moved since)
            lines += [f"param {key}: {a} → {b}" for key, a, b in c.params]
            details.append((c.name, lines))
        if c.machine_differs:
            verdict += " (another machine)"
        (cpu_a, cpu_b), (load_a, load_b) = c.cpu_minutes, c.load
        cpu = f"{_num(cpu_a)} → {_num(cpu_b)}" + (f" ({c.cpu_ratio:.2f}x)" if c.cpu_ratio is not None else "")
        table.add_row(c.name, c.ledger_commit or "", c.store_commit, cpu, f"{_num(load_a)} → {_num(load_b)}", verdict)
    out.print(table)
    for name, lines in details:
        out.print(f"[bold]{name}[/bold] (ledger → store):", highlight=False)
        for line in lines:
            out.print(f"  {escape(line)}", highlight=False)
    differ = [c.name for c in compared if c.ledger_commit is not None and not c.same]
    ratios = [c.cpu_ratio for c in compared if c.cpu_ratio is not None]
    out.print(f"{len(compared) - len(differ)} of {len(compared)} the same as the ledger"
              + (f"; differ: {', '.join(differ)}" if differ else "")
              + (f"; CPU-minutes {min(ratios):.2f}-{max(ratios):.2f}x the ledger's" if ratios else ""),
              highlight=False)
    return 1 if differ else 0


def cmd_pretrain(args) -> None:
    from ssl_ops.stages.pretrain import model_path, pretrain_stage

    params = _load(args)
    if args.dry_run:
        return _dry_run(args, params, args.pretext)
    if args.no_progress:
        params.train.progress = False
    _warn_dvc_output(model_path(args.pretext))
    res = pretrain_stage(args.pretext, params, resume=args.resume, run_tags=_preset_tag(args))
    m = res.metrics
    out.print(f"pre-trained [bold]{args.pretext}[/bold] in {m['train_seconds']:.1f}s -> {model_path(args.pretext)}: "
              f"k-NN test top-1 {m['knn_top1']:.2%}, linear probe {m['linear_top1']:.2%} "
              f"-> metrics/pretrain_{args.pretext}.json (MLflow run {res.run_id})")


def cmd_promote(args) -> None:
    from ssl_ops.serving.model_registry import promote
    from ssl_ops.tracking import tracking_uri

    params = _load(args)
    res = promote(args.method, tracking_uri(params.tracking), params.registry.margin, params.registry.model_name,
                  run_id=args.run_id, name=args.name, force=args.force)
    table = Table(title=f"promotion of {res.name} v{res.challenger.version}")
    for col in ("", "version", "method", "run", "val top-1 (decides)", "test top-1 (not used)"):
        table.add_column(col, justify="left" if col in ("", "method", "run") else "right")
    for role, c in (("challenger", res.challenger), ("champion", res.champion)):
        if c is None:
            table.add_row(role, "-", "-", "-", "-", "-")
        else:
            test = "-" if c.test_top1 is None else f"{c.test_top1:.2%}"
            table.add_row(role, f"v{c.version}", c.method, c.run_id[:12], f"{c.val_top1:.2%}", test)
    out.print(table)
    verdict = "[bold green]champion moved[/bold green]" if res.promoted else "[bold yellow]champion kept[/bold yellow]"
    out.print(f"{verdict}: {res.reason}. Aliases: challenger -> v{res.challenger.version}, champion -> "
              f"v{res.challenger.version if res.promoted else res.champion.version}")


def cmd_predict(args) -> None:
    from ssl_ops.serving.model_registry import predict
    from ssl_ops.tracking import tracking_uri

    params = _load(args)
    table = predict(args.model, Path(args.path), Path(args.out), tracking_uri(params.tracking), resize=args.resize,
                    strict=args.strict)
    counts = table["predicted"].value_counts()
    out.print(f"{len(table)} images -> {args.out} (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")")
    report = table.attrs["report"]
    if report.converted:
        out.print(f"converted {len(report.converted)} grey image(s) to RGB, as the model's training images were "
                  f"(color_mode {table.attrs['color_mode']}): " + _some(report.converted), highlight=False)
    if report.skipped:
        out.print(f"skipped {len(report.skipped)} non-image entr{'y' if len(report.skipped) == 1 else 'ies'}: "
                  + _some(report.skipped), highlight=False)
    if report.unreadable:  # every one, with its reason: they are missing from the CSV
        err.print(f"left out {len(report.unreadable)} unusable image(s) (not in {args.out}; --strict makes this an "
                  "error):\n  " + "\n  ".join(report.unreadable), highlight=False, markup=False)


def _some(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def cmd_tune(args) -> None:
    from ssl_ops.tuning import apply_best, nest, run_study, seeds_note, top_trials_table, trial_values

    params = _load(args)
    try:
        res = run_study(args.method, params, trials=args.trials, timeout=args.timeout, storage=args.storage,
                        study_name=args.study, repeats=args.repeats)
    except KeyboardInterrupt:
        err.print("interrupted: the running trial is marked FAIL (interrupted); the finished trials are kept in the "
                  "study. Run the same command again to resume it.")
        sys.exit(130)
    out.print(top_trials_table(res.study))
    if res.best_file is None:
        out.print(f"no complete trial yet in study {res.study.study_name}; nothing to write")
        if args.apply:
            raise SslOpsError("--apply: the study has no complete trial to apply")
        return
    best = res.study.best_trial
    out.print(f"best: trial {best.number}, val top-1 {best.value:.2%}{seeds_note(best)} -> {res.best_file} "
              f"(this call: {res.wall_seconds:.1f}s; plots in {res.plots[0].parent if res.plots else '-'})")
    if args.apply:
        diff = apply_best(args.params, nest(trial_values(best.params)))
        out.print(diff or f"{args.params} already holds these values", highlight=False, markup=False)
        if diff:
            out.print(f"applied to {args.params}: `dvc repro` now trains with them")


def build_parser() -> argparse.ArgumentParser:
    from ssl_ops.methods import METHODS
    from ssl_ops.pretexts import PRETEXTS

    parser = argparse.ArgumentParser(
        prog="ssl-ops", description="Train image classifiers from very few labels; every run tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p)
        p.set_defaults(fn=fn)
        return p

    add("prepare", cmd_prepare, "materialise the dataset in params under data/prepared/<name>/")
    add("split", cmd_split, "write the labeled / val / unlabeled split file under data/splits/")
    p = add("train", cmd_train, "train a method on the split; writes models/<method>.pt and an MLflow run")
    p.add_argument("method", choices=sorted(METHODS), help="registered method")
    p.add_argument("--resume", action="store_true",
                   help="insist on continuing from checkpoints/<method>/last.pt (other params: an error); without "
                        "it an unfinished checkpoint of the same params is resumed anyway")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the params and print what the run would use, and where each key was set; no run")
    p = add("pretrain", cmd_pretrain,
            "self-supervised pre-training on all train images -> models/pretrain/<pretext>.pt")
    p.add_argument("pretext", choices=sorted(PRETEXTS), help="registered pretext")
    p.add_argument("--resume", action="store_true",
                   help="insist on continuing from checkpoints/pretrain/<pretext>/last.pt (an unfinished "
                        "checkpoint of the same params is resumed anyway)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the params and print what the run would use, and where each key was set; no run")
    p = add("evaluate", cmd_evaluate, "test/val accuracy of a trained method -> metrics/<method>.json")
    p.add_argument("method", choices=sorted(METHODS), help="registered method")
    p = add("report", cmd_report, "mean ± std over seeds per method and label budget, from MLflow -> reports/")
    p.add_argument("--quiet", action="store_true", help="write the file, print no table")
    p.add_argument("--experiment", default=None, help="MLflow experiment to read (default: tracking.experiment)")
    p.add_argument("--out-dir", default="reports", help="folder for summary.md, plots/ and the PNGs (default: reports)")
    p = add("results", cmd_results, "a campaign's table: every method over labeled splits, with CPU cost and val "
            "curves, from MLflow -> reports/results_<experiment>.md + .json + PNGs")
    p.add_argument("--experiment", default=None, help="MLflow experiment to read (default: tracking.experiment)")
    p.add_argument("--out", default=None, help="the markdown file (default: reports/results_<experiment>.md)")
    p.add_argument("--ledger", default=None, metavar="DIR",
                   help="a folder of run records kept in git (pipelines/fmnist_10pc/runs): the experiment's runs are "
                        "added to it and the report is made from it, so a clone without the MLflow store rebuilds it")
    p.add_argument("--all-methods", action="store_true",
                   help="name every registered method (and PAWS-NN) that has no evaluated run yet")
    p.add_argument("--compare", action="store_true",
                   help="with --ledger: set each run of the store beside the ledger's record of the same row and "
                        "split (did a re-run reproduce it?); writes nothing, exit status 1 if any differs")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="X",
                   help="with --compare: the largest difference of a metric or curve point still counted the same "
                        "(default 0: bit for bit; e.g. 0.005 = half a point of top-1 on another machine)")
    p = add("promote", cmd_promote, "register a run's model (alias challenger); make it champion if it wins on val")
    p.add_argument("method", help="method whose models/<method>.json names the run (unless --run-id)")
    p.add_argument("--run-id", help="MLflow run to promote (default: the one in models/<method>.json)")
    p.add_argument("--name", help="registered model name (default: registry.model_name from params)")
    p.add_argument("--force", action="store_true", help="make it champion whatever its val accuracy")
    p = add("predict", cmd_predict, "class probabilities for a folder of images or a .npy array -> CSV")
    p.add_argument("path", help="folder of images (png, jpg, ...), one image file, or .npy array "
                                "(N,C,H,W / N,H,W,C / N,H,W)")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/ssl-ops-fashion_mnist-10pc@champion")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--resize", action="store_true", help="resize images of another size to the model's (bilinear)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first unusable image (default: leave it out, list it, fail only if none is "
                        "usable)")
    p = add("tune", cmd_tune, "Optuna study of a method's tune.spaces on the val split, tracked in MLflow")
    p.add_argument("method", choices=sorted(METHODS) + sorted(PRETEXTS),
                   help="registered method, or a pretext (scored on its val monitor: PAWS-NN, k-NN)")
    p.add_argument("--trials", type=int, default=20, help="trials this process runs (default 20; 0: only report)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="start no trial after S seconds")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="sqlite:///tuning/optuna.db (default), postgresql://..., or journal:PATH for parallel workers")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: <method>-<dataset>)")
    p.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="train each trial at R training seeds (train.seed, +1000, ...) and score the mean val "
                        "(default 1); a tiny val set plus one seed cannot tell apart points a few images apart")
    p.add_argument("--apply", action="store_true", help="write the best values into the params file (shows the diff)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)  # None, or the exit status of a check (results --compare)
    except SslOpsError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; the last finished epoch's checkpoint is kept: run the same command again to resume")
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
