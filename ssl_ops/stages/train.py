"""A method's pipeline stages, one importable function each (re-exported by ``ssl_ops.stages``; the pretext's
is ``ssl_ops.stages.pretrain``); the CLI, Optuna and the tests call these.

Outputs by stage (all written atomically):
- prepare:  data/prepared/<dataset>/                 (arrays + manifest with sha256)
- split:    data/splits/<dataset>-<budget>-seed<s>.json
- train:    models/<method>.pt (weights + resolved params), models/<method>.json (MLflow run id, timing),
            checkpoints/<method>/last.pt (per-epoch, for --resume)
- evaluate: metrics/<method>.json (test_top1, test_top5, val_top1, train_seconds)
- report:   reports/summary.md, reports/plots/*.csv, reports/*.png (from the MLflow runs)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_ops import distributed, io, recovery, report, tracking
from ssl_ops.probes import max_class_fraction
from ssl_ops.data.prepare import PreparedDataset, check_prepared_with, link_sources, load_prepared, prepare
from ssl_ops.data.splits import Split, load_split, make_split, split_path, write_split
from ssl_ops.engine import RunContext, fit, machine, make_context, predict_logits, topk_accuracy, use_amp
from ssl_ops.errors import CheckpointError, DataIntegrityError, SslOpsError
from ssl_ops.methods import METHODS, Method
from ssl_ops.params import BaseParams, params_model

MODELS, CHECKPOINTS, METRICS, REPORTS = Path("models"), Path("checkpoints"), Path("metrics"), Path("reports")


def prepare_stage(params: BaseParams) -> Path:
    out = prepare(params.data)
    link_sources(params.data)  # after success: dvc.yaml's prepare then records the folders it read
    return out


def split_stage(params: BaseParams) -> tuple[Path, Split]:
    data = load_prepared(params.data.name)
    check_prepared_with(params.data, data)
    split = make_split(data.train_y, params.split, data.sha256, data.classes, unlabeled_only=data.num_unlabeled_only)
    path = split_path(params.data.name, params.split)
    write_split(split, path)
    return path, split


def load_data(params: BaseParams) -> tuple[PreparedDataset, Split, Path]:
    """The prepared dataset (hashes verified) and its split (checked to come from this dataset)."""
    data = load_prepared(params.data.name)
    check_prepared_with(params.data, data)
    path = split_path(params.data.name, params.split)
    split = load_split(path, data.sha256, len(data.train_y) + data.num_unlabeled_only)
    if split.unlabeled_only != data.num_unlabeled_only:
        raise DataIntegrityError(
            f"split file {path} counts {split.unlabeled_only} unlabeled-only images but the prepared dataset has "
            f"{data.num_unlabeled_only}; re-run `ssl-ops split` (or `dvc repro`)")
    return data, split, path


def _config_hash(resolved: dict[str, Any], method: str) -> str:
    """What determines a run's trajectory: a checkpoint only resumes under the same values."""
    keep = {k: resolved[k] for k in ("data", "split", "model", "train", method)}
    keep["train"] = {k: v for k, v in keep["train"].items() if k != "progress"}
    return io.sha256_bytes(json.dumps(keep, sort_keys=True, default=str).encode())


@dataclass
class TrainResult:
    metrics: dict[str, float]
    method: Method
    ctx: RunContext
    run_id: str


def build_method(name: str, params: BaseParams, data: PreparedDataset, split: Split) -> Method:
    mparams = getattr(params, name)
    ctx = make_context(params, mparams.train_params(params.train), data, split)
    return METHODS[name](ctx, mparams)


def train_stage(name: str, params: BaseParams, resume: bool = False, epoch_end=None,
                write_outputs: bool = True, run_tags: dict[str, str] | None = None, nested: bool = False,
                checkpoint: Path | None = None) -> TrainResult:
    """Train a registered method; returns final metrics and the objects (for Optuna and tests).

    ``nested`` makes the MLflow run a child of the active one (an Optuna trial under its study's run);
    ``checkpoint`` replaces checkpoints/<name>/last.pt (trials must not overwrite the train stage's).
    """
    data, split, spath = load_data(params)
    method = build_method(name, params, data, split)
    resolved = params.model_dump(mode="json")
    config_hash = _config_hash(resolved, name)
    checkpoint = checkpoint or CHECKPOINTS / name / "last.pt"
    # kill -9 / dvc repro: the same command resumes a matching unfinished checkpoint (ssl_ops/recovery.py)
    resume, prev_run = recovery.resume_from(checkpoint, config_hash, method.ctx.train.epochs, explicit=resume)
    tags = {"method": name, "dataset": params.data.name, "split_file": str(spath), "split_sha256": split.sha256,
            "dataset_sha256": data.sha256, "machine": machine(), **method.run_tags(), **(run_tags or {})}
    with tracking.start_run(params.tracking, run_name=name, params=resolved, tags=tags, run_id=prev_run,
                            nested=nested) as run_id:
        result = fit(method, method.ctx, checkpoint, resume=resume, config_hash=config_hash,
                     log=tracking.log_metrics, run_state={"mlflow_run_id": run_id}, epoch_end=epoch_end)
        metrics = {**result.machine, **{k: v for k, v in result.history[-1].items() if k != "epoch"}}
        tracking.log_metrics(result.machine)
        if write_outputs and distributed.is_main():  # under torchrun rank 0 alone writes files and logs
            model_file = MODELS / f"{name}.pt"
            io.torch_save(model_file, {
                "state_dict": method.model.state_dict(), "method": name, "params": resolved,
                "split_sha256": split.sha256, "dataset_sha256": data.sha256,
                "train_seconds": result.train_seconds, "mlflow_run_id": run_id,
            })
            if params.tracking.log_model:
                from ssl_ops.serving import model_registry as registry  # imports mlflow: only when a model is logged

                clf = method.classifier()
                # a distilled student may have another backbone than model.backbone (SimCLRv2 big-to-small)
                backbone, width = getattr(clf, "spec_backbone", (params.model.backbone, params.model.width))
                registry.log_classifier(clf, registry.model_spec(backbone, width, data.image_shape, data.classes,
                                                                 neck=getattr(clf, "neck_spec", None)))
            # DVC-tracked pointer from the pipeline to the MLflow run (dvc.lock then pins the run)
            io.write_json(MODELS / f"{name}.json", {
                "mlflow_run_id": run_id, "tracking_uri": tracking.mask_uri(tracking.tracking_uri(params.tracking)),
                "train_seconds": result.train_seconds, "cpu_seconds": result.cpu_seconds, "split_file": str(spath),
                "split_sha256": split.sha256,
            })
    return TrainResult(metrics, method, method.ctx, run_id)


def load_trained(name: str, params: BaseParams) -> tuple[Method, dict[str, Any]]:
    """Rebuild a trained method from models/<name>.pt with the params it was trained with."""
    ck = io.torch_load(MODELS / f"{name}.pt")
    saved = params_model().model_validate(ck["params"])
    data, split, _ = load_data(saved)
    if ck["split_sha256"] != split.sha256:
        raise DataIntegrityError(
            f"{MODELS / name}.pt was trained on another split than {split_path(saved.data.name, saved.split)} "
            f"(sha256 differs); re-run `ssl-ops train {name}`"
        )
    method = build_method(name, saved, data, split)
    try:
        method.model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{MODELS / name}.pt does not fit the {name} model: {str(exc)[:300]}") from None
    return method, ck


def evaluate_stage(name: str, params: BaseParams) -> dict[str, float]:
    """Test and val accuracy of a trained method -> metrics/<name>.json, also logged to its MLflow run."""
    method, ck = load_trained(name, params)
    ctx, model = method.ctx, method.classifier()
    bs, amp = ctx.train.eval_batch_size, use_amp(ctx.train, ctx.device)
    logits, labels = predict_logits(model, ctx.test_store(), np.arange(len(ctx.data.test_y)), bs, amp)
    val_logits, val_labels = predict_logits(model, ctx.store, ctx.split.val, bs, amp)
    metrics = {
        "test_top1": topk_accuracy(logits, labels, 1),
        "test_top5": topk_accuracy(logits, labels, 5),
        "val_top1": topk_accuracy(val_logits, val_labels, 1),
        # a collapsed model predicts (nearly) one class: the share of the test set its commonest prediction takes
        "test_max_class_fraction": max_class_fraction(logits),
        "train_seconds": float(ck["train_seconds"]),
    }
    if distributed.is_main():  # under torchrun every rank evaluates, rank 0 writes
        io.write_json(METRICS / f"{name}.json", metrics)
    with tracking.start_run(params.tracking, run_name=name, run_id=ck["mlflow_run_id"]):
        # at the run's last step (its epoch count): at step 0 the UI's val_top1 curve would jump back to the start
        tracking.log_metrics({k: v for k, v in metrics.items() if k != "train_seconds"}, step=ctx.train.epochs)
    return metrics


def report_stage(params: BaseParams, out_dir: Path = REPORTS, experiment: str | None = None) -> list[dict]:
    """Every evaluated run of ``params.data.name`` in the MLflow experiment (default ``tracking.experiment``)
    -> ``out_dir``/summary.md, plot data under ``out_dir``/plots/ and PNGs (``ssl_ops.report``); returns
    the runs' rows. An experiment without such runs is an error naming what to run first."""
    experiment = experiment or params.tracking.experiment
    uri = tracking.tracking_uri(params.tracking)
    rows = report.write_report(tracking.search_runs(params.tracking, experiment), params.data.name, out_dir,
                               source=f"experiment `{experiment}`")
    if not rows:
        raise SslOpsError(
            f"no evaluated {params.data.name} runs in MLflow experiment {experiment!r} at {uri}; run "
            "`ssl-ops train <method>` and `ssl-ops evaluate <method>` (or `dvc repro`) first, or name the "
            "experiment with --experiment (and the store with tracking.uri / MLFLOW_TRACKING_URI)"
        )
    return report.as_records(rows)
