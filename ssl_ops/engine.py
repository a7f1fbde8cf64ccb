"""The one training loop every method runs in.

``fit`` owns the device, mixed precision, the optimiser and schedule, per-epoch checkpoints (atomic, with
all RNG states so that a resumed run equals an uninterrupted one), the NaN/Inf guard, the progress bar and
metric logging. A method only supplies ``training_step`` (see ``ssl_ops.methods.base``).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssl_ops import augment, distributed, faults, io
from ssl_ops.backbones import build_backbone, set_memory_format
from ssl_ops.data.prepare import PreparedDataset
from ssl_ops.data.splits import Split
from ssl_ops.data.store import ImageStore
from ssl_ops.errors import CheckpointError, SslOpsError, TrainingDivergedError
from ssl_ops.heads import Classifier, Normalize
from ssl_ops.lars import LARS
from ssl_ops.progress import TrainProgress
from ssl_ops.sections import BaseParams, TrainParams


def select_device(choice: str = "auto") -> torch.device:
    """CUDA, else Apple MPS, else CPU; a forced choice that is unavailable is an error, not a silent fallback."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if choice == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[choice]:
        raise SslOpsError(f"train.device={choice} but no {choice} device is available; use train.device=auto or cpu")
    return torch.device(choice)


@dataclass
class RunContext:
    """Everything a method needs: params, device, data on the device, the split and a seeded generator."""

    params: BaseParams
    train: TrainParams  # the shared train section with the method's overrides applied
    device: torch.device
    data: PreparedDataset
    split: Split
    store: ImageStore  # train images then unlabeled-only ones (labeled, val and unlabeled are index pools into it)
    generator: torch.Generator  # every random draw of data and augmentation goes through it (checkpointed)
    pools: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def augment(self, x: Tensor) -> Tensor:
        """Standard training augmentation of a uint8 batch -> float in [0, 1]."""
        x = augment.weak_augment(x, self.generator, self.train.crop_padding, self.train.hflip)
        return augment.to_float(x)

    def labeled_batch(self, batch_size: int, augmented: bool = True) -> tuple[Tensor, Tensor]:
        x, y = self.store.sample(self.pools["labeled"], batch_size, self.generator)
        return (self.augment(x) if augmented else augment.to_float(x)), y

    def image_batch(self, batch_size: int) -> Tensor:
        """Raw uint8 images from the whole train set and the unlabeled-only images (labeled, val and unlabeled
        alike, labels unused): what self-supervised pre-training draws from."""
        if "all" not in self.pools:
            self.pools["all"] = distributed.shard(torch.arange(self.store.n, device=self.device))
        return self.store.sample(self.pools["all"], batch_size, self.generator)[0]

    def unlabeled_batch(self, batch_size: int) -> Tensor:
        """Raw uint8 unlabeled images: methods build their own views from them."""
        return self.store.sample(self.pools["unlabeled"], batch_size, self.generator)[0]

    def test_store(self) -> ImageStore:
        """The test images (reported, never used for model selection)."""
        d = self.params.data
        return ImageStore(self.data.test_x, self.data.test_y, self.device, d.max_in_memory_gb * 1e9,
                          workers=d.loader_workers)

    def build_backbone(self) -> nn.Module:
        m = self.params.model
        return build_backbone(m.backbone, self.data.image_shape[0], width=m.width, freeze_blocks=m.freeze_blocks,
                              image_size=self.data.image_shape[-1])

    def build_classifier(self) -> Classifier:
        return Classifier(Normalize(self.data.mean, self.data.std), self.build_backbone(), self.num_classes).to(
            self.device
        )


def make_context(params: BaseParams, train: TrainParams, data: PreparedDataset, split: Split,
                 device: torch.device | None = None) -> RunContext:
    device = distributed.init() or device or select_device(train.device)  # torchrun: this rank's device
    torch.manual_seed(train.seed)  # model initialisation (identical on every rank; fit broadcasts rank 0's)
    # unlabeled-only images (data.unlabeled_dir, STL-10's unlabeled split) sit after the train set: the split's
    # unlabeled pool indexes them there (ssl_ops/data/splits.py)
    store = ImageStore(data.train_x, data.train_y, device, max_bytes=params.data.max_in_memory_gb * 1e9,
                       workers=params.data.loader_workers, extra=data.unlabeled_x)
    # a different augmentation / sampling stream per rank, drawing from its own shard of each pool
    generator = torch.Generator(device=device).manual_seed(train.seed + distributed.rank())
    pools = {k: torch.as_tensor(getattr(split, k), device=device) for k in ("labeled", "val", "unlabeled")}
    pools.update({k: distributed.shard(pools[k]) for k in ("labeled", "unlabeled")})
    return RunContext(params, train, device, data, split, store, generator, pools)


# ---------------------------------------------------------------------------------------------------------
# optimisation


def lr_lambda(train: TrainParams, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up then cosine / step / constant; a multiplier of the peak lr per optimiser step."""
    warmup = int(train.warmup_epochs * train.steps_per_epoch)
    milestones = [int(m * total_steps) for m in train.milestones]

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if train.schedule == "step":
            return train.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return f


def make_optimizer(model: nn.Module, train: TrainParams, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # no weight decay on biases and norm scales (1-D tensors), as in the papers' reference code
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "lars":
        # SimCLR reference code: biases and norm scales get neither weight decay nor the trust ratio
        groups[1]["lars_exclude"] = True
        opt = LARS(groups, lr=train.lr, momentum=train.momentum)
    else:
        opt = torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,
                              nesterov=train.nesterov and train.momentum > 0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, total_steps))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); elsewhere it emulates it, slowly."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def machine() -> str:
    """What a run ran on, e.g. "AMD EPYC, 2 CPUs, AVX2, bf16 emulated": the CPU's model, its count, the widest
    vector ISA torch's kernels use there, whether oneDNN runs bf16 natively, and the GPU if there is one. CPU time
    and a run's float rounding depend on it (README "Machines differ"), so every training and pre-training run is
    tagged with it and a report whose rows ran on several machines says which ran where (``ssl_ops.results``)."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:  # not Linux
        pass
    parts = [model or platform.processor() or platform.machine() or "unknown CPU", f"{os.cpu_count()} CPUs",
             torch.backends.cpu.get_cpu_capability(), "bf16 native" if cpu_has_native_bf16() else "bf16 emulated"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return ", ".join(parts)


def use_amp(train: TrainParams, device: torch.device) -> bool:
    """Whether ``device`` runs in mixed precision: ``train.amp`` on CUDA, ``train.amp_cpu`` on the CPU (``"auto"``:
    only where the CPU has native bf16)."""
    if device.type == "cuda":
        return train.amp
    if device.type != "cpu":
        return False
    return cpu_has_native_bf16() if train.amp_cpu == "auto" else train.amp_cpu


def autocast(device: torch.device, enabled: bool):
    """Mixed precision: on CUDA bf16 where supported, else fp16 with a GradScaler; on the CPU bf16 (oneDNN runs
    convolutions and matmuls in bf16 where the CPU has native bf16, e.g. AVX512-BF16 or AMX, and emulates it,
    slower, where it has not: ``check_amp_cpu``); a no-op elsewhere or when not ``enabled``."""
    if not enabled or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def check_amp_cpu(train: TrainParams, device: torch.device) -> None:
    """``train.amp_cpu=true`` on a CPU without native bf16 is emulated and many times slower than fp32 (8-10x
    there: reports/benchmarks_amp_cpu_avx2.md): say so, once per run. ``"auto"`` says it runs fp32."""
    if device.type != "cpu" or train.amp_cpu is False or cpu_has_native_bf16():
        return
    if train.amp_cpu == "auto":
        warnings.warn("train.amp_cpu=auto: this CPU has no native bf16 (AVX512-BF16 / AMX), so training runs in "
                      "fp32; its numbers differ by rounding from a bf16 run of the same recipe", stacklevel=2)
    else:
        warnings.warn("train.amp_cpu: this CPU has no native bf16 (AVX512-BF16 / AMX), so bf16 is emulated and "
                      "many times slower than fp32; set train.amp_cpu=auto (bf16 only where native) or false",
                      stacklevel=2)


# ---------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, store: ImageStore, indices: np.ndarray, batch_size: int,
                   amp: bool = False) -> tuple[Tensor, Tensor]:
    """Logits and labels for ``indices`` of ``store``, in order (model in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    device = next(model.parameters()).device
    for xb, yb in store.iterate(indices, batch_size):
        with autocast(device, amp):
            outs.append(model(augment.to_float(xb)).float())
        labels.append(yb)
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def test_accuracy(model: nn.Module, ctx: RunContext) -> tuple[float, float]:
    """(top-1, top-5) of ``model`` on the whole test set."""
    logits, labels = predict_logits(model, ctx.test_store(), np.arange(len(ctx.data.test_y)),
                                    ctx.train.eval_batch_size, use_amp(ctx.train, ctx.device))
    return topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hit.float().mean().item() if len(labels) else float("nan")


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state(ctx: RunContext) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": ctx.generator.get_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(ctx: RunContext, state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    ctx.generator.set_state(state["generator"])
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def _rank_rng(state: dict[str, Any], checkpoint: Path) -> dict[str, Tensor]:
    """This rank's RNG states from a checkpoint (older checkpoints hold rank 0's only)."""
    ranks = state.get("rng_ranks")
    if ranks is None:
        return state["rng"]
    if len(ranks) != distributed.world_size():
        raise CheckpointError(
            f"{checkpoint} was written by {len(ranks)} process(es) but this run has {distributed.world_size()}; "
            "the global batch and every rank's data stream would change. Resume with the same "
            f"--nproc_per_node x --nnodes ({len(ranks)}), or delete the checkpoint to start over.")
    return ranks[distributed.rank()]


# metrics that measure the machine, not the training (a resumed run equals an uninterrupted one in everything
# else): per epoch, and per run (FitResult.machine)
MACHINE_METRICS = ("images_per_second", "loadavg_1m", "train_seconds", "cpu_seconds", "loadavg_mean")


@dataclass
class FitResult:
    epochs_done: int
    train_seconds: float
    history: list[dict[str, float]]
    run_state: dict[str, Any]
    cpu_seconds: float = 0.0  # process CPU time (user + sys, all threads) of the same training steps

    @property
    def machine(self) -> dict[str, float]:
        """What the run cost and the company it had: for the run's record (reports compare methods by it)."""
        loads = [h["loadavg_1m"] for h in self.history if "loadavg_1m" in h]
        return {"train_seconds": self.train_seconds, "cpu_seconds": self.cpu_seconds,
                **({"loadavg_mean": sum(loads) / len(loads)} if loads else {})}


def fit(method, ctx: RunContext, checkpoint: Path, *, resume: bool = False, config_hash: str = "",
        log: Callable[[dict[str, float], int], None] | None = None, run_state: dict[str, Any] | None = None,
        epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Train ``method`` for ``ctx.train.epochs`` epochs of ``steps_per_epoch`` steps.

    ``run_state`` is small plain data saved with each checkpoint (e.g. the MLflow run id) and handed back
    on resume. ``epoch_end(epoch, metrics)`` is called after each epoch's checkpoint (Optuna reports there).
    A method with an ``epoch_metrics()`` method (the pretexts: a k-NN monitor) has its dict merged into each
    epoch's metrics instead of the val accuracy of ``method.classifier()``. A method with
    ``bind_optimizer(optimizer, scheduler)`` is handed both once they exist (after a resume has loaded them).
    """
    train, model = ctx.train, method.model
    global_batchnorm(model, ctx)  # before the optimiser is built (SyncBatchNorm keeps the same parameters)
    set_memory_format(model, train.channels_last, ctx.device)  # likewise before the optimiser (same parameters)
    total = train.epochs * train.steps_per_epoch
    optimizer, scheduler = make_optimizer(model, train, total)
    amp = use_amp(train, ctx.device)
    check_amp_cpu(train, ctx.device)
    # fp16 needs loss scaling; bf16 (the CPU's, and CUDA's where supported) has fp32's range and does not
    fp16 = amp and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    start_epoch, seconds, cpu_seconds, history, run_state = 0, 0.0, 0.0, [], dict(run_state or {})

    if resume and checkpoint.exists():
        state = io.torch_load(checkpoint, map_location=ctx.device)
        if state.get("config_hash") != config_hash:
            raise CheckpointError(
                f"{checkpoint} was written with other params (config hash differs); it cannot be resumed. "
                "Run without --resume to start over, or restore the params it was trained with."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(ctx, _rank_rng(state, checkpoint))
        start_epoch, seconds, history = state["epoch"], state["train_seconds"], state["history"]
        cpu_seconds = state.get("cpu_seconds", 0.0)  # absent in checkpoints written before it was measured
        run_state.update(state["run_state"])

    if hasattr(method, "bind_optimizer"):  # a method that restarts momentum / schedule itself (alternating's cycles)
        method.bind_optimizer(optimizer, scheduler)

    distributed.broadcast_parameters(model)  # every rank starts from rank 0's weights, as DDP does
    main = distributed.is_main()  # only rank 0 logs, writes checkpoints and shows progress
    model.train()
    with TrainProgress(method.name, total, enabled=train.progress and main,
                       completed=start_epoch * train.steps_per_epoch) as bar:
        for epoch in range(start_epoch, train.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            sums: dict[str, Tensor] = {}
            for i in range(train.steps_per_epoch):
                step = epoch * train.steps_per_epoch + i
                faults.point("step")  # reliability tests only (SSL_OPS_FAULT); a no-op otherwise
                with autocast(ctx.device, amp):
                    out = method.training_step(step)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out["loss"]).backward()
                # DDP's gradient all-reduce (mean) done explicitly: methods reach sub-modules (model["net"],
                # model.encoder) directly, which a DDP wrapper's forward would not see
                distributed.average_gradients(model)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                method.after_step(step)  # e.g. an EMA update of the weights just stepped
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                if bar.due(step):  # a host sync only every few steps keeps the loop asynchronous
                    loss = (sums["loss"] / (i + 1)).item()
                    _guard_finite(loss, epoch, checkpoint)
                    bar.update(step + 1, loss, method.images_per_step)
            seconds += time.perf_counter() - t0
            # CPU time is what a budget in "CPU-minutes" means on a shared machine: wall time stretches with
            # other jobs' load, CPU time much less (loadavg_1m records the company the run had)
            cpu_seconds += time.process_time() - c0
            metrics = {k: (v / train.steps_per_epoch).item() for k, v in sums.items()}
            _guard_finite(metrics["loss"], epoch, checkpoint)
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["images_per_second"] = train.steps_per_epoch * method.images_per_step / (time.perf_counter() - t0)
            metrics["loadavg_1m"] = os.getloadavg()[0]
            distributed.broadcast_buffers(model)  # rank 0's BN running statistics everywhere, as DDP does
            if hasattr(method, "epoch_metrics"):  # e.g. pretexts: a k-NN monitor instead of a classifier
                metrics.update(method.epoch_metrics())
            elif len(ctx.split.val):
                logits, labels = predict_logits(method.classifier(), ctx.store, ctx.split.val, train.eval_batch_size,
                                                amp)
                metrics["val_top1"] = topk_accuracy(logits, labels, 1)
            history.append({"epoch": epoch + 1, **metrics})
            if log and main:
                log(metrics, epoch + 1)
            # under torchrun every rank's RNG states (its own augmentation stream), so that a resumed run
            # continues each rank's stream: bit-identical to an uninterrupted one (tests/test_distributed.py)
            rng_ranks = distributed.gather_objects(_rng_state(ctx))
            if main:
                io.torch_save(checkpoint, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_ranks[0],
                    "rng_ranks": rng_ranks, "epoch": epoch + 1, "train_seconds": seconds, "cpu_seconds": cpu_seconds,
                    "history": history,
                    "config_hash": config_hash, "run_state": run_state,
                })
            distributed.barrier()  # no rank moves on (or dies) before rank 0's checkpoint is in place
            faults.point("checkpoint")
            bar.epoch_done(epoch + 1, metrics, (epoch + 1) * train.steps_per_epoch)
            if epoch_end:
                epoch_end(epoch + 1, metrics)
    return FitResult(train.epochs, seconds, history, run_state, cpu_seconds)


def global_batchnorm(model: nn.Module, ctx: RunContext) -> bool:
    """``train.sync_bn`` under torchrun: every BatchNorm becomes torch's SyncBatchNorm, so batch statistics are
    those of the global batch (SimCLRv2 §3.1, PAWS §5). torch runs SyncBatchNorm on CUDA only: on CPU (gloo)
    BatchNorm stays per rank and rank 0 warns. A no-op in one process. Returns whether it converted."""
    if not (ctx.train.sync_bn and distributed.is_dist()):
        return False
    if ctx.device.type != "cuda":
        if distributed.is_main():
            warnings.warn(f"train.sync_bn: torch's SyncBatchNorm needs CUDA; on {ctx.device.type} BatchNorm "
                          "statistics stay per rank (set the method's sync_bn: false to silence this)", stacklevel=2)
        return False
    converted = distributed.maybe_sync_batchnorm(model, True)
    assert converted is model  # the model is never a bare BatchNorm: its children were replaced in place
    return True


def _guard_finite(loss: float, epoch: int, checkpoint: Path) -> None:
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint ({checkpoint}, end of epoch {epoch}) is kept" if epoch
                else "no epoch had finished")
        raise TrainingDivergedError(
            f"the training loss became {loss} during epoch {epoch + 1}; {kept}. Lower the learning rate "
            "(train.lr or the method's lr), add warm-up (train.warmup_epochs), or check the data."
        )
