#!/usr/bin/env bash
# The accuracy sweep behind reports/summary.md: queue one DVC experiment per (split seed = train seed,
# label budget), each training and evaluating every method in $METHODS, then run the queue one at a time.
# Seed-major order: if the queue is stopped early, the finished part covers every budget with fewer seeds.
#
# Queued experiments run in temporary copies of the repository, so MLflow must be given an absolute URI
# (or a server): a relative sqlite:///mlflow.db would be written inside the temporary copy and lost.
#
#   benchmarks/sweep.sh                       # the committed sweep (Fashion-MNIST, short schedule)
#   SEEDS="0" BUDGETS="10" benchmarks/sweep.sh  # a smaller one
#   ssl-ops report --experiment sweep-fmnist  # then the report (reads MLflow)
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${METHODS:-"[supervised,pseudo_label,vat]"}
BUDGETS=${BUDGETS:-"10 25 50 100"}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-5}
STEPS=${STEPS:-50}
EXPERIMENT=${EXPERIMENT:-sweep-fmnist}
URI=${URI:-sqlite:///$PWD/mlflow.db}
for seed in $SEEDS; do
  for lpc in $BUDGETS; do
    dvc exp run --queue \
      -S "pipeline.methods=$METHODS" -S data.name=fashion_mnist \
      -S split.labels_per_class=$lpc -S split.seed=$seed -S train.seed=$seed \
      -S train.epochs=$EPOCHS -S train.steps_per_epoch=$STEPS -S pseudo_label.teacher_epochs=$EPOCHS \
      -S train.progress=false -S tracking.log_model=false \
      -S tracking.experiment=$EXPERIMENT -S "tracking.uri=$URI"
  done
done
dvc exp run --run-all
