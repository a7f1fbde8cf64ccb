"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: `ssl-ops train <method>` (cli.main, in this
process) for every method named in argv[1] (comma-separated), one after the other in one process group, with the
--set overrides that follow. One launch instead of one per method: the ranks start (torch import, gloo rendezvous)
once. Prints "<method> rc=<exit code>" per method on rank 0; exits 1 if any failed."""

import sys

from ssl_ops import distributed
from ssl_ops.cli import main

names, sets = sys.argv[1].split(","), sys.argv[2:]
codes = {}
for name in names:
    codes[name] = main(["train", name, "--no-progress", *sets])
    if distributed.is_main():
        print(f"{name} rc={codes[name]}", flush=True)
sys.exit(1 if any(codes.values()) else 0)
