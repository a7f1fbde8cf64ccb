#!/usr/bin/env bash
# `make demo` (issue 17): the point of ssl-ops in at most 10 minutes on 2 idle CPU cores. On the default labeled
# split (Fashion-MNIST, 10 labels per class, split seed 0) it trains the tuned supervised baseline, then the
# semi-supervised recipe with the best accuracy per CPU-minute of the campaign (PAWS-NN) and the best one
# (paws_distill, from that PAWS network; reports/results_fmnist_10pc.md), and ends with the table of the three
# rows and the gains in test top-1. Runs go to demo/mlflow.db (experiment
# fmnist-10pc-demo), the table to demo/results.md; the campaign's outputs and reports/ are left alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
exp=(--set tracking.experiment=fmnist-10pc-demo)
start=$(date +%s)
dvc repro --quiet prepare split@0          # the campaign's data and split 0 (cached after the first run)
echo "== 1/3 supervised baseline (presets/fmnist_10pc/supervised.yaml)"
./run.sh demo train supervised "${exp[@]}"
./run.sh demo evaluate supervised "${exp[@]}"
# PAWS (Assran et al. 2021) evaluated as PAWS-NN (§5: soft nearest neighbours against the 100 labeled images, no
# fine-tuning): the best test top-1 per CPU-minute measured so far (reports/results_fmnist_10pc.md), with the
# campaign's recipe (~3 CPU-minutes of training), so the demo's rows are the campaign's split-0 rows.
echo "== 2/4 PAWS pre-training + PAWS-NN (presets/fmnist_10pc/paws.yaml)"
./run.sh demo pretrain paws "${exp[@]}"
# then PAWS-NN as the teacher of a classifier on the unlabeled images (paws_distill, SimCLRv2 §3's distillation
# step): the campaign's best row, ~2 more CPU-minutes
echo "== 3/4 paws_distill: PAWS-NN distilled into a classifier (presets/fmnist_10pc/paws_distill.yaml)"
./run.sh demo train paws_distill "${exp[@]}"
./run.sh demo evaluate paws_distill "${exp[@]}"
echo "== 4/4 the table"
./run.sh demo results "${exp[@]}" --out "$here/demo/results.md"
echo "demo finished in $(( $(date +%s) - start )) s (wall); CPU-minutes per row are in the table"
