#!/usr/bin/env bash
# One ssl-ops command of the Fashion-MNIST 10-labels/class campaign, as the stages of dvc.yaml here call it:
#
#   ./run.sh WHERE COMMAND [NAME] [more ssl-ops options]
#
# WHERE is a labeled split's seed (runs in seed<WHERE>/ with split.seed = train.seed = WHERE; seed<WHERE>/data
# links to the shared data/), "shared" (label-free pre-training and the report, here, on split 0) or "demo"
# (`make demo`: split 0 in demo/, its own MLflow store demo/mlflow.db, so the campaign's outputs stay untouched).
# Params: the top-level params.yaml, then this folder's params.yaml (the campaign), then the recipe
# presets/fmnist_10pc/<NAME>.yaml (tuned on seed 0's val split) for train / pretrain / evaluate / tune.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
where=$1 cmd=$2
shift 2
# every run of the campaign goes to one MLflow store (the report reads it) unless the user names a server
case $where in
  shared) dir=$here seed=0 store=$here/mlflow.db ;;
  demo) dir=$here/demo seed=0 store=$here/demo/mlflow.db ;;
  *) dir=$here/seed$where seed=$where store=$here/mlflow.db ;;
esac
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$store}
mkdir -p "$dir"
cd "$dir"
[ "$dir" = "$here" ] || ln -sfn ../data data
args=(--params "$here/../../params.yaml" --preset "$here/params.yaml")
case $cmd in
  train|pretrain|evaluate|tune)
    name=$1
    shift
    preset=$here/../../presets/fmnist_10pc/$name.yaml
    if [ ! -f "$preset" ]; then
      echo "error: no recipe $preset for $name; write one (an empty file = the defaults of params.yaml)" >&2
      exit 2
    fi
    args=("$name" "${args[@]}" --preset "$preset")
    ;;
esac
args+=(--set "split.seed=$seed" --set "train.seed=$seed")
case $cmd in train|pretrain) args+=(--no-progress) ;; esac
exec ssl-ops "$cmd" "${args[@]}" "$@"
