"""torch.distributed helpers for runs launched by ``torchrun`` (gloo on CPU, NCCL on CUDA).

Outside torchrun (no ``WORLD_SIZE`` in the environment) every helper is the single-process identity, so
methods call them unconditionally.
"""

from __future__ import annotations

import datetime as dt
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_ops.errors import SslOpsError


def launched() -> bool:
    """True under torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float = 300.0) -> torch.device | None:
    """Join the process group torchrun set up; returns this rank's device (None when not launched).

    The timeout bounds every collective: a rank that dies leaves its peers blocked in a collective, which
    then fails after ``timeout_s`` instead of hanging, so torchrun tears the whole job down.
    """
    if not launched():
        return None
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(seconds=timeout_s))
        except (KeyError, ValueError, RuntimeError) as e:
            raise SslOpsError(f"could not join the torchrun process group ({e}); launch with "
                              "`torchrun --nproc_per_node=K -m ssl_ops.cli train <method>`") from e
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


# before init (e.g. params resolved ahead of make_context) torchrun's environment already says the answer
def rank() -> int:
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 alone logs to MLflow, writes checkpoints and metrics and shows progress."""
    return rank() == 0


def _autograd_collectives():
    """torch's differentiable collectives (``torch.distributed.nn.functional``): available in every torch
    this project supports (2.4+); 2.14 marks them deprecated in favour of the private
    ``_functional_collectives``, which older versions lack, so the FutureWarning is silenced here."""
    import warnings

    import torch.distributed.nn.functional as dnn

    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\..* is deprecated",
                            category=FutureWarning)
    return dnn


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order; the identity when not distributed.

    Full autograd (torch's differentiable ``all_gather``: its backward sums, onto each rank's slice, the
    gradients every rank's loss sends it), so a loss over gathered tensors differentiates exactly as in one
    process: with each rank holding a loss ``L_r`` and the engine's mean all-reduce of parameter gradients,
    the update is the gradient of ``mean_r L_r``. A loss computed identically on every rank (SimCLR's over
    the global batch) therefore needs no rescaling; a rank-local loss against a gathered set (PAWS's
    anchors against the global support) also gets the gradient its support receives from other ranks.
    """
    if not is_dist() or world_size() == 1:
        return t
    return torch.cat(_autograd_collectives().all_gather(t))


def mean_with_grad(t: Tensor) -> Tensor:
    """The mean of ``t`` over ranks, differentiable (all-reduce sum / world size); identity in one process.
    With equal per-rank batches, the rank mean of per-rank batch means is the global batch mean
    (PAWS's ME-MAX over the global batch)."""
    if not is_dist() or world_size() == 1:
        return t
    return _autograd_collectives().all_reduce(t) / world_size()


def batch_mean(t: Tensor) -> Tensor:
    """Mean over dim 0 of the global batch (every rank's rows); ``t.mean(0)`` in one process."""
    return mean_with_grad(t.mean(0))


def maybe_sync_batchnorm(model: nn.Module, enabled: bool) -> nn.Module:
    """Global BatchNorm statistics across ranks (SimCLRv2 §3.1, PAWS §5) when asked for and distributed: every
    BatchNorm replaced in place by torch's SyncBatchNorm (same parameter and buffer objects). torch runs
    SyncBatchNorm on CUDA only, so ``engine.global_batchnorm`` calls this on CUDA and warns on CPU."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if enabled and is_dist() else model


def average_gradients(model: nn.Module) -> None:
    """All-reduce-mean every parameter gradient: what DDP's reducer does, for models used through
    sub-modules (``model["net"]``) that a DDP wrapper's forward would not see. Call after backward."""
    if not is_dist():
        return
    n = world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def broadcast_parameters(model: nn.Module) -> None:
    """Start every rank from rank 0's weights and buffers (DDP's construction-time broadcast)."""
    if is_dist():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


def shard(indices: Tensor) -> Tensor:
    """This rank's disjoint share of an index pool (strided, so every class stays represented)."""
    return indices[rank()::world_size()] if is_dist() else indices


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's ``broadcast_buffers`` keeps
    them: evaluation and checkpoints then see one model whichever rank looks."""
    if is_dist():
        for t in model.buffers():
            dist.broadcast(t.data, 0)


def gather_objects(obj: object) -> list:
    """``obj`` of every rank, in rank order (e.g. each rank's RNG states for a checkpoint); ``[obj]`` in one
    process."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0's checkpoint is on disk); a no-op in one process."""
    if is_dist():
        dist.barrier()
