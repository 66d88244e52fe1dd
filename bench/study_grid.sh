#!/usr/bin/env bash
# The 2-core Pareto study of docs/results.md (docs/method.md section 6: matched budgets, 3 paired seeds,
# latency): method x budget x seed, as 2 local processes of 1 thread each (launch.submit's local pool).
# Stages run in the order of what the study needs first; a re-run skips the finished runs and resumes
# the others, so the grid can be stopped and continued at any point.
# Data first:  python -m pipelines.fmnist --out data/fmnist-4k --train 4000
#              python -m pipelines.mnist  --out data/mnist-4k  --train 4000
# Then:        bench/study_grid.sh [runs/study]
#              python -m launch.compare --runs-root runs/study --experiment study --budgets --reference taylor
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/study}
PY=${PY:-.venv/bin/python}
COMMON=(launch.cluster=local launch.array_parallelism=2 train.threads=1 "run.root=$ROOT"
        "launch.folder=$ROOT/submitit/%j" data.eval_split=test --sweep train.seed=0,1,2)
# A run is skipped when a FINISHED run of its name exists, and a name is the recipe's run.name plus the
# swept values: the ResNet-20 stages sweep model.name (one value) so that their names never meet the
# ResNet-56 stage's, which share recipe, budget, data and seed (its runs keep the names they were made
# with on 2026-12-05, without the model).
R20=(--sweep model.name=resnet20)
FM=(--sweep data.root=data/fmnist-4k "${R20[@]}")
BOTH=(--sweep data.root=data/fmnist-4k,data/mnist-4k "${R20[@]}")
# 1. the paired comparison that decides the method's claim: combined vs unit-only (alpha 1) vs Taylor
for t in 0.3 0.5; do
  $PY -m launch.submit --config configs/study_variational.yaml --config configs/study_unit_only_a1.yaml \
      --config configs/study_taylor.yaml --sweep method.target_macs=$t "${FM[@]}" "${COMMON[@]}"
done
# 1c. (2026-12-05, session 8) the variational recipes under the drive on both sides, the default since then
#     (docs/results.md, "The training cost"): named and labelled with the key, so the earlier default's runs stay
for t in 0.3 0.5 0.7; do
  for r in variational unit_only_a1; do
    $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_both --sweep method.variational.drive_mode=both \
        --sweep method.target_macs=$t "${FM[@]}" "${COMMON[@]}"
  done
done
# 1d. (session 10) the combined recipe under harden_at 0.5 and patience 1, the defaults since then (docs/results.md,
#     "Ending the stochastic phase sooner"): named and labelled with the keys, so the earlier defaults' runs stay
# (unit_sampled_frac=1 as a plain override: these stages ran before session 14 made 0.5 the default; their names and
# tables stay theirs)
# the session-10 defaults as sweep keys (in run names), shared by the stages below
S10=(--sweep method.variational.drive_mode=both --sweep method.variational.harden_at=0.5 --sweep method.variational.patience=1)
H05P1=("${S10[@]}" method.variational.unit_sampled_frac=1)
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_h05p1 "${H05P1[@]}" \
    --sweep method.target_macs=0.3,0.5,0.7 "${FM[@]}" "${COMMON[@]}"
# 1e. (session 11) under the same defaults: unit-only (alpha 1) at the three budgets, the combined recipe without a
#     target (nu 0.3, the untargeted default) and the combined recipe on MNIST, so that every comparison of the
#     combined method pairs runs under one set of defaults
$PY -m launch.submit --config configs/study_unit_only_a1.yaml method.label=unit_only_a1_h05p1 "${H05P1[@]}" \
    --sweep method.target_macs=0.3,0.5,0.7 "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_nt_h05p1 "${H05P1[@]}" \
    "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_h05p1 "${H05P1[@]}" \
    --sweep method.target_macs=0.3,0.5,0.7 --sweep data.root=data/mnist-4k "${R20[@]}" "${COMMON[@]}"
# 1f. (session 14) half of the examples draw their unit gates (unit_sampled_frac 0.5, the default since, chosen on
#     the validation split: docs/results.md, "Fewer drawn examples"): the combined recipe at the three budgets and
#     without a target, unit-only at 30/50%, the combined recipe on MNIST at 50%, named with the key
F05=("${S10[@]}" --sweep method.variational.unit_sampled_frac=0.5)
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_h05p1_f0.5 "${F05[@]}" \
    --sweep method.target_macs=0.5,0.3 "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_unit_only_a1.yaml method.label=unit_only_a1_h05p1_f0.5 "${F05[@]}" \
    --sweep method.target_macs=0.5,0.3 "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_nt_h05p1_f0.5 "${F05[@]}" \
    "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_h05p1_f0.5 "${F05[@]}" \
    --sweep method.target_macs=0.7 "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_h05p1_f0.5 "${F05[@]}" \
    --sweep method.target_macs=0.5 --sweep data.root=data/mnist-4k "${R20[@]}" "${COMMON[@]}"
# 1g. (session 16) harden_at 0.55, the default since (chosen on the validation split: docs/results.md, "The rule's
#     share under unit_sampled_frac 0.5"): the combined recipe at the three budgets and without a target, unit-only
#     (alpha 1) at 30/50%, named with the keys
S16=(--sweep method.variational.drive_mode=both --sweep method.variational.harden_at=0.55
     --sweep method.variational.patience=1 --sweep method.variational.unit_sampled_frac=0.5)
# h055 DATA...: those rows on the data (and model) sweeps DATA (stages 1g and 1h)
h055() {
  for r in variational unit_only_a1; do
    $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h055 "${S16[@]}" \
        --sweep method.target_macs=0.5,0.3 "$@" "${COMMON[@]}"
  done
  $PY -m launch.submit --config configs/study_variational.yaml method.label=variational_h055 "${S16[@]}" \
      --sweep method.target_macs=0.7 "$@" "${COMMON[@]}"
  $PY -m launch.submit --config configs/study_variational.yaml method.label=variational_nt_h055 "${S16[@]}" "$@" \
      "${COMMON[@]}"
}
h055 "${FM[@]}"
# 1b. the L1-norm filter baseline (Li et al. 2017, on the ranking seam) at the same budgets
$PY -m launch.submit --config configs/study_l1.yaml --sweep method.target_macs=0.3,0.5 "${FM[@]}" "${COMMON[@]}"
# 2. the reference and the other special cases on Fashion-MNIST
$PY -m launch.submit --config configs/study_dense.yaml "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_layer_only.yaml --config configs/study_unit_only.yaml \
    --sweep method.target_macs=0.3,0.5 "${FM[@]}" "${COMMON[@]}"
# 3. depth: ResNet-56 (1 warm-up epoch, 10 epochs: the schedule where dense ResNet-56 trains), 30% and 50%
R56=(model.name=resnet56 train.epochs=10 optim.warmup_epochs=1 --sweep data.root=data/fmnist-4k)
$PY -m launch.submit --config configs/study_variational.yaml --config configs/study_unit_only_a1.yaml \
    --config configs/study_taylor.yaml --sweep method.target_macs=0.3,0.5 "${R56[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_dense.yaml "${R56[@]}" "${COMMON[@]}"
# 3b. (session 8) depth under drive_mode both, the new default, at 30% (issue 22's ResNet-56 criterion)
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_both --sweep method.variational.drive_mode=both \
      --sweep method.target_macs=0.3 "${R56[@]}" "${COMMON[@]}"
done
# 3c. (session 9) depth under drive_mode both at 50%, the budget issue 22 also asks of ResNet-56
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_both --sweep method.variational.drive_mode=both \
      --sweep method.target_macs=0.5 "${R56[@]}" "${COMMON[@]}"
done
# 3d. (session 11) depth at 30% under the session-10 defaults: the combined recipe and unit-only (alpha 1), paired
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h05p1 "${H05P1[@]}" \
      --sweep method.target_macs=0.3 "${R56[@]}" "${COMMON[@]}"
done
# 3e. (session 12) the same at seeds 3-4, so that depth has the 5 paired seeds that dense and Taylor have at 30%
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h05p1 "${H05P1[@]}" \
      --sweep method.target_macs=0.3 "${R56[@]}" "${COMMON[@]:0:6}" --sweep train.seed=3,4
done
# 3f. (session 14) depth at 50% under the session-10 defaults (unit_sampled_frac 1, the default then), paired with 3c's
#     dense and Taylor rows
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h05p1 "${H05P1[@]}" \
      --sweep method.target_macs=0.5 "${R56[@]}" "${COMMON[@]}"
done
# 3g. (session 15) depth under the session-14 defaults (unit_sampled_frac 0.5): the combined recipe and unit-only
#     (alpha 1) at 30% over the 5 seeds dense and Taylor have there, and at 50% over 3, paired with 3c-3f's rows
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h05p1_f0.5 "${F05[@]}" \
      --sweep method.target_macs=0.3 "${R56[@]}" "${COMMON[@]:0:6}" --sweep train.seed=0,1,2,3,4
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h05p1_f0.5 "${F05[@]}" \
      --sweep method.target_macs=0.5 "${R56[@]}" "${COMMON[@]}"
done
# 3h. (session 16) depth under harden_at 0.55 (stage 1g's keys): the combined recipe and unit-only (alpha 1) at 30%
#     over the 5 seeds dense and Taylor have there
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h055 "${S16[@]}" \
      --sweep method.target_macs=0.3 "${R56[@]}" "${COMMON[@]:0:6}" --sweep train.seed=0,1,2,3,4
done
# 3j. (session 17) ResNet-56 at 50% under the current defaults (stage 3h's keys): the combined recipe and unit-only
#     (alpha 1), seeds 0-2, paired with dense and Taylor (stage 3c)
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h055 "${S16[@]}" \
      --sweep method.target_macs=0.5 "${R56[@]}" "${COMMON[@]:0:6}" --sweep train.seed=0,1,2
done
# 3k. (session 19) ResNet-56 at 50%, seeds 3-4: the combined recipe and unit-only (alpha 1) under the current defaults
#     (stage 3j's keys) and Taylor, so that depth at 50% has the 5 paired seeds it has at 30% (dense: stage 3's seeds)
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h055 "${S16[@]}" \
      --sweep method.target_macs=0.5 "${R56[@]}" "${COMMON[@]:0:6}" --sweep train.seed=3,4
done
$PY -m launch.submit --config configs/study_taylor.yaml --sweep method.target_macs=0.5 "${R56[@]}" "${COMMON[@]:0:6}" \
    --sweep train.seed=3,4
# 3m. (session 19) ResNet-56 without a target (the untargeted default, nu 0.3) and at 70%, seeds 0-2, under the
#     current defaults: depth at the two operating points it had not run, paired with stage 3's dense
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_nt_h055 "${S16[@]}" "${R56[@]}" \
    "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_h055 "${S16[@]}" \
    --sweep method.target_macs=0.7 "${R56[@]}" "${COMMON[@]}"
# 3n. (sessions 20-21) ResNet-56 at 70%, seeds 0-2: unit-only (alpha 1) under the current defaults and Taylor, the
#     pair that says whether stage 3m's -0.84 under dense at 70% is the method's or the budget's
$PY -m launch.submit --config configs/study_unit_only_a1.yaml method.label=unit_only_a1_h055 "${S16[@]}" \
    --sweep method.target_macs=0.7 "${R56[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_taylor.yaml --sweep method.target_macs=0.7 "${R56[@]}" "${COMMON[@]}"
# 3o. (session 21) the machine that ran stages 3m-3n's first part was lost with its runs and data; on the new one
#     the combined run of seed 1 came out 1.84 points from its recorded value (same commit, recipe, rebuilt shards),
#     so pairs across machines are pairs in seed only. Stage 3m's 70% part and stage 3n again into one root, dense
#     with them, so the 70% table is paired on one machine (stage 3n's Taylor rows are this machine's already).
R3O=("${COMMON[@]:0:3}" "run.root=${ROOT}-3o" "launch.folder=${ROOT}-3o/submitit/%j" "${COMMON[@]:5}")
$PY -m launch.submit --config configs/study_dense.yaml "${R56[@]}" "${R3O[@]}"
for r in variational unit_only_a1; do
  $PY -m launch.submit --config configs/study_$r.yaml method.label=${r}_h055 "${S16[@]}" \
      --sweep method.target_macs=0.7 "${R56[@]}" "${R3O[@]}"
done
# 1i. (session 22) ResNet-20 again on one machine and one commit, seeds 0-4, the recipes' own defaults (no sweep keys):
#     dense, then the combined recipe, unit-only (alpha 1) and Taylor at 50% and 30%, into their own root
R1I=("${COMMON[@]:0:3}" "run.root=${ROOT}-1i" "launch.folder=${ROOT}-1i/submitit/%j" data.eval_split=test
     --sweep train.seed=0,1,2,3,4 model.name=resnet20 data.root=data/fmnist-4k)
$PY -m launch.submit --config configs/study_dense.yaml "${R1I[@]}"
for t in 0.5 0.3; do
  for r in variational unit_only_a1 taylor; do
    $PY -m launch.submit --config configs/study_$r.yaml --sweep method.target_macs=$t "${R1I[@]}"
  done
done
# 1j. (session 23) the fold at the rounding on by default (harden_fold): the combined recipe and unit-only at 50% and
#     30%, seeds 0-4, into their own root; paired with stage 1i's dense and Taylor rows (the same machine)
R1J=("${COMMON[@]:0:3}" "run.root=${ROOT}-1j" "launch.folder=${ROOT}-1j/submitit/%j" data.eval_split=test
     --sweep train.seed=0,1,2,3,4 model.name=resnet20 data.root=data/fmnist-4k)
for t in 0.5 0.3; do
  for r in variational unit_only_a1; do
    $PY -m launch.submit --config configs/study_$r.yaml --sweep method.target_macs=$t "${R1J[@]}"
  done
done
# 1k. (session 24) the combined recipe without a target under session 23's defaults (nu 0.3), and nu 0.2, seeds 0-4,
#     into their own root; paired with stage 1i's dense rows (the same machine). nu was compared on the validation
#     split first: bench/study_grid.sh stage 1k-val below is that comparison.
R1K=("${COMMON[@]:0:3}" "run.root=${ROOT}-1k" "launch.folder=${ROOT}-1k/submitit/%j" data.eval_split=test
     --sweep train.seed=0,1,2,3,4 model.name=resnet20 data.root=data/fmnist-4k)
$PY -m launch.submit --config configs/study_variational.yaml method.label=variational_nt "${R1K[@]}"
$PY -m launch.submit --config configs/study_variational.yaml --sweep method.variational.nu=0.2 "${R1K[@]}"
# 1k-val. the untargeted nu on the validation split (0.2 and 0.3, seeds 0-4)
$PY -m launch.submit --config configs/study_variational.yaml --sweep method.variational.nu=0.2,0.3 \
    "${COMMON[@]:0:3}" "run.root=${ROOT}-1k-val" "launch.folder=${ROOT}-1k-val/submitit/%j" data.eval_split=val \
    --sweep train.seed=0,1,2,3,4 model.name=resnet20 data.root=data/fmnist-4k
# 1l. (session 25) ResNet-20 at 70% under the current defaults (the fold on): the combined recipe, unit-only (alpha 1)
#     and Taylor, seeds 0-4, into their own root; paired with stage 1i's dense rows (the same machine)
R1L=("${COMMON[@]:0:3}" "run.root=${ROOT}-1l" "launch.folder=${ROOT}-1l/submitit/%j" data.eval_split=test
     --sweep train.seed=0,1,2,3,4 model.name=resnet20 data.root=data/fmnist-4k)
for r in variational unit_only_a1 taylor; do
  $PY -m launch.submit --config configs/study_$r.yaml --sweep method.target_macs=0.7 "${R1L[@]}"
done
# 1h. (session 18) MNIST under the current defaults (stage 1g's keys): the combined recipe at the three budgets and
#     without a target, unit-only (alpha 1) at 30/50%, paired with stage 4's MNIST rows (dense, Taylor)
h055 --sweep data.root=data/mnist-4k "${R20[@]}"
# 4. the 70% budget, MNIST, EGP at its own operating points
$PY -m launch.submit --config configs/study_variational.yaml --config configs/study_unit_only_a1.yaml \
    --config configs/study_taylor.yaml --config configs/study_layer_only.yaml --config configs/study_unit_only.yaml \
    --sweep method.target_macs=0.7 "${FM[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_dense.yaml --sweep data.root=data/mnist-4k "${R20[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_variational.yaml --config configs/study_unit_only_a1.yaml \
    --config configs/study_taylor.yaml --config configs/study_layer_only.yaml --config configs/study_unit_only.yaml \
    --sweep method.target_macs=0.3,0.5,0.7 --sweep data.root=data/mnist-4k "${R20[@]}" "${COMMON[@]}"
$PY -m launch.submit --config configs/study_egp.yaml --sweep method.egp.iterations=1,3 "${BOTH[@]}" "${COMMON[@]}"
