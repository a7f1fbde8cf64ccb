"""Cluster-classification transfer (Noroozi, Vinjimoor, Favaro & Pirsiavash 2018, §3 and §5 "Implementation Details").

1. Features of every train image come from a source model (§3 (a)-(b)):
   - ``source: pretext``: a pretext checkpoint (Jigsaw++ by default, ``ssl-ops pretrain jigsaw_pp``; its backbone
     may be bigger than the target). The paper clusters a mid-level layer, not the last one: "We extract the
     features for all the methods from conv4 layer and max-pool them to 5 x 5 x 384 in the case of AlexNet and
     4 x 4 x 512 in the case of VGG16" (§5). Here: the output of backbone block ``feature_block`` (a Python index;
     -2, the block before the last, as conv4 is in AlexNet's 5 and VGG16's 5 conv stages) max-pooled to
     ``feature_grid`` x ``feature_grid`` cells. Layer and grid are open choices on other backbones: choose on val.
   - ``source: hog``, the hand-crafted baseline: "In 'CC+HOG', we cluster bag of words of HOG" (Table 3 caption).
     The HOG block descriptors of each image (Dalal & Triggs, scikit-image: ``hog_cell`` px cells,
     ``hog_block`` x ``hog_block``-cell blocks, ``hog_orientations`` bins, L2-Hys) are quantised against a codebook
     of ``hog_words`` visual words (k-means on a sample of descriptors) and each image becomes its histogram of
     words. The paper gives neither the vocabulary size nor the HOG settings: choose them on val.
   Features are L2-normalised, so that k-means compares directions as a cosine classifier would.
2. k-means (``ssl_ops.kmeans.kmeans``: batched, on the device, seeded k-means++) with ``k`` centres; each image's
   pseudo-label is its nearest centre (§3 (c)). The paper uses k = 2000 on ImageNet ("k = 2K", "the 1.3M images of
   ImageNet", §5), i.e. 650 images per cluster, and notes that fewer images per cluster "might cause the network to
   overfit" (§5.1). ``k: null`` keeps that ratio on another dataset (``images_per_cluster``), with at least one
   cluster per class (§5.1: "too few clusters will not lead to discriminative features"): see :func:`cluster_count`.
3. Cluster classification (§3 (d)), its own phase with its own budget: the target network (``backbone`` /
   ``width``, by default ``model.*``; may be smaller than the source) is trained **from scratch** to classify the
   clusters on all train images (labels unused) for ``cluster_epochs`` epochs of ``steps_per_epoch`` steps at peak
   lr ``cluster_lr``, with its own warm-up + schedule. The paper trains it to convergence with the standard
   ImageNet classification settings (§5); here the budget is a param: check that the logged loss has flattened.
4. The cluster layer is dropped and the network with a new linear classifier is fine-tuned on the labeled
   split with cross-entropy (crop + flip) for the run's ``epochs x steps_per_epoch`` steps (the same budget a
   supervised run gets). Momentum and the learning-rate schedule restart at the switch (``bind_optimizer``),
   as for a new training run.

So the engine runs ``cluster_epochs + epochs`` epochs; the switch is at an epoch boundary, so a checkpoint is
never taken mid-phase and a resumed run continues in the right phase. Steps 1-2 run in the first training step and
their result (one label per train image) is kept in buffers of ``self.model``, so a resumed run or ``ssl-ops
evaluate`` never redoes them. Cluster purity (the share of images whose class is their cluster's majority class)
is logged on the labeled + val images the method may see, and over all train labels as an analysis figure that no
choice depends on.
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
from ssl_ops.kmeans import assign, kmeans
from ssl_ops.engine import lr_lambda
from ssl_ops.errors import CheckpointError, DataIntegrityError, ParamsError, SslOpsError
from ssl_ops.heads import Classifier, Encoder, Normalize
from ssl_ops.methods.base import ClassLossParams, Method, PrePhase, register_method
from ssl_ops.sections import TrainParams
from ssl_ops.probes import extract_features


# §5: "k = 2K" clusters for "the 1.3M images of ImageNet": 650 images per cluster
PAPER_IMAGES_PER_CLUSTER = 1_300_000 / 2000
HOG_CODEBOOK_SAMPLE = 100_000  # descriptors the HOG codebook is fitted on (then every descriptor is assigned)


class ClusterTransferParams(ClassLossParams):
    pre_phases = (PrePhase("cluster_epochs", "cluster"),)  # §3: classify the k-means clusters, then fine-tune
    start_params = ("pretrained",)

    source: Literal["pretext", "hog"] = "pretext"
    pretrained: Path = Path("models/pretrain/jigsaw_pp.pt")  # source: pretext; any `ssl-ops pretrain` output
    # clusters; None: the data-size rule cluster_count (the paper's 2000 on ImageNet's 1.3M images is k=2000)
    k: int | None = Field(None, gt=1)
    images_per_cluster: float = Field(PAPER_IMAGES_PER_CLUSTER, gt=0)  # the rule's ratio (k: null only)
    kmeans_iters: int = Field(30, gt=0)
    kmeans_init: Literal["k-means++", "random"] = "k-means++"
    feature_block: int = -2  # source: pretext; backbone block clustered (Python index; §5: conv4, the one before last)
    feature_grid: int = Field(4, gt=0)  # its output max-pooled to grid x grid (§5: 5x5 AlexNet, 4x4 VGG16)
    hog_orientations: int = Field(9, gt=0)  # Dalal & Triggs' defaults, cells scaled to small images
    hog_cell: int = Field(4, gt=0)  # pixels per cell side (28 px -> 7 x 7 cells)
    hog_block: int = Field(2, gt=0)  # cells per block side (block-normalised with L2-Hys); one descriptor per block
    hog_words: int = Field(64, gt=1)  # visual words of the HOG bag of words (the paper gives no size: choose on val)
    cluster_epochs: int = Field(10, gt=0)  # step 3's own budget, epochs of steps_per_epoch; then `epochs` fine-tune
    cluster_lr: float | None = Field(None, gt=0)  # step 3's peak lr; None: the run's lr
    backbone: str | None = None  # target network; None: model.backbone
    width: float | None = Field(None, gt=0)  # None: model.width

    def train_params(self, base: TrainParams) -> TrainParams:
        """The engine runs both phases: ``cluster_epochs`` of cluster classification, then ``epochs`` of fine-tuning."""
        train = super().train_params(base)
        return train.model_copy(update={"epochs": self.cluster_epochs + train.epochs})

    @classmethod
    def starts_from(cls, logged):
        # CC+HOG (Table 3, source: hog) reads no checkpoint, though its `pretrained` default is logged too
        return "HOG" if logged("source") == "hog" else super().starts_from(logged)


def cluster_count(n_images: int, num_classes: int, images_per_cluster: float = PAPER_IMAGES_PER_CLUSTER) -> int:
    """k for a dataset of ``n_images``: the paper's images per cluster (1.3M / 2000 = 650, §5), and at least one
    cluster per class (§5.1: too few clusters "will not lead to discriminative features")."""
    return max(num_classes, round(n_images / images_per_cluster))


def hog_descriptors(images: np.ndarray, orientations: int, cell: int, block: int) -> np.ndarray:
    """HOG block descriptors (Dalal & Triggs 2005) of uint8 images (N, C, H, W) -> float32 (N, blocks, D) with
    D = block^2 * orientations, via scikit-image (one call per image: fine for a one-off pass over the train set);
    ``.reshape(N, -1)`` is the usual whole-image HOG vector."""
    from skimage.feature import hog

    channel_axis = -1 if images.shape[1] > 1 else None
    out = []
    for img in images:
        arr = np.moveaxis(img, 0, -1) if channel_axis is not None else img[0]
        h = hog(arr, orientations=orientations, pixels_per_cell=(cell, cell), cells_per_block=(block, block),
                block_norm="L2-Hys", feature_vector=False, channel_axis=channel_axis)
        out.append(h.reshape(-1, block * block * orientations))  # (block rows x block cols, D)
    return np.asarray(out, dtype=np.float32)


def bag_of_words(descriptors: Tensor, words: int, *, iters: int, seed: int,
                 sample: int = HOG_CODEBOOK_SAMPLE) -> Tensor:
    """Local descriptors (N, L, D) -> histograms of visual words (N, words), counts summing to L per image: the
    codebook is k-means on a seeded sample of ``sample`` descriptors, each descriptor counts for its nearest word
    (Noroozi et al. Table 3 caption: "we cluster bag of words of HOG")."""
    n, l, d = descriptors.shape
    flat = descriptors.reshape(n * l, d).float()
    pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:sample].to(flat.device)
    codebook = kmeans(flat[pick], words, iters=iters, seed=seed).centers
    word, _ = assign(flat, codebook)
    image = torch.arange(n, device=flat.device).repeat_interleave(l)
    return torch.zeros(n, words, device=flat.device).index_put_((image, word), torch.ones_like(word, dtype=torch.float),
                                                                 accumulate=True)


class PooledBlock(nn.Module):
    """An encoder's backbone block ``block`` (Python index), its output max-pooled to ``grid`` x ``grid`` cells and
    flattened: Noroozi et al. §5 cluster "conv4 ... max-pool[ed] to 5 x 5 x 384" (AlexNet) / "4 x 4 x 512" (VGG16)."""

    def __init__(self, encoder: Encoder, block: int, grid: int):
        super().__init__()
        n = len(encoder.backbone.blocks)
        if not -n <= block < n:
            raise ParamsError(f"cluster_transfer.feature_block={block}: the source backbone has {n} blocks; "
                              f"choose {-n}..{n - 1} (-2: the block before the last, as conv4 in the paper)")
        self.encoder, self.last, self.grid = encoder, block % n, grid

    def forward(self, x: Tensor) -> Tensor:
        x = self.encoder.normalize(x)
        for b in self.encoder.backbone.blocks[: self.last + 1]:
            x = b(x)
        return torch.flatten(F.adaptive_max_pool2d(x, self.grid), 1)


def cluster_purity(clusters: Tensor, labels: Tensor, k: int) -> float:
    """Share of images whose class is the majority class of their cluster (1 = every cluster is one class); images
    without a true label (-1: unlabeled-only images from data.unlabeled_dir) are left out."""
    known = labels >= 0
    clusters, labels = clusters[known], labels[known]
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
    backbone = build_backbone(ck["backbone_name"], ck["in_channels"], width=ck["width"],
                              image_size=ck.get("image_size"))
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
        self.k = params.k or cluster_count(ctx.store.n, ctx.num_classes, params.images_per_cluster)
        if self.k > ctx.store.n:
            raise ParamsError(f"cluster_transfer.k={self.k} exceeds the {ctx.store.n} train images; lower k")
        self.model = nn.ModuleDict({"net": net, "cluster_fc": nn.Linear(backbone.feature_dim, self.k),
                                    "clusters": ClusterLabels(ctx.store.n)}).to(ctx.device)
        self.optimizer = self.scheduler = None
        self._stats: dict[str, Tensor] = {}

    def classifier(self) -> nn.Module:
        return self.model["net"]

    @property
    def total_steps(self) -> int:
        return self.ctx.train.epochs * self.ctx.train.steps_per_epoch

    @property
    def switch_step(self) -> int:
        """First fine-tuning step: after ``cluster_epochs`` whole epochs (a checkpoint boundary)."""
        return self.params.cluster_epochs * self.ctx.train.steps_per_epoch

    def bind_optimizer(self, optimizer, scheduler) -> None:
        """Called by ``engine.fit``: each phase is a training run of its own, with the run's warm-up and schedule
        over its own length; the cluster phase's peak lr is ``cluster_lr`` (momentum restarts at the switch)."""
        self.optimizer, self.scheduler, s, train = optimizer, scheduler, self.switch_step, self.ctx.train
        scale = (self.params.cluster_lr or train.lr) / train.lr  # the optimiser's base lr is train.lr
        cluster, fine_tune = lr_lambda(train, s), lr_lambda(train, self.total_steps - s)

        def f(step: int) -> float:
            return scale * cluster(step) if step < s else fine_tune(step - s)

        scheduler.lr_lambdas = [f] * len(optimizer.param_groups)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * f(scheduler.last_epoch)

    # -- steps 1-2: features and k-means --------------------------------------------------------------------

    def source_features(self) -> Tensor:
        ctx, p = self.ctx, self.params
        if p.source == "hog":
            desc = hog_descriptors(ctx.store.x.cpu().numpy(), p.hog_orientations, p.hog_cell, p.hog_block)
            f = bag_of_words(torch.from_numpy(desc).to(ctx.device), p.hog_words, iters=p.kmeans_iters,
                             seed=ctx.train.seed)
        else:
            source = PooledBlock(load_source(p.pretrained, ctx), p.feature_block, p.feature_grid)
            f, _ = extract_features(source, ctx.store, np.arange(ctx.store.n), ctx.train.eval_batch_size)
        return F.normalize(f.float(), dim=1)

    @torch.no_grad()
    def make_clusters(self) -> None:
        ctx, p = self.ctx, self.params
        res = kmeans(self.source_features(), self.k, iters=p.kmeans_iters, seed=ctx.train.seed, init=p.kmeans_init)
        buf = self.model["clusters"]
        buf.labels.copy_(res.labels)
        buf.done.fill_(True)

    def purity(self) -> dict[str, float]:
        ctx, lab = self.ctx, self.model["clusters"].labels
        seen = torch.as_tensor(np.concatenate([ctx.split.labeled, ctx.split.val]), device=ctx.device).long()
        return {"purity_labeled_val": cluster_purity(lab[seen], ctx.store.y[seen], self.k),
                "purity_train_analysis": cluster_purity(lab, ctx.store.y, self.k)}

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
            return {"loss": F.cross_entropy(logits, y), "cluster_top1": (logits.argmax(1) == y).float().mean(),
                    "fine_tuning": torch.tensor(0.0), **self._stats}
        if step == self.switch_step and self.optimizer is not None:
            self.optimizer.state.clear()  # step 4 is a new training run: fresh momentum
        x, y = ctx.labeled_batch(ctx.train.batch_size)  # step 4: fine-tune on the labels
        # label_smoothing smooths this class loss only: the cluster phase's targets are k-means clusters, not classes
        loss = F.cross_entropy(net(x), y, label_smoothing=self.params.label_smoothing)
        return {"loss": loss, "fine_tuning": torch.tensor(1.0), **self._stats}
