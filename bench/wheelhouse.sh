#!/usr/bin/env bash
# Build the GPU suite's wheelhouse here, before a GPU machine is at hand (that machine may have torch and no
# package registry): every package of bench/gpu_suite_requirements.txt at its constraints.txt version, as
# wheels for each Python of WHEELHOUSE_PYTHONS, plus this project as a wheel; at most 60 MB. Then copy the
# checkout (with bench/wheelhouse/) to the GPU machine and run bash bench/gpu_suite.sh there.
#
#     bash bench/wheelhouse.sh                      # -> bench/wheelhouse/ (Pythons 3.10, 3.11, 3.12)
#     WHEELHOUSE_PYTHONS=3.11 bash bench/wheelhouse.sh /tmp/wh
#
# DeepSpeed is published as a source archive only: it is built into a pure-Python wheel here, with this
# venv's torch (its setup imports torch; its kernels are compiled on first use, not at build time).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-bench/wheelhouse}"
PYTHONS="${WHEELHOUSE_PYTHONS:-3.10 3.11 3.12}"
LIMIT_MB="${WHEELHOUSE_LIMIT_MB:-60}"
PY="${PYTHON:-.venv/bin/python}"
REQ=bench/gpu_suite_requirements.txt
log() { echo "[wheelhouse] $*" >&2; }

[ -x "$PY" ] || { log "no $PY: run make install first (or set PYTHON)"; exit 2; }
pins="$(mktemp)"; trap 'rm -f "$pins"' EXIT
# each requirement with its pinned version (constraints.txt); a requirement without a pin is an error
while read -r name; do
  pin="$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt | head -1 || true)"
  [ -n "$pin" ] || { log "$name (in $REQ) has no version in constraints.txt"; exit 2; }
  echo "$pin" >>"$pins"
done < <(grep -v -E '^\s*(#|$)' "$REQ")

tmp="$OUT.tmp"
rm -rf "$tmp"; mkdir -p "$tmp"
log "building the project's wheel and DeepSpeed's"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" . "$(grep -i '^deepspeed==' "$pins")"
for v in $PYTHONS; do
  log "binary wheels for CPython $v (manylinux x86_64)"
  grep -v -i '^deepspeed==' "$pins" | "$PY" -m pip download -q --no-deps --only-binary=:all: \
      --python-version "$v" --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" -r /dev/stdin
done
mb=$(( $(du -sk "$tmp" | cut -f1) / 1024 ))
if [ "$mb" -gt "$LIMIT_MB" ]; then
  log "the wheelhouse is $mb MB, over the $LIMIT_MB MB limit (WHEELHOUSE_LIMIT_MB); $tmp kept to look at"
  exit 1
fi
rm -rf "$OUT"; mv "$tmp" "$OUT"
log "$OUT: $(ls "$OUT" | wc -l) wheels, $mb MB, for CPython $PYTHONS"
