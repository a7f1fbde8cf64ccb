"""The contract of a pretext: a :class:`~ssl_ops.methods.base.Method` without labels.

A pretext builds ``self.model`` = :class:`PretextNet` (encoder = normalise + backbone, plus its pretext
head and any extra state such as an EMA encoder), draws raw images from the whole train set with
``ctx.image_batch`` and returns ``{"loss": ..., ...}`` from ``training_step``, so ``ssl_ops.engine.fit``
trains it unchanged. Instead of a val accuracy each epoch, ``epoch_metrics`` reports a k-NN accuracy of
the val split against the labeled split on backbone features (a monitor only: no labels reach training).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from ssl_ops import probes
from ssl_ops.engine import RunContext
from ssl_ops.heads import Encoder, Normalize
from ssl_ops.methods.base import Method, MethodParams, prepared_backbone
from ssl_ops.plugins import registrar

PRETEXTS: dict[str, type[Pretext]] = {}


register_pretext = registrar(PRETEXTS, "pretext", set_name=True)  # @register_pretext("rotation")


class PretextParams(MethodParams):
    """Shared by every pretext: the method overrides of the train section, plus optimiser choice and warm-up
    (null = the train section's value) and the k-NN monitor's settings."""

    optimizer: Literal["sgd", "lars"] | None = None
    warmup_epochs: float | None = Field(None, ge=0)
    knn_k: int = Field(20, gt=0)  # neighbours voting in the k-NN monitor (Wu et al. 2018 use 200 on ImageNet)
    knn_temperature: float = Field(0.07, gt=0)  # vote weight exp(cos / T), Wu et al. 2018 §3.4


class PretextNet(nn.Module):
    """Everything a pretext trains and checkpoints: ``encoder`` (normalise + backbone) and ``head``."""

    def __init__(self, encoder: Encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone


class Pretext(Method):
    """Base: subclasses set ``Params``, call ``self.build(head)`` in ``__init__``, implement ``training_step``."""

    Params: ClassVar[type[PretextParams]] = PretextParams
    # the per-epoch val monitor that ``ssl-ops tune <pretext>`` maximises (``epoch_metrics`` must return it)
    val_metric: ClassVar[str] = "knn_val_top1"

    def __init__(self, ctx: RunContext, params: PretextParams):
        super().__init__(ctx, params)
        # `init` and `freeze_blocks` as for a method: a pretext may continue another's backbone (e.g. PAWS from
        # SimCLR's, the same network)
        self.encoder = Encoder(Normalize(ctx.data.mean, ctx.data.std), prepared_backbone(ctx.build_backbone(), params,
                                                                                          self.name))

    def build(self, head: nn.Module) -> PretextNet:
        self.model = PretextNet(self.encoder, head).to(self.ctx.device)
        return self.model

    def classifier(self) -> nn.Module:
        raise TypeError(f"pretext {self.name!r} has no classifier; probe its encoder (ssl_ops.stages.pretrain)")

    def epoch_metrics(self) -> dict[str, float]:
        """k-NN top-1 of the val split against the labeled split (cosine, backbone features)."""
        ctx = self.ctx
        if not len(ctx.split.val):
            return {}
        bs = ctx.train.eval_batch_size
        ref_f, ref_y = probes.extract_features(self.encoder, ctx.store, ctx.split.labeled, bs)
        val_f, val_y = probes.extract_features(self.encoder, ctx.store, ctx.split.val, bs)
        return {"knn_val_top1": probes.knn_top1(ref_f, ref_y, val_f, val_y, self.params.knn_k,
                                                self.params.knn_temperature)}

    def training_step(self, step: int) -> dict[str, Tensor]:
        raise NotImplementedError
