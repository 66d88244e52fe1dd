#!/usr/bin/env bash
# The "scratch" reading of docs/results.md: each pruning run's final architecture trained again from a
# fresh random init with the dense recipe (model.init_from=<run> model.init_weights=false; Liu et al. 2019,
# "Rethinking the value of network pruning"). The same seed gives the same data order, so per seed
#   run's top-1 - its architecture's scratch top-1   = the cost of pruning while training (the process),
#   scratch top-1 of method A - of method B          = the quality of the decisions (the architecture),
# at the same MACs. Paired seeds; two lanes of one thread each; a re-run skips what finished.
#   bench/scratch_grid.sh RUNS_ROOT OUT_ROOT NAME_GLOB...     e.g.
#   bench/scratch_grid.sh runs/study runs/scratch 'study-taylor-target_macs0.5-*nameresnet20-seed[012]'
#   python -m launch.compare --runs-root runs/scratch --experiment scratch
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$1; ROOT=$2; shift 2
PY=${PY:-.venv/bin/python}
EVAL=${EVAL:-val}  # the split the retrained networks are read on (choices: val; the final table: test)
mkdir -p "$ROOT/logs"

one() {  # one RUN_DIR: its architecture from scratch, the run's own seed and data, the dense recipe
  local run=$1 name
  name=scratch-$(basename "$run")
  [[ -f "$ROOT/$name/summary.json" ]] && return 0
  # the run's own model, data, seed and schedule, and its method in the label
  read -r -a same < <(python3 -c "import json,sys; c = json.load(open(sys.argv[1])); m = json.load(open(sys.argv[2]))
print(f\"model.name={c['model']['name']} data.root={c['data']['root']} train.seed={c['train']['seed']}\",
      f\"train.epochs={c['train']['epochs']} optim.warmup_epochs={c['optim']['warmup_epochs']}\",
      f\"method.label=scratch-{m['method']}\")" "$run/config.json" "$run/summary.json")
  $PY -m launch.train --config configs/study_dense.yaml "${same[@]}" "model.init_from=$run" \
      model.init_weights=false "data.eval_split=$EVAL" train.threads=1 \
      "run.root=$ROOT" "run.name=$name" "run.dir=$ROOT/$name" run.resume=auto tracking.experiment=scratch \
      > "$ROOT/logs/$name.log" 2>&1 || echo "FAILED $name: see $ROOT/logs/$name.log" >&2
}
export -f one; export ROOT PY EVAL
runs=()
for g in "$@"; do
  for r in "$SRC"/$g; do [[ -f "$r/summary.json" ]] && runs+=("$r"); done
done
[[ ${#runs[@]} -gt 0 ]] || { echo "no finished run under $SRC matches $*" >&2; exit 2; }
printf '%s\n' "${runs[@]}" | xargs -P2 -I{} bash -c 'one "$@"' _ {}
