"""``ssl-ops pretrain <pretext>``: self-supervised pre-training, probes, and loading the result.

Outputs (written atomically):
- ``models/pretrain/<pretext>.pt``: ``{"backbone", "head", "model"}`` state dicts, ``"params"`` (resolved),
  ``"pretext"``, ``"backbone_name"``, ``"width"``, ``"in_channels"``, ``"feature_dim"``, ``"normalize"``
  (mean, std), ``"metrics"``, ``"mlflow_run_id"``, ``"split_sha256"``, ``"dataset_sha256"``; loads with
  ``ssl_ops.io.torch_load`` (weights_only=True). Later methods take the backbone with
  :func:`load_pretrained_backbone`.
- ``metrics/pretrain_<pretext>.json``: ``knn_top1`` and ``linear_top1`` (test accuracy of a weighted k-NN
  and of a logistic regression fit on frozen features of the labeled split), ``knn_val_top1``,
  ``pretext_loss`` (mean loss of the last epoch), ``train_seconds``, ``cpu_seconds`` and ``loadavg_mean``;
  also logged to the MLflow run.
- ``checkpoints/pretrain/<pretext>/last.pt``: per-epoch checkpoint for ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_ops import distributed, io, probes, recovery, tracking
from ssl_ops.backbones import build_backbone
from ssl_ops.engine import RunContext, fit, machine, make_context
from ssl_ops.errors import CheckpointError
from ssl_ops.params import BaseParams
from ssl_ops.methods import METHODS
from ssl_ops.pretexts import PRETEXTS, Pretext
from ssl_ops.stages.train import CHECKPOINTS, METRICS, MODELS, _config_hash, load_data, train_stage

PRETRAIN_MODELS = MODELS / "pretrain"


def model_path(name: str) -> Path:
    return PRETRAIN_MODELS / f"{name}.pt"


@dataclass
class PretrainResult:
    metrics: dict[str, float]
    pretext: Pretext
    ctx: RunContext
    run_id: str


def build_pretext(name: str, params: BaseParams, data, split) -> Pretext:
    pparams = getattr(params, name)
    ctx = make_context(params, pparams.train_params(params.train), data, split)
    return PRETEXTS[name](ctx, pparams)


def probe_encoder(encoder: nn.Module, ctx: RunContext, knn_k: int = 20,
                  knn_temperature: float = 0.07) -> dict[str, float]:
    """k-NN and linear-probe test accuracy of frozen ``encoder`` features, references = the labeled split;
    plus the k-NN monitor's val accuracy. The test set is only reported, never used to choose anything."""
    bs = ctx.train.eval_batch_size
    test = ctx.test_store()
    ref_f, ref_y = probes.extract_features(encoder, ctx.store, ctx.split.labeled, bs)
    test_f, test_y = probes.extract_features(encoder, test, np.arange(len(ctx.data.test_y)), bs)
    out = {
        "knn_top1": probes.knn_top1(ref_f, ref_y, test_f, test_y, knn_k, knn_temperature),
        "linear_top1": probes.linear_top1(ref_f, ref_y, test_f, test_y),
    }
    if len(ctx.split.val):
        val_f, val_y = probes.extract_features(encoder, ctx.store, ctx.split.val, bs)
        out["knn_val_top1"] = probes.knn_top1(ref_f, ref_y, val_f, val_y, knn_k, knn_temperature)
    return out


def pretrain_stage(name: str, params: BaseParams, resume: bool = False, write_outputs: bool = True,
                   run_tags: dict[str, str] | None = None, epoch_end=None, nested: bool = False,
                   checkpoint: Path | None = None, probe: bool = True) -> PretrainResult:
    """Pre-train pretext ``name`` on all train images (no labels), probe it, write its outputs.

    For ``ssl-ops tune <pretext>`` (as :func:`ssl_ops.stages.train_stage`): ``epoch_end(epoch, metrics)`` after
    each epoch, ``nested`` MLflow run, its own ``checkpoint``; ``probe=False`` skips the test-set probes and the
    pretext's test metrics (a trial is scored on the val split only, and they cost CPU)."""
    data, split, spath = load_data(params)
    pretext = build_pretext(name, params, data, split)
    ctx, pparams = pretext.ctx, pretext.params
    resolved = params.model_dump(mode="json")
    config_hash = _config_hash(resolved, name)
    checkpoint = checkpoint or CHECKPOINTS / "pretrain" / name / "last.pt"
    resume, prev_run = recovery.resume_from(checkpoint, config_hash, ctx.train.epochs, explicit=resume)
    tags = {"pretext": name, "stage": "pretrain", "dataset": params.data.name, "split_file": str(spath),
            "split_sha256": split.sha256, "dataset_sha256": data.sha256, "machine": machine(),
            **(run_tags or {})}
    with tracking.start_run(params.tracking, run_name=f"pretrain-{name}", params=resolved, tags=tags,
                            run_id=prev_run, nested=nested) as run_id:
        result = fit(pretext, ctx, checkpoint, resume=resume, config_hash=config_hash, log=tracking.log_metrics,
                     run_state={"mlflow_run_id": run_id}, epoch_end=epoch_end)
        metrics = {"pretext_loss": result.history[-1]["loss"], **result.machine}
        if probe:
            metrics.update(probe_encoder(pretext.encoder, ctx, pparams.knn_k, pparams.knn_temperature))
            if hasattr(pretext, "test_metrics"):  # a pretext's own evaluation, e.g. PAWS-NN
                metrics.update(pretext.test_metrics())
        else:  # a tuning trial: the last epoch's val monitors only
            metrics.update({k: v for k, v in result.history[-1].items() if k.endswith("val_top1")})
        tracking.log_metrics(metrics)
        if write_outputs and distributed.is_main():  # under torchrun rank 0 alone writes
            model = pretext.model
            io.torch_save(model_path(name), {
                "backbone": model.backbone.state_dict(), "head": model.head.state_dict(),
                "model": model.state_dict(), "pretext": name, "params": resolved,
                "backbone_name": params.model.backbone, "width": params.model.width,
                "in_channels": data.image_shape[0], "image_size": data.image_shape[-1],
                "feature_dim": pretext.encoder.feature_dim,
                "normalize": {"mean": list(data.mean), "std": list(data.std)},
                "metrics": metrics, "mlflow_run_id": run_id, "split_sha256": split.sha256,
                "dataset_sha256": data.sha256,
            })
            io.write_json(METRICS / f"pretrain_{name}.json", metrics)
    return PretrainResult(metrics, pretext, ctx, run_id)


def pretrain_briefly_for(method: str, load, epochs: int = 1, steps: int = 2, batch_size: int = 8) -> Path | None:
    """A short pre-training of what ``method`` starts from (its ``pretext`` attribute: simclrv2 from simclr,
    paws_finetune from paws), for tests and benchmarks that exercise the method itself rather than its
    pre-training. ``load(*overrides)`` builds the params; the checkpoint lands where the method looks for it
    (``models/pretrain/<pretext>.pt`` in the working directory). A MOAM step (its ``previous`` attribute) gets
the steps before it trained as briefly (``models/<previous>.pt``). None for a method that starts from scratch."""
    previous = getattr(METHODS[method], "previous", None)
    if previous is not None:  # a MOAM step: train the steps before it briefly (models/<previous>.pt)
        pretrain_briefly_for(previous, load, epochs, steps, batch_size)
        train_stage(previous, load(f"{previous}.epochs={epochs}", f"{previous}.steps_per_epoch={steps}",
                                   f"{previous}.batch_size={batch_size}"))
        return MODELS / f"{previous}.pt"
    pretext = getattr(METHODS[method], "pretext", None)
    if pretext is None:
        return None
    pretrain_stage(pretext, load(f"{pretext}.epochs={epochs}", f"{pretext}.steps_per_epoch={steps}",
                                 f"{pretext}.batch_size={batch_size}"))
    return model_path(pretext)


def load_pretrained_backbone(path: str | Path, ctx: RunContext | None = None, *, strict_data: bool = True) -> nn.Module:
    """The backbone of a pre-trained pretext (``models/pretrain/<pretext>.pt``), weights loaded, on ``ctx``'s
    device and with ``ctx``'s ``model.freeze_blocks`` applied. With a ``ctx``, the backbone name, width and
    input channels must match its params and (``strict_data``) the checkpoint must come from the same
    prepared dataset; a mismatch is a :class:`CheckpointError` naming the difference.

    Example (a later method's ``__init__``)::

        backbone = load_pretrained_backbone("models/pretrain/rotation.pt", ctx)
        model = Classifier(Normalize(ctx.data.mean, ctx.data.std), backbone, ctx.num_classes)
    """
    ck: dict[str, Any] = io.torch_load(path)
    freeze = 0
    device = torch.device("cpu")
    if ctx is not None:
        m = ctx.params.model
        want = {"backbone_name": m.backbone, "width": m.width, "in_channels": ctx.data.image_shape[0]}
        diff = {k: (ck.get(k), v) for k, v in want.items() if ck.get(k) != v}
        if strict_data and ck.get("dataset_sha256") != ctx.data.sha256:
            diff["dataset_sha256"] = (ck.get("dataset_sha256"), ctx.data.sha256)
        if diff:
            raise CheckpointError(
                f"{path} does not fit this run: "
                + ", ".join(f"{k} is {a!r} there but {b!r} here" for k, (a, b) in diff.items())
                + ". Pre-train with the same model/data params (ssl-ops pretrain ...) or change them here.")
        freeze, device = m.freeze_blocks, ctx.device
    backbone = build_backbone(ck["backbone_name"], ck["in_channels"], width=ck["width"],
                              image_size=ck.get("image_size"))
    try:
        backbone.load_state_dict(ck["backbone"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: backbone weights do not fit {ck['backbone_name']}: {str(exc)[:300]}") from None
    backbone.freeze(freeze)
    return backbone.to(device)
