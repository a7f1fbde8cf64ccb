"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: engine.fit of the supervised method on
digits with its random augmentation (every rank its own stream), 2 epochs x 3 steps, resuming from
<out>/last.pt when it exists. With SSL_OPS_FAULT=checkpoint:1 every rank SIGKILLs itself once the first
epoch's checkpoint is in place. Writes <out>/rank<r>.json: the sha256 of the rank's final weights and the
losses of the steps this launch ran.

Usage: ddp_resume_worker.py <out dir>
"""

import hashlib
import json
import sys
from pathlib import Path

from ssl_ops import distributed
from ssl_ops.engine import fit
from ssl_ops.params import load_params
from ssl_ops.stages import build_method, load_data

ROOT = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1])
distributed.init(timeout_s=60)
params = load_params(str(ROOT / "params.yaml"), [
    "data.name=digits", "train.epochs=2", "train.steps_per_epoch=3", "train.batch_size=8", "train.progress=false",
    "train.warmup_epochs=0", "tracking.log_model=false", "train.device=cpu"])
data, split = load_data(params)[:2]
method = build_method("supervised", params, data, split)
losses, original = [], method.training_step


def step(i):
    result = original(i)
    losses.append(result["loss"].item())
    return result


method.training_step = step
fit(method, method.ctx, out / "last.pt", resume=True)
state = method.model.state_dict()
digest = hashlib.sha256(b"".join(v.cpu().contiguous().numpy().tobytes() for v in state.values())).hexdigest()
(out / f"rank{distributed.rank()}.json").write_text(json.dumps({"weights": digest, "losses": losses}))
