"""PAWS-NN distilled into a classifier on the unlabeled images: PAWS pre-training (Assran et al. 2021) as the
teacher, SimCLRv2's third step (Chen et al. 2020b, §3, "self-training / knowledge distillation via unlabeled
examples") as the way to use it.

Why: on few labels PAWS-NN, the soft nearest-neighbour classifier of the pre-trained representation against
the labeled images (PAWS §5, eq. (1)), beats fine-tuning that representation on the same labels (here: PAWS-NN
~74.5 % against ~72-73 % for ``paws_finetune`` on Fashion-MNIST with 10 labels per class). SimCLRv2 §3 shows
that a network trained to match a teacher's predictions on the *unlabeled* images improves on the teacher;
PAWS §6 leaves "distilling ... models pre-trained with PAWS for future work". This method is that step.

1. Teacher phase (first training step; its result is checkpointed, so a resumed run or ``ssl-ops evaluate``
   never redoes it): PAWS-NN class probabilities ``p = softmax(z . z_S^T / tau) y_S`` (PAWS eq. (1),
   one-hot labels, the checkpoint's tau and representation layer ``paws.nn_layer``) of every unlabeled image,
   un-augmented, against all labeled images of the split, then sharpened, ``rho(p)_k ∝ p_k^(1/T)`` (PAWS §3
   with T = ``sharpen``; 1 keeps p as it is).
2. Student: the PAWS backbone, the first ``finetune_from`` projection-head layers and a zero-initialised
   linear classifier, as PAWS §5 fine-tunes (``paws_finetune``). Each step draws a labeled and an unlabeled
   batch (crop + flip) and minimises ``CE(y, p_S(x_l)) + w * H(rho(p_T(u)), p_S(u))``: SimCLRv2 eq. (3) with
   ``w = alpha / (1 - alpha)`` (up to the learning rate) and the teacher's temperature applied to its
   probabilities only (eq. (2) puts tau on both; here the student is read at tau = 1 at test time, so its
   target carries the sharpening, as PAWS's own targets do).

The PAWS checkpoint must come from the same split: its support batches were drawn from that split's labels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import probes
from ssl_ops.errors import SslOpsError
from ssl_ops.heads import Encoder, Normalize, PawsEmbedding, ProjectionHead
from ssl_ops.losses import sharpen, soft_cross_entropy
from ssl_ops.methods._joint import JointMethod, JointParams
from ssl_ops.methods.base import prepared_backbone, register_method
from ssl_ops.methods.paws_finetune import load_paws, paws_classifier


class PawsDistillParams(JointParams):
    start_params = ("pretrained",)
    network_from = "pretrained"
    pretrained: Path = Path("models/pretrain/paws.pt")  # written by `ssl-ops pretrain paws` on this split
    finetune_from: int = Field(1, ge=0)  # projection-head layers kept in the student (PAWS §5: the first)
    sharpen: float = Field(0.25, gt=0, le=1)  # T of the teacher's targets (PAWS §3 / appendix C: 0.25); 1: none
    weight_decay: float | None = Field(0.0, ge=0)  # as PAWS fine-tuning (appendix A: none)


class TeacherTargets(nn.Module):
    """Buffers: the sharpened PAWS-NN probabilities of each unlabeled pool position, and whether computed."""

    def __init__(self, n: int, num_classes: int):
        super().__init__()
        self.register_buffer("probs", torch.zeros(n, num_classes))
        self.register_buffer("done", torch.zeros((), dtype=torch.bool))


def paws_embedding(ck: dict, ctx) -> tuple[PawsEmbedding, float]:
    """The PAWS-NN representation of a PAWS checkpoint (encoder, then its projection head up to
    ``paws.nn_layer``) in eval mode on ``ctx``'s device, and the checkpoint's SNN temperature tau."""
    pp = ck["params"]["paws"]
    encoder = Encoder(Normalize(ctx.data.mean, ctx.data.std), ctx.build_backbone())
    encoder.backbone.load_state_dict(ck["backbone"])
    projection = ProjectionHead(encoder.feature_dim, pp["proj_dim"], pp["head_layers"], out_bn=False)
    prefix = "projection."
    projection.load_state_dict({k.removeprefix(prefix): v for k, v in ck["head"].items() if k.startswith(prefix)})
    return PawsEmbedding(encoder, projection, pp.get("nn_layer")).to(ctx.device).eval(), pp["temperature"]


@register_method("paws_distill")
class PawsDistill(JointMethod):
    Params = PawsDistillParams
    pretext = "paws"  # the pre-training it starts from (tests pre-train it first)

    def __init__(self, ctx, params: PawsDistillParams):
        super().__init__(ctx, params)
        if not ctx.store.in_memory:
            raise SslOpsError("paws_distill looks up the teacher's targets by image: it needs the train images in "
                              "memory; raise data.max_in_memory_gb")
        self._ck = load_paws(params.pretrained, ctx, owner="paws_distill")
        self.model = nn.ModuleDict({
            "net": paws_classifier(self._ck, ctx, params.finetune_from, owner="paws_distill"),
            "teacher": TeacherTargets(len(ctx.split.unlabeled), ctx.num_classes)}).to(ctx.device)
        prepared_backbone(self.model["net"].backbone, params, self.name)  # freeze_blocks (init is refused)
        self._unlabeled = torch.as_tensor(ctx.split.unlabeled, device=ctx.device)
        self._stats: dict[str, Tensor] | None = None

    def classifier(self) -> nn.Module:
        return self.model["net"]

    @torch.no_grad()
    def teacher_probs(self) -> Tensor:
        """PAWS-NN probabilities (eq. (1)) of the unlabeled pool against every labeled image, un-augmented."""
        ctx = self.ctx
        embed, tau = paws_embedding(self._ck, ctx)
        return probes.paws_nn_probs(embed, ctx.store, ctx.split.labeled, ctx.store, ctx.split.unlabeled, tau,
                                    ctx.train.eval_batch_size, num_classes=ctx.num_classes)[0]

    def teacher_stats(self) -> dict[str, float]:
        """Mean confidence of the targets and (for analysis only) how often their argmax is the true class."""
        probs = self.model["teacher"].probs
        true = self.ctx.store.y[self._unlabeled]
        known = true >= 0  # unlabeled-only images (data.unlabeled_dir) have no true label (-1)
        acc = (probs[known].argmax(1) == true[known]).float().mean().item() if known.any() else float("nan")
        return {"target_confidence": probs.max(1).values.mean().item(), "pseudo_label_accuracy": acc}

    def training_step(self, step: int) -> dict[str, Tensor]:
        ctx, buf = self.ctx, self.model["teacher"]
        if not bool(buf.done):
            buf.probs.copy_(sharpen(self.teacher_probs(), self.params.sharpen))
            buf.done.fill_(True)
        if self._stats is None:
            self._stats = {k: torch.tensor(v) for k, v in self.teacher_stats().items()}
        x, y = ctx.labeled_batch(ctx.train.batch_size)
        pos = torch.randint(0, len(self._unlabeled), (self.unlabeled_batch_size,), generator=ctx.generator,
                            device=ctx.device)
        u = ctx.augment(ctx.store.x[self._unlabeled[pos]])
        logits = self.model["net"](torch.cat([x, u]))
        sup = F.cross_entropy(logits[: len(x)], y, label_smoothing=self.params.label_smoothing)
        distil = soft_cross_entropy(buf.probs[pos], logits[len(x):].float())
        return {"loss": sup + self.unlabeled_weight(step) * distil, "loss_sup": sup, "loss_distill": distil,
                **self._stats}
