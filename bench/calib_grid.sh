#!/usr/bin/env bash
# Calibration of the variational defaults on the VALIDATION splits (never the test set):
# the drive to {0, 1} at a 50% MACs target, on Fashion-MNIST and MNIST, with Taylor and dense as
# references.  Results: python -m launch.compare --runs-root runs/calib --experiment study --budgets
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/calib}
PY=${PY:-.venv/bin/python}
COMMON=(launch.cluster=local launch.array_parallelism=2 train.threads=1 "run.root=$ROOT"
        "launch.folder=$ROOT/submitit/%j" data.eval_split=val --sweep data.root=data/fmnist-4k,data/mnist-4k)
$PY -m launch.submit --config configs/study_variational.yaml --sweep method.variational.drive=0.5,0.9 --sweep method.variational.drive_mode=down,both \
    method.target_macs=0.5 "${COMMON[@]}"
$PY -m launch.submit --config configs/study_taylor.yaml method.target_macs=0.5 "${COMMON[@]}"
$PY -m launch.submit --config configs/study_dense.yaml "${COMMON[@]}"
