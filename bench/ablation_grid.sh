#!/usr/bin/env bash
# Ablations of the variational method on the VALIDATION splits at a 50% MACs target (seed 0):
# the layer estimator (autograd first order / exact with common random numbers, 2 blocks a step /
# conditional with per-example layer gates)
# and the drive to {0, 1} switched off.  The default run is bench/calib_grid.sh's drive=0.9 down row.
# Results: python -m launch.compare --runs-root runs/calib --experiment study --json
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/calib}
PY=${PY:-.venv/bin/python}
COMMON=(launch.cluster=local launch.array_parallelism=2 train.threads=1 "run.root=$ROOT"
        "launch.folder=$ROOT/submitit/%j" data.eval_split=val method.target_macs=0.5
        --sweep data.root=data/fmnist-4k,data/mnist-4k)
$PY -m launch.submit --config configs/study_variational.yaml --sweep method.variational.estimator=autograd,exact \
    method.variational.exact_blocks=2 "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml method.variational.estimator=conditional \
    method.variational.layer_per_example=true "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml --sweep method.variational.drive=0 "${COMMON[@]}"
