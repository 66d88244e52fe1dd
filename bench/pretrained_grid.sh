#!/usr/bin/env bash
# Issue 25's results row: Taylor-FO-BN from a trained dense network (its paper's setting) against
# Taylor-FO-BN from scratch, at the same total epochs (docs/results.md, "A pre-trained start").
#   pre-trained: dense for PRE epochs, then Taylor for EPOCHS-PRE epochs from it (model.init_from);
#   scratch:     Taylor for EPOCHS epochs from a random init (the study's own Taylor row).
# Both Taylor runs use the study recipe unchanged (configs/study_taylor.yaml: LR 0.1 cosine, pruning
# between 20% and 70% of the run's steps), so the only difference is where the weights start and how
# the fixed epoch budget is split. Paired seeds; two lanes of one thread each; a re-run skips what
# finished (summary.json present).
# Data first:  python -m pipelines.fmnist --out data/fmnist-4k --train 4000
# Then:        bench/pretrained_grid.sh [runs/pretrained]
#              python -m launch.compare --runs-root runs/pretrained --experiment pretrained --budgets
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/pretrained}
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-5}
PRE=${PRE:-2}
TARGETS=${TARGETS:-"0.3 0.5"}
SEEDS=${SEEDS:-"0 1 2"}
COMMON=(train.threads=1 "run.root=$ROOT" data.eval_split=test tracking.experiment=pretrained)

train() {  # train NAME ARGS...: one run, skipped when it finished
  local name=$1; shift
  [[ -f "$ROOT/$name/summary.json" ]] && return 0
  # an unfinished run of this name continues from its newest checkpoint (run.resume=auto)
  # a failed run is reported and left for the next re-run; the other runs go on
  $PY -m launch.train "$@" "run.name=$name" "run.dir=$ROOT/$name" run.resume=auto "${COMMON[@]}" \
      > "$ROOT/logs/$name.log" 2>&1 || echo "FAILED $name: see $ROOT/logs/$name.log" >&2
}

lane() {  # lane SEED: the dense start, then each target's pre-trained and scratch Taylor runs
  local s=$1 t
  train "dense-e$PRE-s$s" --config configs/study_dense.yaml "train.epochs=$PRE" "train.seed=$s"
  for t in $TARGETS; do
    train "taylor-pre$PRE-t$t-s$s" --config configs/study_taylor.yaml "train.epochs=$((EPOCHS - PRE))" \
        "model.init_from=$ROOT/dense-e$PRE-s$s" "method.target_macs=$t" "train.seed=$s" \
        "method.label=taylor-pretrained"
    train "taylor-scratch-t$t-s$s" --config configs/study_taylor.yaml "train.epochs=$EPOCHS" \
        "method.target_macs=$t" "train.seed=$s" "method.label=taylor-scratch"
  done
}

mkdir -p "$ROOT/logs"
pids=()
for s in $SEEDS; do
  lane "$s" & pids+=($!)
  if (( ${#pids[@]} == 2 )); then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi
done
wait
