"""What the three steps of MOAM (S4L §5, "Mix Of All Models") share.

Step 1 (``moam``) trains S4L-Rotation + VAT + EntMin jointly with Polyak averaging; step 2
(``moam_retrain``) pseudo-labels the train images with step 1's model, averaging its predictions over fixed
crops x 4 rotations (:func:`tta_probs`), and retrains that network "in the exact same way (i.e. with all the
losses)" with every image labeled by its pseudo-label; step 3 (``moam_finetune``) fine-tunes step 2's
network on the true labels only, with a small learning rate.

Each step is a registered method (own params section, DVC stage and MLflow run). A later step reads the
previous step's ``models/<method>.pt`` (:func:`load_previous`: same split and dataset, the right method)
and tags its MLflow run with the previous run's id (:meth:`MoamStep.run_tags`), so the three runs are linked:
``moam_step`` = 1, 2, 3 and ``moam_parent_run`` / ``moam_parent_method`` on steps 2 and 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_ops import augment, io
from ssl_ops.errors import CheckpointError, DataIntegrityError
from ssl_ops.methods.base import METHODS, Method


def fixed_crops(x: Tensor, padding: int, crops: int, flip: bool) -> list[Tensor]:
    """Deterministic test-time crops of a batch (the "several crops" of S4L §5's pseudo-labelling): after
    zero-padding by ``padding``, the first ``crops`` of (centre, top-left, top-right, bottom-left,
    bottom-right) windows of the original size, and with ``flip`` also their mirror images."""
    if not 1 <= crops <= 5:
        raise ValueError(f"fixed_crops: crops must be 1..5 (centre and 4 corners), got {crops}")
    h, w = x.shape[-2:]
    padded = F.pad(x, (padding,) * 4)
    p2 = 2 * padding
    offsets = [(padding, padding), (0, 0), (0, p2), (p2, 0), (p2, p2)][:crops]
    views = [padded[..., oy:oy + h, ox:ox + w] for oy, ox in offsets]
    return views + [v.flip(-1) for v in views] if flip else views


@torch.no_grad()
def tta_probs(net: nn.Module, x: Tensor, padding: int, crops: int, flip: bool, rotations: int = 4) -> Tensor:
    """Class probabilities of a uint8 batch averaged over :func:`fixed_crops` x the 4 rotations (S4L §5):
    ``mean_{c, k} softmax(net(rot90(crop_c(x), k)))``. ``net`` maps floats in [0, 1] to logits. ``rotations=1``
    averages over the upright crops only: for a classifier never trained on rotated images (step 1 with
    ``class_on_rotations: false``) the rotated views are out of distribution and drag the average down."""
    if rotations not in (1, 4):
        raise ValueError(f"tta_probs: rotations must be 1 (upright) or 4, got {rotations}")
    total, n = 0.0, 0
    for view in fixed_crops(x, padding, crops, flip):
        view = augment.to_float(view)
        for k in range(rotations):
            total = total + F.softmax(net(augment.rot90(view, k)).float(), 1)
            n += 1
    return total / n


@torch.no_grad()
def tta_predict(net: nn.Module, store, indices: np.ndarray | Tensor, batch_size: int, padding: int, crops: int,
                flip: bool, rotations: int = 4) -> Tensor:
    """:func:`tta_probs` of ``indices`` of ``store``, in order (``net`` in eval mode, restored after)."""
    was_training = net.training
    net.eval()
    out = [tta_probs(net, xb, padding, crops, flip, rotations) for xb, _ in store.iterate(indices, batch_size)]
    net.train(was_training)
    return torch.cat(out)


def load_previous(path: Path, ctx, method: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The classifier state dict exported by the previous MOAM step (``models/<method>.pt``) and the whole
    checkpoint; a clear error when it is missing, from another method, split or dataset."""
    if not Path(path).exists():
        raise CheckpointError(f"{path} does not exist; run `ssl-ops train {method}` on this split first "
                              f"(or `dvc repro` with {method} in the MOAM chain)")
    ck = io.torch_load(path)
    if not isinstance(ck, dict) or ck.get("method") != method or "state_dict" not in ck:
        found = ck.get("method") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path} is not a {method} model (found {found!r}); it must be written by "
                              f"`ssl-ops train {method}`")
    if ck.get("split_sha256") != ctx.split.sha256 or ck.get("dataset_sha256") != ctx.data.sha256:
        raise DataIntegrityError(f"{path} was trained on another split or dataset; re-run `ssl-ops train {method}` "
                                 "on this split")
    prefix = METHODS[method].exported_prefix(ck["params"])
    state = {k.removeprefix(prefix): v for k, v in ck["state_dict"].items() if k.startswith(prefix)}
    return state, ck


class MoamStep(Method):
    """A MOAM step: ``step`` number, the ``previous`` method it starts from (None for step 1), run tags."""

    step: ClassVar[int] = 1
    previous: ClassVar[str | None] = None
    parent_run: str | None = None  # MLflow run id of the previous step's model, set by start_from_previous

    @classmethod
    def exported_prefix(cls, params: dict[str, Any]) -> str:
        """Key prefix, in ``model.state_dict()``, of the classifier the next step starts from (``params``: the
        run's resolved params, as saved in its checkpoint)."""
        return "net."

    def start_from_previous(self, net: nn.Module, path: Path) -> dict[str, Any]:
        """Load the previous step's exported classifier into ``net`` (strict) and remember its run id."""
        state, ck = load_previous(path, self.ctx, self.previous)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit this {type(net).__name__} (same model.backbone and "
                                  f"model.width?): {str(exc).splitlines()[0][:300]}") from None
        self.parent_run = ck.get("mlflow_run_id")
        return ck

    def run_tags(self) -> dict[str, str]:
        tags = {"moam_step": str(self.step)}
        if self.previous is not None:
            tags.update(moam_parent_method=self.previous, moam_parent_run=str(self.parent_run))
        return tags
