#!/usr/bin/env bash
# The 2-core Pareto study of docs/results.md: method x budget x seed on Fashion-MNIST and MNIST,
# as 2 local processes of 1 thread each (launch.submit's local pool).  A re-run skips finished runs.
# Data first:  python -m pipelines.fmnist --out data/fmnist-4k --train 4000
#              python -m pipelines.mnist  --out data/mnist-4k  --train 4000
# Then:        bench/study_grid.sh [runs/study]      (about 70 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/study}
PY=${PY:-.venv/bin/python}
COMMON=(launch.cluster=local launch.array_parallelism=2 train.threads=1 "run.root=$ROOT"
        "launch.folder=$ROOT/submitit/%j" data.eval_split=test
        --sweep data.root=data/fmnist-4k,data/mnist-4k --sweep train.seed=0,1)
$PY -m launch.submit --config configs/study_dense.yaml "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml --config configs/study_taylor.yaml \
    --config configs/study_unit_only.yaml --config configs/study_unit_only_a1.yaml \
    --config configs/study_layer_only.yaml --sweep method.target_macs=0.5,0.3,0.7 "${COMMON[@]}"
$PY -m launch.submit --config configs/study_egp.yaml --sweep method.egp.iterations=1,3 "${COMMON[@]}"
