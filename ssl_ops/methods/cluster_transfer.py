"""Cluster-classification transfer (Noroozi, Vinjimoor, Favaro & Pirsiavash 2018, §3).

1. Features of every train image come from a source model: a pretext checkpoint (``source: pretext``,
   Jigsaw++ by default, ``ssl-ops pretrain jigsaw_pp``; its backbone may be bigger than the target) or HOG
   descriptors, the paper's hand-crafted baseline (``source: hog``, scikit-image). Features are
   L2-normalised, so that k-means compares directions as a cosine classifier would.
2. k-means (``ssl_ops.cluster.kmeans``: batched, on the device, seeded k-means++) with ``k`` centres; each
   image's pseudo-label is its nearest centre.
3. The target network (``backbone`` / ``width``, by default ``model.*``; may be smaller than the source) is
   trained **from scratch** to classify the clusters, for ``cluster_fraction`` of the run's steps, on all
   train images (labels unused).
4. The cluster layer is dropped and the network with a new linear classifier is fine-tuned on the labeled
   split with cross-entropy (crop + flip) for the remaining steps. Momentum and the learning-rate schedule
   restart at the switch (``bind_optimizer``), as for a new training run.

Steps 1-2 run in the first training step and their result (one label per train image) is kept in buffers of
``self.model``, so a resumed run or ``ssl-ops evaluate`` never redoes them. Cluster purity (the share of
images whose class is their cluster's majority class) is logged on the labeled + val images the method may
see, and over all train labels as an analysis figure that no choice depends on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import io
from ssl_ops.backbones import build_backbone
from ssl_ops.cluster import kmeans
from ssl_ops.engine import lr_lambda
from ssl_ops.errors import CheckpointError, DataIntegrityError, ParamsError, SslOpsError
from ssl_ops.heads import Classifier, Encoder, Normalize
from ssl_ops.methods.base import Method, MethodParams, register_method
from ssl_ops.probes import extract_features


class ClusterTransferParams(MethodParams):
    source: Literal["pretext", "hog"] = "pretext"
    pretrained: Path = Path("models/pretrain/jigsaw_pp.pt")  # source: pretext; any `ssl-ops pretrain` output
    k: int = Field(50, gt=1)  # clusters (the paper: 2000 on ImageNet's 1.3M images; ~10 x the classes here)
    kmeans_iters: int = Field(30, gt=0)
    kmeans_init: Literal["k-means++", "random"] = "k-means++"
    hog_orientations: int = Field(9, gt=0)  # Dalal & Triggs' defaults, cells scaled to small images
    hog_cell: int = Field(4, gt=0)  # pixels per cell side (28 px -> 7 x 7 cells)
    hog_block: int = Field(2, gt=0)  # cells per block side (block-normalised with L2-Hys)
    cluster_fraction: float = Field(0.5, gt=0, lt=1)  # share of the run's steps spent classifying clusters
    backbone: str | None = None  # target network; None: model.backbone
    width: float | None = Field(None, gt=0)  # None: model.width


def hog_features(images: np.ndarray, orientations: int, cell: int, block: int) -> np.ndarray:
    """HOG descriptors (Dalal & Triggs 2005) of uint8 images (N, C, H, W) -> float32 (N, D), via scikit-image
    (one call per image: fine for a one-off pass over the train set)."""
    from skimage.feature import hog

    channel_axis = -1 if images.shape[1] > 1 else None
    out = []
    for img in images:
        arr = np.moveaxis(img, 0, -1) if channel_axis is not None else img[0]
        out.append(hog(arr, orientations=orientations, pixels_per_cell=(cell, cell), cells_per_block=(block, block),
                       block_norm="L2-Hys", feature_vector=True, channel_axis=channel_axis))
    return np.asarray(out, dtype=np.float32)


def cluster_purity(clusters: Tensor, labels: Tensor, k: int) -> float:
    """Share of images whose class is the majority class of their cluster (1 = every cluster is one class)."""
    if not len(labels):
        return float("nan")
    classes = int(labels.max()) + 1
    counts = torch.zeros(k, classes, device=labels.device).index_put_(
        (clusters, labels), torch.ones_like(labels, dtype=torch.float), accumulate=True)
    return (counts.max(1).values.sum() / len(labels)).item()


class ClusterLabels(nn.Module):
    """Buffers: the cluster of every train image and whether they were computed."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("labels", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("done", torch.zeros((), dtype=torch.bool))


def load_source(path: Path, ctx) -> Encoder:
    """The encoder (normalisation + backbone) of a pretext checkpoint of this dataset, any backbone."""
    if not Path(path).exists():
        raise CheckpointError(f"cluster_transfer.pretrained {path} does not exist; run `ssl-ops pretrain jigsaw_pp` "
                              "(or another pretext) first, or set cluster_transfer.source: hog")
    ck = io.torch_load(path)
    if not isinstance(ck, dict) or not {"backbone", "backbone_name", "in_channels", "normalize"} <= set(ck):
        raise CheckpointError(f"cluster_transfer.pretrained {path} is not an `ssl-ops pretrain` checkpoint "
                              "(models/pretrain/<pretext>.pt)")
    if ck.get("dataset_sha256") != ctx.data.sha256:
        raise DataIntegrityError(f"cluster_transfer.pretrained {path} was pre-trained on another dataset; pre-train "
                                 f"on {ctx.params.data.name}")
    backbone = build_backbone(ck["backbone_name"], ck["in_channels"], width=ck["width"], image_size=ck.get("image_size"))
    backbone.load_state_dict(ck["backbone"])
    return Encoder(Normalize(ck["normalize"]["mean"], ck["normalize"]["std"]), backbone).to(ctx.device)


@register_method("cluster_transfer")
class ClusterTransfer(Method):
    Params = ClusterTransferParams
    pretext = "jigsaw_pp"  # the default source (tests pre-train it first)
    params: ClusterTransferParams

    def __init__(self, ctx, params: ClusterTransferParams):
        super().__init__(ctx, params)
        if params.init is not None or params.freeze_blocks:
            raise ParamsError("cluster_transfer trains its target network from scratch (Noroozi et al. §3): leave "
                              "cluster_transfer.init and freeze_blocks unset; the source model is `pretrained`")
        if not ctx.store.in_memory:
            raise SslOpsError("cluster_transfer needs the train images in memory; raise data.max_in_memory_gb")
        m = ctx.params.model
        name, width = params.backbone or m.backbone, params.width or m.width
        backbone = build_backbone(name, ctx.data.image_shape[0], width=width, image_size=ctx.data.image_shape[-1])
        net = Classifier(Normalize(ctx.data.mean, ctx.data.std), backbone, ctx.num_classes)
        net.spec_backbone = (name, width)  # what the exported model's spec must name
        self.model = nn.ModuleDict({"net": net, "cluster_fc": nn.Linear(backbone.feature_dim, params.k),
                                    "clusters": ClusterLabels(ctx.store.n)}).to(ctx.device)
        self.optimizer = None
        self._stats: dict[str, Tensor] = {}

    def classifier(self) -> nn.Module:
        return self.model["net"]

    @property
    def total_steps(self) -> int:
        return self.ctx.train.epochs * self.ctx.train.steps_per_epoch

    @property
    def switch_step(self) -> int:
        """First fine-tuning step; at least one step of each phase when the run has two."""
        return min(max(1, round(self.params.cluster_fraction * self.total_steps)), max(1, self.total_steps - 1))

    def bind_optimizer(self, optimizer, scheduler) -> None:
        """Called by ``engine.fit``: one warm-up + cosine schedule per phase (momentum restarts at the switch)."""
        self.optimizer, s, total, train = optimizer, self.switch_step, self.total_steps, self.ctx.train

        def schedule(length: int):  # the run's warm-up is shared between the phases like its steps
            return lr_lambda(train.model_copy(update={"warmup_epochs": train.warmup_epochs * length / total}), length)

        phases = (schedule(s), schedule(max(1, total - s)))

        def f(step: int) -> float:
            return phases[0](step) if step < s else phases[1](step - s)

        scheduler.lr_lambdas = [f] * len(optimizer.param_groups)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * f(scheduler.last_epoch)

    # -- steps 1-2: features and k-means --------------------------------------------------------------------

    def source_features(self) -> Tensor:
        ctx, p = self.ctx, self.params
        if p.source == "hog":
            x = ctx.store.x.cpu().numpy()
            f = torch.from_numpy(hog_features(x, p.hog_orientations, p.hog_cell, p.hog_block)).to(ctx.device)
        else:
            f, _ = extract_features(load_source(p.pretrained, ctx), ctx.store, np.arange(ctx.store.n),
                                    ctx.train.eval_batch_size)
        return F.normalize(f.float(), dim=1)

    @torch.no_grad()
    def make_clusters(self) -> None:
        ctx, p = self.ctx, self.params
        res = kmeans(self.source_features(), p.k, iters=p.kmeans_iters, seed=ctx.train.seed, init=p.kmeans_init)
        buf = self.model["clusters"]
        buf.labels.copy_(res.labels)
        buf.done.fill_(True)

    def purity(self) -> dict[str, float]:
        ctx, lab = self.ctx, self.model["clusters"].labels
        seen = torch.as_tensor(np.concatenate([ctx.split.labeled, ctx.split.val]), device=ctx.device).long()
        return {"purity_labeled_val": cluster_purity(lab[seen], ctx.store.y[seen], self.params.k),
                "purity_train_analysis": cluster_purity(lab, ctx.store.y, self.params.k)}

    # -- steps 3-4 ------------------------------------------------------------------------------------------

    def training_step(self, step: int) -> dict[str, Tensor]:
        ctx, buf, net = self.ctx, self.model["clusters"], self.model["net"]
        if not bool(buf.done):
            self.make_clusters()
        if not self._stats:
            self._stats = {k: torch.tensor(v) for k, v in self.purity().items()}
        if step < self.switch_step:  # step 3: classify the clusters, all train images, from scratch
            idx = torch.randint(0, ctx.store.n, (ctx.train.batch_size,), generator=ctx.generator, device=ctx.device)
            logits = self.model["cluster_fc"](net.features(ctx.augment(ctx.store.x[idx])))
            y = buf.labels[idx]
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "fine_tuning": torch.tensor(0.0), **self._stats}
        if step == self.switch_step and self.optimizer is not None:
            self.optimizer.state.clear()  # step 4 is a new training run: fresh momentum
        x, y = ctx.labeled_batch(ctx.train.batch_size)  # step 4: fine-tune on the labels
        return {"loss": F.cross_entropy(net(x), y), "fine_tuning": torch.tensor(1.0), **self._stats}
