#!/usr/bin/env bash
# Does a refactor change what a method trains? Trains each METHOD briefly on Fashion-MNIST split 0 in fp32 twice,
# with the code of commit BASE and with this working tree, from the same tiny pre-trainings, and says whether the
# two checkpoints' weights are bit-identical. Minutes, where re-running the campaign's stages for a changed code
# fingerprint costs CPU-hours. On one machine a run is deterministic, so "False" means the change alters training.
#
#   bash benchmarks/same_weights.sh BASE [METHOD ...]     # default methods: alternating pseudo_label simclrv2
#
# Needs `make install` and the campaign's prepared data (cd pipelines/fmnist_10pc && dvc repro -s prepare split@0).
# Runs in a temporary folder (its own MLflow stores); 1 thread, so run it alone or say what ran beside it.
set -euo pipefail
base=${1:?usage: bash benchmarks/same_weights.sh BASE [METHOD ...]}
shift
methods=("${@:-alternating pseudo_label simclrv2}")
read -ra methods <<< "${methods[*]}"
root=$(git rev-parse --show-toplevel)
camp=$root/pipelines/fmnist_10pc recipes=$root/presets/fmnist_10pc
[ -d "$camp/data/splits" ] || { echo "error: no prepared data in $camp/data; run: cd $camp && dvc repro -s prepare split@0" >&2; exit 2; }
git -C "$root" rev-parse --verify -q "$base^{commit}" >/dev/null || { echo "error: $base is not a commit here" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp/base_src" 2>/dev/null || true; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -q --detach "$tmp/base_src" "$base"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PATH=$root/.venv/bin:$PATH
common=(--params "$root/params.yaml" --preset "$camp/params.yaml" --set split.seed=0 --set train.seed=0 --no-progress)
short=(--set train.epochs=2 --set train.steps_per_epoch=10)
# the starts, once, with this tree's code: a tiny SimCLR (simclrv2's recipe network) and RotNet (alternating's)
mkdir -p "$tmp/starts" && cd "$tmp/starts" && ln -s "$camp/data" data
ssl-ops pretrain simclr "${common[@]}" --preset "$recipes/simclrv2.yaml" --set simclr.epochs=1 \
  --set simclr.steps_per_epoch=20 --set tracking.uri="sqlite:///$tmp/starts/mlflow.db" >/dev/null
ssl-ops pretrain rotation "${common[@]}" --preset "$recipes/alternating.yaml" --set rotation.epochs=1 \
  --set rotation.steps_per_epoch=20 --set tracking.uri="sqlite:///$tmp/starts/mlflow.db" >/dev/null
for side in base tree; do
  mkdir -p "$tmp/$side/models" && cd "$tmp/$side" && ln -s "$camp/data" data && cp -r "$tmp/starts/models/pretrain" models/
  # the base's package first on the path (the console script's folder, then PYTHONPATH, then the editable install)
  if [ $side = base ]; then export PYTHONPATH=$tmp/base_src; else unset PYTHONPATH; fi
  for m in "${methods[@]}"; do
    extra=()
    case $m in
      alternating) extra=(--set alternating.init=models/pretrain/rotation.pt --set alternating.cycles=2) ;;
      mean_teacher_refine) echo "error: $m needs a trained mean_teacher; not supported here" >&2; exit 2 ;;
      pseudo_label) extra=(--set pseudo_label.teacher_epochs=2 --set pseudo_label.threshold=0.0) ;;
      simclrv2) extra=(--set simclrv2.pretrained=models/pretrain/simclr.pt) ;;
    esac
    ssl-ops train "$m" "${common[@]}" --preset "$recipes/$m.yaml" "${short[@]}" "${extra[@]}" \
      --set tracking.uri="sqlite:///$tmp/$side/mlflow.db" >/dev/null 2>"$tmp/$side/$m.err" ||
      { echo "error: $m failed with the $side code:" >&2; tail -3 "$tmp/$side/$m.err" >&2; exit 1; }
  done
done
unset PYTHONPATH
cd "$tmp"
python - "$base" "${methods[@]}" <<'PY'
import sys
import torch
base, methods = sys.argv[1], sys.argv[2:]
print(f"fp32, split 0, 20 steps each; {base} against the working tree")
for m in methods:
    a = torch.load(f"base/models/{m}.pt", weights_only=True)["state_dict"]
    b = torch.load(f"tree/models/{m}.pt", weights_only=True)["state_dict"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{m}: {len(a)} tensors, bit-identical: {same}")
PY
