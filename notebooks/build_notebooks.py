"""Writes notebooks/compare_runs.ipynb and notebooks/inspect_data.ipynb (outputs cleared).

    python notebooks/build_notebooks.py

The notebooks are generated so that their code stays reviewable as plain Python here. The first cell of
each is the parameters cell: every value comes from an ``SSL_OPS_NB_*`` environment variable with a default
for the usual layout (run the notebook from notebooks/ next to the repository's mlflow.db and data/); the
test suite runs both against a temporary digits store by setting those variables.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

COMMON_PARAMS = '''import os
from pathlib import Path

# Parameters (papermill style: the test suite overrides them through these environment variables)
ROOT = Path(os.environ.get("SSL_OPS_NB_ROOT", ".."))  # folder holding data/ (and models/)
TRACKING_URI = os.environ.get("SSL_OPS_NB_TRACKING_URI", f"sqlite:///{(ROOT / 'mlflow.db').resolve()}")
EXPERIMENT = os.environ.get("SSL_OPS_NB_EXPERIMENT", "sweep-fmnist")
DATASET = os.environ.get("SSL_OPS_NB_DATASET", "fashion_mnist")'''

COMPARE = [
    new_markdown_cell("# Compare runs\n\nEvery evaluated run of an MLflow experiment (read through `ssl_ops.tracking`, "
                      "the project's only MLflow client), filtered by method and label budget: a table of test "
                      "accuracy (mean ± std over seeds), accuracy against labels per class, and validation curves."),
    new_code_cell(COMMON_PARAMS + '''
METHODS = [m for m in os.environ.get("SSL_OPS_NB_METHODS", "").split(",") if m]  # empty: all methods
LABELS_PER_CLASS = [int(b) for b in os.environ.get("SSL_OPS_NB_LABELS", "").split(",") if b]  # empty: all budgets''',
                  metadata={"tags": ["parameters"]}),
    new_code_cell('''import matplotlib.pyplot as plt
import pandas as pd

from ssl_ops import report, tracking
from ssl_ops.params import TrackingParams

store = TrackingParams(uri=TRACKING_URI, experiment=EXPERIMENT)
parsed = [r for r in map(report.parse_run, tracking.search_runs(store)) if r is not None and r.dataset == DATASET]
rows, replaced = report.latest_per_config(parsed)
rows = [r for r in rows if (not METHODS or r.method in METHODS)
        and (not LABELS_PER_CLASS or r.labels_per_class in LABELS_PER_CLASS)]
runs = pd.DataFrame(report.as_records(rows))
print(f"{len(runs)} runs ({replaced} older duplicates left out) from {EXPERIMENT!r}")
runs[["method", "budget", "split_seed", "steps", "test_top1", "val_top1", "train_seconds"]].head(20)'''),
    new_markdown_cell("## Test top-1 per method and budget (mean ± std over seeds, n seeds)"),
    new_code_cell('''table = (runs.groupby(["method", "labels_per_class"])["test_top1"]
         .agg(["mean", "std", "count"]).mul([100, 100, 1]).round(2))
table'''),
    new_markdown_cell("## Accuracy against labels per class, and against wall time"),
    new_code_cell('''by_labels, per_run = report.plot_tables(rows)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for method, pts in pd.DataFrame(by_labels).groupby("method"):
    ax1.errorbar(pts.labels_per_class, 100 * pts.test_top1, yerr=100 * pts.test_top1_std, marker="o",
                 capsize=3, label=method)
for method, pts in pd.DataFrame(per_run).groupby("method"):
    ax2.scatter(pts.train_seconds, 100 * pts.test_top1, label=method, alpha=0.7)
ax1.set(xscale="log", xlabel="labels per class", ylabel="test top-1 (%)")
ax2.set(xlabel="training wall time (s)", ylabel="test top-1 (%)")
ax1.legend(), ax2.legend()
plt.show()'''),
    new_markdown_cell("## Validation top-1 per epoch (the curves MLflow logged while training)"),
    new_code_cell('''fig, ax = plt.subplots(figsize=(6, 4))
for r in rows[:30]:  # a readable number of curves
    hist = tracking.metric_history(store, r.run_id, "val_top1")
    ax.plot([s for s, _ in hist], [100 * v for _, v in hist], alpha=0.6,
            label=f"{r.method} {r.budget} seed {r.split_seed}")
ax.set(xlabel="epoch", ylabel="val top-1 (%)")
ax.legend(fontsize=6)
plt.show()'''),
]

INSPECT = [
    new_markdown_cell("# Inspect the data\n\nThe labeled examples of a split, class by class; how good the "
                      "pseudo-labels are (from the metrics methods log, and from a trained `pseudo_label` model's "
                      "buffers); and a 2-D embedding of a trained model's features coloured by class."),
    new_code_cell(COMMON_PARAMS + '''
LABELS_PER_CLASS = int(os.environ.get("SSL_OPS_NB_LABELS", "10"))
SPLIT_SEED = int(os.environ.get("SSL_OPS_NB_SPLIT_SEED", "0"))
EMBED_METHOD = os.environ.get("SSL_OPS_NB_EMBED_METHOD", "supervised")  # models/<method>.pt; pixels if absent
EMBEDDING = os.environ.get("SSL_OPS_NB_EMBEDDING", "pca")  # pca | tsne
EMBED_IMAGES = int(os.environ.get("SSL_OPS_NB_EMBED_IMAGES", "2000"))  # test images embedded''',
                  metadata={"tags": ["parameters"]}),
    new_code_cell('''import matplotlib.pyplot as plt
import numpy as np
import torch

from ssl_ops import io, tracking
from ssl_ops.data.prepare import load_prepared
from ssl_ops.data.splits import load_split, split_path
from ssl_ops.params import SplitParams, TrackingParams

data = load_prepared(DATASET, root=ROOT / "data/prepared")
split = load_split(ROOT / split_path(DATASET, SplitParams(labels_per_class=LABELS_PER_CLASS, seed=SPLIT_SEED)),
                   data.sha256, len(data.train_y))
print(f"{DATASET}: {len(split.labeled)} labeled, {len(split.val)} val, {len(split.unlabeled)} unlabeled; "
      f"classes {data.classes}")'''),
    new_markdown_cell("## The labeled examples, one row per class"),
    new_code_cell('''labels = data.train_y[split.labeled]
shown = min(LABELS_PER_CLASS, 10)
fig, axes = plt.subplots(data.num_classes, shown, figsize=(shown, data.num_classes), squeeze=False)
for c, row in enumerate(axes):
    idx = split.labeled[labels == c][:shown]
    for ax, i in zip(row, idx):
        img = data.train_x[i]
        ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray")
    for ax in row:
        ax.axis("off")
    row[0].set_title(data.classes[c], fontsize=7, loc="left")
plt.show()'''),
    new_markdown_cell("## Pseudo-label quality\n\nPer epoch, from any run that logged `pseudo_label_accuracy` "
                      "(the accuracy of the pseudo-labels on the unlabeled pool, for analysis only; never used "
                      "for selection), then per class from a trained `pseudo_label` model."),
    new_code_cell('''store = TrackingParams(uri=TRACKING_URI, experiment=EXPERIMENT)
runs = [r for r in tracking.search_runs(store) if "pseudo_label_accuracy" in r["metrics"]]
fig, ax = plt.subplots(figsize=(6, 3.5))
for r in runs[:20]:
    hist = tracking.metric_history(store, r["run_id"], "pseudo_label_accuracy")
    ax.plot([s for s, _ in hist], [100 * v for _, v in hist], marker="o",
            label=f"{r['tags'].get('method')} {r['params'].get('split.labels_per_class')}/class "
                  f"seed {r['params'].get('split.seed')}")
ax.set(xlabel="epoch", ylabel="pseudo-label accuracy (%)")
ax.legend(fontsize=6)
plt.show()
print(f"{len(runs)} runs logged pseudo_label_accuracy")'''),
    new_code_cell('''model_file = ROOT / "models/pseudo_label.pt"
if model_file.exists():
    ck = io.torch_load(model_file)
    pseudo = ck["state_dict"]["pseudo.labels"].numpy()
    true = data.train_y[split.unlabeled] if ck["split_sha256"] == split.sha256 else None
if model_file.exists() and true is not None:
    kept = pseudo >= 0
    per_class = [(pseudo[kept & (pseudo == c)] == true[kept & (pseudo == c)]).mean() if (kept & (pseudo == c)).any()
                 else np.nan for c in range(data.num_classes)]
    plt.bar(data.classes, 100 * np.array(per_class))
    plt.xticks(rotation=60, fontsize=7), plt.ylabel("precision of the pseudo-label (%)")
    plt.show()
    print(f"kept {kept.mean():.1%} of the unlabeled pool; "
          f"pseudo-label accuracy {(pseudo[kept] == true[kept]).mean():.2%}")
else:
    print(f"no {model_file} for this split: "
          "run `ssl-ops train pseudo_label` to see per-class pseudo-label precision")'''),
    new_markdown_cell("## 2-D embedding of features, coloured by class"),
    new_code_cell('''from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from ssl_ops.stages import load_trained
from ssl_ops.params import load_params

x = torch.from_numpy(np.ascontiguousarray(data.test_x[:EMBED_IMAGES])).float().div(255)
y = data.test_y[:EMBED_IMAGES]
cwd = os.getcwd()
if (ROOT / f"models/{EMBED_METHOD}.pt").exists():
    os.chdir(ROOT)  # load_trained reads models/ and data/ relative to the project folder
    try:
        method, _ = load_trained(EMBED_METHOD, load_params("params.yaml"))
        clf = method.classifier().cpu().eval()
        with torch.no_grad():
            feats, source = clf.features(x).numpy(), f"{EMBED_METHOD} backbone features"
    finally:
        os.chdir(cwd)
else:
    feats, source = x.flatten(1).numpy(), "raw pixels (no trained model found)"
reducer = TSNE(2, init="pca", random_state=0) if EMBEDDING == "tsne" else PCA(2, random_state=0)
xy = reducer.fit_transform(feats)
fig, ax = plt.subplots(figsize=(6, 5))
points = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=6)
ax.legend(points.legend_elements()[0], data.classes, fontsize=6, loc="best")
ax.set_title(f"{EMBEDDING.upper()} of {source}, {len(y)} test images")
plt.show()
print(f"embedded {len(y)} test images: {source}")'''),
]


def build() -> list[Path]:
    paths = []
    for name, cells in (("compare_runs", COMPARE), ("inspect_data", INSPECT)):
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(f"wrote {p}")
