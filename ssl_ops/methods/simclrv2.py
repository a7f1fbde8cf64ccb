"""SimCLRv2 fine-tuning and distillation (Chen et al. 2020b, §2 and §3) from ``ssl-ops pretrain simclr``.

Fine-tuning (§2; §3 "For fine-tuning"): the network is the pre-trained backbone plus the first
``finetune_from`` layers of the pre-trained projection head (1 by default: "fine-tuning from the middle layer"
helps most with few labels; 0 = from the head's input, the usual linear head on the backbone) and a new
linear classifier, trained with cross-entropy on the labeled split with crop + flip only
(``RunContext.labeled_batch``). §3: "We use the LARS optimizer (with a momentum of 0.9) throughout for
pretraining, fine-tuning and distillation"; fine-tuning removes weight decay and warm-up and uses
0.005 x sqrt(batch size) (``finetune_optimizer``, ``finetune_lr_scale``; ``finetune_lr`` overrides).

Distillation (§3, ``distill: true``): the fine-tuned network is a fixed teacher; a student is trained on
unlabeled images (and labeled ones with ``distill_labeled``) with eq. (2), the cross-entropy between the
teacher's and the student's softmax at temperature tau, or with eq. (3) when ``alpha < 1``:
``(1 - alpha) * CE(labels) + alpha * eq. (2)``. Self-distillation: the student has the same backbone and no
projection head, initialised from the pre-trained backbone (``student_init``); big-to-small: a smaller
``student_backbone`` / ``student_width`` from the registry, from scratch. tau defaults to 0.1 for
self-distillation and 1.0 for big-to-small (§3 "For distillation"). The student trains with "the same learning
rate schedule, weight decay, batch size as pretraining" (§3) under LARS: peak lr 0.1 x sqrt(batch), 5% linear
warm-up, cosine decay, weight decay 1e-4 (``distill_*``). This is also what makes tau harmless: eq. (2)'s
gradient is (p_S - p_T) / tau, and LARS's trust ratio divides each weight tensor's step by its gradient norm,
so a step does not grow as 1/tau (with SGD at the shared lr, tau = 0.1 took 10x a cross-entropy step). For the
student the trust ratio covers every tensor (``distill_trust_all``): the reference code's plain steps for
biases, norm scales and the new classifier would still grow as 1/tau, and at 0.1 x sqrt(B) they diverged.
Fine-tuning keeps those exclusions (the new classifier learns by plain momentum steps, as in the reference).

As in ``pseudo_label``, the teacher phase runs in the first training step (``teacher_epochs`` x
``steps_per_epoch`` fine-tuning steps with its own RNG stream) unless ``teacher`` names a fine-tuned
``models/simclrv2.pt`` of the same split; its weights are then checkpointed with the student, so a resumed
run or ``ssl-ops evaluate`` never redoes it. The evaluated and exported network is the student.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from ssl_ops import io
from ssl_ops.backbones import build_backbone
from ssl_ops.errors import CheckpointError, DataIntegrityError, ParamsError
from ssl_ops.heads import Classifier, Normalize
from ssl_ops.losses import distillation_with_labels
from ssl_ops.methods._inner_loop import fit_on_labels
from ssl_ops.methods.base import ClassLossParams, Method, PrePhase, prepared_backbone, register_method
from ssl_ops.sections import TrainParams

# tau when simclrv2.temperature is null (SimCLRv2 §3: 0.1 self-distillation, 1.0 large-to-small)
SELF_DISTILLATION_TAU, BIG_TO_SMALL_TAU = 0.1, 1.0


class Simclrv2Params(ClassLossParams):
    # label_smoothing (ClassLossParams) smooths the fine-tuning's cross-entropy (the teacher phase, or the evaluated
    # network without ``distill``); not in the paper, a key searched on val as for the other methods. Eq. (3)'s label
    # term keeps the paper's hard targets, and eq. (2) has none.
    pre_phases = (PrePhase("teacher_epochs", "teacher", skip_if_set="teacher"),)  # §3: fine-tune, then distil
    start_params = ("pretrained",)
    network_from = "pretrained"
    pretrained: Path = Path("models/pretrain/simclr.pt")  # written by `ssl-ops pretrain simclr`
    finetune_from: int = Field(1, ge=0)  # projection-head layers kept (SimCLRv2 §2: 1 for few labels); 0: none
    # fine-tuning (§3 "Fine-tuning" paragraph; "LARS (momentum 0.9) throughout" for all three phases)
    finetune_optimizer: Literal["sgd", "lars"] = "lars"
    finetune_lr: float | None = Field(None, gt=0)  # None: finetune_lr_scale * sqrt(batch size)
    finetune_lr_scale: float = Field(0.005, gt=0)  # SimCLRv2 §3: 0.16 = 0.005 x sqrt(batch) for standard ResNets
    weight_decay: float = Field(0.0, ge=0)  # fine-tuning: none (§3)
    warmup_epochs: float = Field(0.0, ge=0)  # fine-tuning: none (§3)
    distill: bool = False  # False: fine-tune only (the evaluated model); True: then distil into a student
    teacher: Path | None = None  # a fine-tuned models/simclrv2.pt (same split); None: fine-tune it here first
    teacher_epochs: int = Field(20, gt=0)  # fine-tuning phase of the teacher, epochs of steps_per_epoch steps
    temperature: float | None = Field(None, gt=0)  # tau; None: 0.1 self-distillation, 1.0 big-to-small
    alpha: float = Field(1.0, ge=0, le=1)  # eq. (3) weight of the distillation term; 1: eq. (2) only
    distill_labeled: bool = False  # distil on labeled images too (§3 "optionally")
    unlabeled_batch_size: int | None = Field(None, gt=0)  # None: batch_size
    # distillation (§3: "the same learning rate schedule, weight decay, batch size as pretraining", LARS): the
    # pre-training rule of ssl_ops.pretexts.simclr, peak lr = distill_lr_scale x sqrt(distillation batch), linear
    # warm-up over distill_warmup_fraction of the run, then cosine; the batch stays this run's (the budget)
    distill_optimizer: Literal["sgd", "lars"] = "lars"
    distill_lr: float | None = Field(None, gt=0)  # None: distill_lr_scale * sqrt(unlabeled batch)
    distill_lr_scale: float = Field(0.1, gt=0)  # pre-training's 0.1 x sqrt(batch) (6.4 at 4096)
    distill_weight_decay: float = Field(1e-4, ge=0)  # pre-training's 1e-4
    distill_warmup_fraction: float = Field(0.05, ge=0, le=1)  # pre-training's first 5% of epochs
    # LARS trust ratio on every student tensor (biases, norm scales, the classifier too): no step then grows as
    # eq. (2)'s 1/tau. False: the reference code's exclusions, whose plain steps at 0.1 x sqrt(B) diverged at
    # tau = 0.1 (val 10% vs 66%, Fashion-MNIST seed 0; a one-off script, removed:
    # `git show 2b5e41e:benchmarks/simclrv2_distill_trust.py`); the paper says only "LARS".
    distill_trust_all: bool = True
    student_backbone: str | None = None  # None: the teacher's (self-distillation); else big-to-small
    student_width: float | None = Field(None, gt=0)  # None: model.width
    student_init: bool = True  # self-distillation: start the student from the pre-trained backbone

    lr: None = None  # two phases, two rules: finetune_lr / distill_lr (an lr here is an error saying so)

    @field_validator("lr", mode="before")
    @classmethod
    def _no_shared_lr(cls, v):
        if v is not None:
            raise ValueError("simclrv2.lr is not used: set simclrv2.finetune_lr (fine-tuning and the teacher) or "
                             "simclrv2.distill_lr (the student), or leave both null for the paper's rules")
        return v

    def train_params(self, base: TrainParams) -> TrainParams:
        """What the engine trains: the fine-tuned network, or with ``distill`` the student."""
        train = super().train_params(base)
        if not self.distill:
            return self.fine_tune_params(train)
        batch = self.unlabeled_batch_size or train.batch_size
        return train.model_copy(update={
            "optimizer": self.distill_optimizer, "lr": self.distill_lr or self.distill_lr_scale * math.sqrt(batch),
            "weight_decay": self.distill_weight_decay, "schedule": "cosine",
            "warmup_epochs": self.distill_warmup_fraction * train.epochs})

    def fine_tune_params(self, train: TrainParams) -> TrainParams:
        """§3 fine-tuning: LARS at 0.005 x sqrt(batch), no weight decay, no warm-up (the teacher phase too)."""
        return train.model_copy(update={"optimizer": self.finetune_optimizer, "weight_decay": self.weight_decay,
                                        "lr": self.finetune_lr or self.finetune_lr_scale * math.sqrt(train.batch_size),
                                        "warmup_epochs": self.warmup_epochs})


def trust_every_tensor(optimizer) -> None:
    """LARS with the trust ratio on every tensor: each step is lr x eta x ||w|| in the direction of g + wd w,
    whatever the gradient's scale (eq. (2)'s 1/tau included); a no-op for SGD. Zero-norm tensors (fresh
    zero biases) fall back to a plain step until they are not zero (ssl_ops.lars)."""
    for group in optimizer.param_groups:
        if "lars_exclude" in group:
            group["lars_exclude"] = False
            for p in group["params"]:
                p.lars_exclude = False


def load_simclr(path: Path, ctx) -> dict[str, Any]:
    """The ``ssl-ops pretrain simclr`` checkpoint, checked to fit this run; a clear error otherwise."""
    if not Path(path).exists():
        raise CheckpointError(f"simclrv2.pretrained {path} does not exist; run `ssl-ops pretrain simclr` first "
                              "(it writes models/pretrain/simclr.pt) or point simclrv2.pretrained at its output")
    ck = io.torch_load(path)  # CheckpointError when unreadable
    if not isinstance(ck, dict) or ck.get("pretext") != "simclr" or "head" not in ck:
        found = ck.get("pretext") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"simclrv2.pretrained {path} is not a SimCLR pre-training checkpoint with its projection "
                              f"head (pretext {found!r}); run `ssl-ops pretrain simclr` to write "
                              "models/pretrain/simclr.pt")
    m = ctx.params.model
    diff = {k: (ck.get(k), v) for k, v in {"backbone_name": m.backbone, "width": m.width,
                                          "dataset_sha256": ctx.data.sha256}.items() if ck.get(k) != v}
    if diff:
        raise CheckpointError(f"simclrv2.pretrained {path} does not fit this run: " + ", ".join(
            f"{k} is {a!r} there but {b!r} here" for k, (a, b) in diff.items()) + "; pre-train with the same "
            "model/data params or change them here")
    return ck


def fine_tune_network(ck: dict[str, Any], ctx, keep: int) -> Classifier:
    """Pre-trained backbone + first ``keep`` pre-trained head layers + a new linear layer, on the device."""
    sp = ck["params"]["simclr"]
    if keep > sp["head_layers"]:
        raise ParamsError(f"finetune_from={keep} but the SimCLR head has {sp['head_layers']} layers; "
                          f"use 0..{sp['head_layers']}")
    neck = {"layers": sp["head_layers"], "out_dim": sp["proj_dim"], "keep": keep}
    net = Classifier(Normalize(ctx.data.mean, ctx.data.std), ctx.build_backbone(), ctx.num_classes, neck_spec=neck)
    net.backbone.load_state_dict(ck["backbone"])
    if net.neck is not None:  # head state keys "layers.<i>.<j>.*"; the neck's are "<i>.<j>.*"
        head = {k.removeprefix("layers."): v for k, v in ck["head"].items() if int(k.split(".")[1]) < keep}
        net.neck.load_state_dict(head)
    return new_classifier_layer(net).to(ctx.device)


def new_classifier_layer(net: Classifier) -> Classifier:
    """Mark the new linear layer out of LARS's trust ratio and weight decay, as the SimCLR reference code's
    LARS excludes "head_supervised" (ssl_ops.lars): a trust ratio of 0.001 x its fresh norm would freeze it."""
    for p in net.fc.parameters():
        p.lars_exclude = True
    return net


@register_method("simclrv2")
class Simclrv2(Method):
    Params = Simclrv2Params
    pretext = "simclr"  # the pre-training it starts from (tests pre-train it first)
    params: Simclrv2Params

    def __init__(self, ctx, params: Simclrv2Params):
        super().__init__(ctx, params)
        self.ck = load_simclr(params.pretrained, ctx)
        net = fine_tune_network(self.ck, ctx, params.finetune_from)
        prepared_backbone(net.backbone, params, self.name)  # freeze_blocks (init is refused: `pretrained` is read)
        if not params.distill:
            self.model = net
            return
        student = self._student()
        self.model = nn.ModuleDict({"teacher": net.requires_grad_(False), "student": student}).to(ctx.device)
        self.model.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool, device=ctx.device))

    def bind_optimizer(self, optimizer, scheduler) -> None:
        """The engine's optimiser trains the student (``distill``): with ``distill_trust_all``, LARS adapts every
        tensor."""
        if self.params.distill and self.params.distill_trust_all:
            trust_every_tensor(optimizer)

    def _student(self) -> Classifier:
        p, ctx, m = self.params, self.ctx, self.ctx.params.model
        name, width = p.student_backbone or m.backbone, p.student_width or m.width
        backbone = build_backbone(name, ctx.data.image_shape[0], width=width, image_size=ctx.data.image_shape[-1])
        if p.student_init and (name, width) == (m.backbone, m.width):
            backbone.load_state_dict(self.ck["backbone"])
            prepared_backbone(backbone, p, self.name)  # a student from the pre-trained backbone keeps its frozen blocks
        student = Classifier(Normalize(ctx.data.mean, ctx.data.std), backbone, ctx.num_classes)
        student.spec_backbone = (name, width)  # what the exported model's spec must name
        return student if p.distill_trust_all else new_classifier_layer(student)

    @property
    def self_distillation(self) -> bool:
        m = self.ctx.params.model
        return ((self.params.student_backbone or m.backbone, self.params.student_width or m.width)
                == (m.backbone, m.width))

    @property
    def temperature(self) -> float:
        return self.params.temperature or (SELF_DISTILLATION_TAU if self.self_distillation else BIG_TO_SMALL_TAU)

    @property
    def images_per_step(self) -> int:
        return self.ctx.train.batch_size + (self.params.unlabeled_batch_size or self.ctx.train.batch_size
                                            if self.params.distill else 0)

    def classifier(self) -> nn.Module:
        return self.model["student"] if self.params.distill else self.model

    # -- teacher ------------------------------------------------------------------------------------------

    def _load_teacher(self, path: Path) -> None:
        ck = io.torch_load(path, map_location=self.ctx.device)
        if ck.get("split_sha256") != self.ctx.split.sha256 or ck.get("dataset_sha256") != self.ctx.data.sha256:
            raise DataIntegrityError(f"simclrv2.teacher {path} was trained on another split or dataset; "
                                     "fine-tune it on this split (ssl-ops train simclrv2) "
                                     "or set simclrv2.teacher: null")
        try:
            self.model["teacher"].load_state_dict(ck["state_dict"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"simclrv2.teacher {path} is not a fine-tuned simclrv2 network with finetune_from="
                                  f"{self.params.finetune_from}: {str(exc).splitlines()[0][:300]}") from None

    def fine_tune(self, net: nn.Module, steps: int, seed: int) -> None:
        """Fine-tuning as in §2 (the teacher phase): CE on labeled crop + flip batches, own RNG stream."""
        net.requires_grad_(True)
        net.backbone.freeze(net.backbone.frozen_blocks)  # requires_grad_(True) would train the frozen blocks too
        fit_on_labels(net, self.ctx, self.params.fine_tune_params(self.ctx.train), steps, seed,
                      label_smoothing=self.params.label_smoothing)
        net.requires_grad_(False)

    def _ensure_teacher(self) -> None:
        if bool(self.model.teacher_ready):
            return
        if self.params.teacher is not None:
            self._load_teacher(self.params.teacher)
        else:
            with torch.enable_grad():
                self.fine_tune(self.model["teacher"], self.params.teacher_epochs * self.ctx.train.steps_per_epoch,
                               self.ctx.train.seed + 1)
        self.model.teacher_ready.fill_(True)

    # -- training -----------------------------------------------------------------------------------------

    def training_step(self, step: int) -> dict[str, Tensor]:
        ctx, p = self.ctx, self.params
        x, y = ctx.labeled_batch(ctx.train.batch_size)  # crop + flip only
        if not p.distill:
            return {"loss": F.cross_entropy(self.model(x), y, label_smoothing=p.label_smoothing)}
        self._ensure_teacher()
        u = ctx.augment(ctx.unlabeled_batch(p.unlabeled_batch_size or ctx.train.batch_size))
        if p.distill_labeled:
            u = torch.cat([u, x])
        teacher = self.model["teacher"].eval()
        with torch.no_grad():
            t_logits = teacher(u)
        student = self.model["student"]
        if p.alpha < 1.0:
            logits = student(torch.cat([u, x]))
            s_logits, l_logits = logits[: len(u)], logits[len(u):]
        else:
            s_logits, l_logits = student(u), None
        loss = distillation_with_labels(s_logits, t_logits, self.temperature, p.alpha, l_logits, y)
        agree = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
        return {"loss": loss, "teacher_agreement": agree}
