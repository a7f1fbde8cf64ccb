"""Run the fault tests and write reports/reliability.md + .json: one row per fault, backed by the tests that
inject it (their pass/fail and wall time as measured in this run), plus machine, versions, git SHA and load.

    python -m benchmarks.reliability_report            # ~2-4 min on 2 CPU cores

The table text says what each test asserts; a row whose tests did not all pass is marked FAILED.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.common import environment
from ssl_ops import io

TESTS = ["tests/test_reliability.py", "tests/test_reliability_inputs.py", "tests/test_params_fuzz.py",
         "tests/test_security.py", "tests/test_registry.py::test_checkpoint_with_pickled_payload_is_refused"]

# (fault, how injected, what happened, data lost, test names (prefixes) that prove it)
R, I = "test_reliability::", "test_reliability_inputs::"
ROWS = [
    ("`kill -9` of `ssl-ops train supervised` mid-epoch 2 (step 5 of 12)",
     "`SSL_OPS_FAULT=step:5`: the process SIGKILLs itself",
     "the same command (no `--resume`) resumed from epoch 1: weights bit-identical, per-epoch loss/val/lr equal, "
     "same MLflow run, every epoch's loss in it",
     "none (the partial epoch is recomputed)", [f"{R}test_train_killed_then_rerun_equals_uninterrupted[step:5-1]"]),
    ("`kill -9` of `ssl-ops train` just after epoch 2's checkpoint", "`SSL_OPS_FAULT=checkpoint:2`",
     "resumed from epoch 2; identical weights, curve and MLflow metrics", "none",
     [f"{R}test_train_killed_then_rerun_equals_uninterrupted[checkpoint:2-2]"]),
    ("`kill -9` inside epoch 3's checkpoint write (temp file complete, not renamed)", "`SSL_OPS_FAULT=write:3`",
     "`last.pt` still the complete epoch-2 checkpoint; the orphan temp file deleted by the re-run; identical "
     "result; epoch 3 logged twice with the same values",
     "none", [f"{R}test_train_killed_then_rerun_equals_uninterrupted[write:3-2]"]),
    ("`kill -9` of `ssl-ops pretrain rotation` after epoch 2 of 3", "`SSL_OPS_FAULT=checkpoint:2`",
     "the same command resumed; pre-trained weights bit-identical, k-NN and linear-probe metrics equal", "none",
     [f"{R}test_pretrain_killed_then_rerun_equals_uninterrupted"]),
    ("`kill -9` of an `ssl-ops tune` worker mid-trial (trial 1, after its epoch 1)",
     "`SSL_OPS_FAULT=checkpoint:3`; SQLite RDB storage, heartbeat 1 s, grace 2 s",
     "next call: trial 1 FAIL (heartbeat), its values retried as trial 2 from trial 1's checkpoint with the val "
     "top-1 an uninterrupted study's trial 1 got; trial 0 kept; study went on (trial 3)",
     "none (finished trials kept)", [f"{R}test_tune_worker_killed_mid_trial"]),
    ("disk full while saving a checkpoint",
     "ENOSPC half-way through epoch 2's checkpoint write (`open` in `ssl_ops.io` patched)",
     "`WriteFailedError` naming `checkpoints/supervised/last.pt` and the cause; epoch-1 checkpoint intact and "
     "loadable; no temp file left; same call resumes once the disk is fixed",
     "none", [f"{R}test_failing_checkpoint_write_keeps_previous_checkpoint[28]"]),
    ("permission denied / read-only file system while saving a checkpoint",
     "EACCES, EROFS in the write; EACCES from `mkstemp` (unwritable folder)",
     "same as above, with the permission / read-only hint", "none",
     [f"{R}test_failing_checkpoint_write_keeps_previous_checkpoint[13]",
      f"{R}test_failing_checkpoint_write_keeps_previous_checkpoint[30]",
      f"{R}test_unwritable_folder_is_a_clear_error"]),
    ("disk full while writing metrics", "ENOSPC in `ssl-ops evaluate`'s `metrics/supervised.json` write",
     "exit 2, one paragraph naming the file, no traceback; the previous metrics file byte-identical; no temp file",
     "none", [f"{R}test_failing_metrics_write"]),
    ("MLflow tracking server stopped mid-run",
     "a real `mlflow server` on 127.0.0.1 terminated before epoch 3's metrics are sent "
     "(`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`)",
     "exit 2: 'tracking server ... unreachable while logging the metrics of step 3 ... run the same command "
     "again'; checkpoint at epoch 2; after a server restart the same command resumed into the same run: FINISHED, "
     "params kept, loss history equal to an uninterrupted run, weights identical",
     "none", [f"{R}test_tracking_server_lost_mid_run"]),
    ("a prepared array modified after preparation", "one value changed in `train_x.npy` / `train_y.npy` / `test_x.npy`",
     "`ssl-ops train` exits 2 before any work: '...digits/train_x.npy was modified after preparation'", "none",
     [f"{I}test_prepared_array_modified"]),
    ("a split file modified, or its sha256 file removed",
     "labeled and unlabeled index swapped (still a valid split); `.sha256` deleted",
     "exit 2 naming the split file (modified / no recorded sha256)", "none", [f"{I}test_split_file_modified"]),
    ("a split of another dataset; more labels per class than exist; a class without images",
     "split drawn with another dataset hash; `labels_per_class=500`; labels missing class 2",
     "refused with the file / class named and the fix", "none",
     [f"{I}test_split_of_another", f"{I}test_more_labels", f"{I}test_class_without"]),
    ("invalid params values and types (hypothesis)",
     "80 examples: words, mappings and out-of-range numbers for every scalar key",
     "`ParamsError` naming the key; `ssl-ops` exits 2 with one paragraph, no traceback; 80 valid values round-trip",
     "none", ["test_params_fuzz::"]),
    ("bad images for `predict` and `imagefolder`",
     "corrupt/truncated PNG, over Pillow's pixel limit, RGBA/LA/P/I;16, grey for an RGB model, `.txt` files, "
     "sub-folders, empty folders",
     "errors naming the file; non-image entries skipped and counted in the output (and in `manifest.json`)", "none",
     [f"{I}test_imagefolder", f"{I}test_predict"]),
    ("a checkpoint carrying pickled code; servers; credentials",
     "malicious `__reduce__` payload; scan of code and docs; `https://alice:s3cret@...`, "
     "`postgresql://bob:hunter2@...`",
     "refused (`weights_only=True` everywhere); every server command binds 127.0.0.1 unless "
     "`--app-name basic-auth`; passwords printed/logged as `***`", "none",
     ["test_security::", "test_registry::test_checkpoint_with_pickled_payload_is_refused"]),
]


def run_tests() -> tuple[dict[str, tuple[str, float]], float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *TESTS]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False)
        wall = time.perf_counter() - t0
        results = {}
        for case in ET.parse(xml).iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            failed = any(child.tag in ("failure", "error", "skipped") for child in case)
            results[name] = ("failed" if failed else "passed", float(case.get("time", 0)))
    return results, wall, " ".join(["python", "-m", "pytest", "-q", *TESTS])


def render(results: dict[str, tuple[str, float]], env: dict, wall: float, command: str) -> tuple[str, list[dict]]:
    rows, lines = [], []
    for fault, how, happened, lost, tests in ROWS:
        hits = {n: r for n, r in results.items() if any(n.startswith(t) for t in tests)}
        ok = bool(hits) and all(status == "passed" for status, _ in hits.values())
        secs = sum(t for _, t in hits.values())
        rows.append({"fault": fault, "injected": how, "happened": happened, "data_lost": lost,
                     "tests": sorted(hits), "passed": ok, "seconds": round(secs, 2)})
        names = "<br>".join(f"`{n}`" for n in sorted(hits)) or "(no test ran)"
        outcome, lost = (happened, lost) if ok else ("**FAILED**", "?")
        lines.append(f"| {fault} | {how} | {outcome} | {lost} | {names} | {secs:.1f} |")
    passed = sum(s == "passed" for s, _ in results.values())
    text = "\n".join([
        "# Reliability: fault tests",
        "",
        f"Generated by `python -m benchmarks.reliability_report` on {env['date']} at git {env['git_commit']}: "
        f"{passed}/{len(results)} tests passed in {wall:.0f} s wall ({sum(t for _, t in results.values()):.0f} s "
        f"inside tests). Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}; load average "
        f"(1 min) {env['load_average_1min']:.1f} before the run — other jobs shared the CPU, so times are upper "
        "bounds.",
        "",
        f"Command: `{command}` (`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`). All on CPU, "
        "`digits`, fixed seeds. Each row lists the tests that inject the fault and check the outcome; "
        "the behaviour and the policies are described in `docs/reliability.md`.",
        "",
        "| fault | how injected | what happened (asserted by the tests) | data lost | tests | test s |",
        "|---|---|---|---|---|---:|",
        *lines,
        "",
    ])
    return text, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/reliability.md")
    args = parser.parse_args()
    env = environment()
    results, wall, command = run_tests()
    text, rows = render(results, env, wall, command)
    out = Path(args.out)
    io.write_text(out, text)
    tests = {k: {"status": s, "seconds": t} for k, (s, t) in results.items()}
    io.write_json(out.with_suffix(".json"), {"environment": env, "command": command, "wall_seconds": round(wall, 1),
                                             "rows": rows, "tests": tests})
    print(text)


if __name__ == "__main__":
    main()
