"""torch.distributed helpers, launched for real with torchrun (gloo, 2 CPU processes)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_ops import distributed

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, nproc: int = 2, args: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_single_process_helpers_are_identities():
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(t) is t
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert torch.equal(distributed.shard(torch.arange(5)), torch.arange(5))


def test_gathered_nt_xent_matches_single_process_loss_and_gradient():
    """SimCLR §2 / appendix: negatives from the whole global batch; each rank's gradient is its slice of
    the single-process gradient."""
    p = _torchrun(ROOT / "tests" / "ddp_gather_worker.py")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("ok=True") == 2, p.stdout


def test_a_failing_rank_brings_the_job_down(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import torch, sys\nfrom ssl_ops import distributed\ndistributed.init(timeout_s=20)\n"
                      "if distributed.rank() == 1:\n    sys.exit(3)\n"
                      "torch.distributed.barrier()\n")
    p = _torchrun(script)
    assert p.returncode != 0


def _curves(name: str, *extra: str) -> tuple[list[float], list[float]]:
    """(1-process, 2-rank) per-step loss curves of tests/ddp_fit_worker.py at global batch 16."""
    worker = ROOT / "tests" / "ddp_fit_worker.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(worker), name, "16", "one.json"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = _torchrun(worker, args=[name, "16", "two.json", *extra])
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = json.loads(Path("one.json").read_text()), json.loads(Path("two.json").read_text())
    assert len(a) == len(b) == 6
    return a, b


@pytest.mark.parametrize("name", ["supervised", "simclr", "paws"])
def test_two_ranks_follow_the_one_process_loss_curve(workdir, name):
    """Same global batch (16) and deterministic data: 2 ranks x 8 under torchrun (gradient mean all-reduce,
    SimCLR negatives and PAWS support gathered with autograd, PAWS's ME-MAX over the global batch, lr rule on
    the global batch) give the 1-process loss curve."""
    a, b = _curves(name)
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"{name}: max abs loss difference per step {diff:.2e}")
    assert diff < 1e-4, (a, b)
    assert a[0] != a[-1]  # the curve moves: the check compares training, not six copies of one number


def test_paws_needs_the_support_gradient_from_other_ranks(workdir):
    """The check above can fail: with a gather whose gradient reaches only the local slice (the other ranks'
    anchors then do not train this rank's support), PAWS leaves the 1-process curve."""
    a, b = _curves("paws", "local-slot")
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"paws with a local-slot gather: max abs loss difference per step {diff:.2e}")
    assert diff > 1e-3, (a, b)
