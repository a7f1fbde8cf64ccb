"""Fingerprint of the ssl_ops code that decides what a campaign stage computes: one line per file, its sha256.

Every training stage of dvc.yaml depends on the listing this writes (training_code.sha256), not on the whole
package, so a change to code that only reads, reports or serves results (the report tables, the tuner, the Model
Registry, progress bars, error wording) does not mark hours of finished trainings stale. The `code` stage itself
depends on the whole package and costs a second; DVC re-runs a training stage only when the listing changed, and
`git diff` of the listing names the file that did it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

# Relative to ssl_ops/: code that never changes a trained model, a pre-training or a metrics file.
NOT_TRAINING = ("serving/", "results.py", "tuning.py", "report.py", "progress.py", "cli.py", "errors.py",
                "faults.py")


def listing(package: Path) -> str:
    lines = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if not rel.startswith(NOT_TRAINING):
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  ssl_ops/{rel}\n")
    return "".join(lines)


def main(package: str, out: str) -> None:
    tmp = Path(f"{out}.tmp")
    tmp.write_text(listing(Path(package)))
    os.replace(tmp, out)  # never a half-written listing


if __name__ == "__main__":
    main(*sys.argv[1:3])
