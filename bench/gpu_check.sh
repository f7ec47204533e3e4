#!/usr/bin/env bash
# The GPU check, ready in one device call: at most 8 minutes on one H100 or H200, figures back in $OUT.
#
# The device call (from a session whose task is lent a GPU). The call sends the checkout the session started in, not
# a helper's worktree: this script and .whl/ must be in that checkout.
#   1. here, once:   bench/gpu_wheels.sh          (fills the git-ignored .whl/ with the wheels the GPU image lacks)
#   2. device run:   command   "bash bench/gpu_check.sh"
#                    carry     [".whl"]
#                    timeout_s 560
#   3. here:         python bench/gpu_check_report.py <files_at>/gpu_check.json
#                    (rewrites the gpu-check block of docs/performance.md and the gpu-check line of README.md)
#
# What it runs (bench/gpu_check.py, one process per part, each under its own hard timeout so a part that fails or
# runs long leaves the others' figures):
#   env               the GPU, driver and library versions
#   clip-build        CLIP ViT-B/32-shaped pool: random seeded CLIPModel, 8 low-rank fine-tuned vision towers,
#                     8 tasks of random 256 px images (datasets save_to_disk)
#   clip-adamerge     adamerge experiment=clip_vit_b32_8tasks, 1000 steps, 8 tasks x 16 images: s/step, peak CUDA
#   clip-fusionbench  FusionBench 0.2.33's CLIPLayerWiseAdaMergingAlgorithm on the same pool, steps, batch, lr
#   llm-build         Qwen2.5-1.5B-shaped causal-LM pool (bench/llm_pool.py): bf16, K=4 low-rank fine-tunes
#   llm-adamerge      adamerge experiment=causal_lm_qwen25_1p5b, end-to-end layer-wise AdaMerging, 10 steps
#   llm-progressive   the same pool, method=progressive_distillation (2 steps per block)
#   llm-streamed      the same as llm-adamerge with modelpool.streaming=disk (last: runs if time is left)
# then `gpu_check.py summary` writes $OUT/gpu_check.json and $OUT/gpu_check.md (also printed) and the log.
#
# Settings (environment): GPU_CHECK_SMOKE=1 tiny shapes and a few steps on whatever device is there (the CPU test:
# tests/test_gpu_check.py); GPU_CHECK_SECONDS total budget (default 470 s, under the 8 minutes); GPU_CHECK_WORK
# scratch folder (default /tmp/gpu_check, emptied first); OUT where results go (default $GPU_CHECK_WORK/out);
# PYTHON the interpreter (default python3: the GPU image's /opt/torch/.venv one).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-470}
PYTHON=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
OUT=${OUT:-$WORK/out}
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then PRESET=smoke; else PRESET=gpu; fi
rm -rf "$WORK"
mkdir -p "$WORK/parts" "$WORK/logs" "$OUT"
LOG="$WORK/logs/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

# part name -> its own time limit in seconds (the gpu preset; the smoke preset's parts take seconds)
declare -A BUDGET=([env]=40 [clip-build]=60 [clip-adamerge]=140 [clip-fusionbench]=140 [llm-build]=80
                   [llm-adamerge]=80 [llm-progressive]=80 [llm-streamed]=80)
ORDER=(env clip-build clip-adamerge clip-fusionbench llm-build llm-adamerge llm-progressive llm-streamed)
# Seconds kept back for each part point 7 of the issue needs, while the parts before it run: the CLIP parts may not
# eat the causal-LM parts' time (their budgets add up to more than the total; llm-streamed runs on what is left).
declare -A KEEP=([llm-build]=60 [llm-adamerge]=50 [llm-progressive]=50)
RESERVE=15      # seconds kept for the summary
MIN_START=20    # a part is not started with less than this left

# 1. the wheels the image lacks (bench/gpu_wheels.sh), each unless the same version is already installed
if compgen -G ".whl/*.whl" >/dev/null; then
  mapfile -t missing < <("$PYTHON" - .whl/*.whl <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
for wheel in sys.argv[1:]:
    name, wheel_version = Path(wheel).name.split("-")[:2]
    try:
        if version(name) == wheel_version:
            continue
    except PackageNotFoundError:
        pass
    print(wheel)
EOF
  )
  if [ ${#missing[@]} -gt 0 ]; then
    SITE="$WORK/site"
    echo "gpu_check: installing ${#missing[@]} wheels into $SITE: ${missing[*]##*/}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${missing[@]}" || echo "gpu_check: installing the wheels failed; the parts that need them will say so"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "gpu_check: no .whl/ here (bench/gpu_wheels.sh makes it); using what $PYTHON has"
fi
export PYTHONUNBUFFERED=1

# 2. the parts, each under min(its budget, what is left of the total)
for i in "${!ORDER[@]}"; do
  part=${ORDER[$i]}
  now=$(date +%s)
  left=$(( TOTAL - (now - START) - RESERVE ))
  for later in "${ORDER[@]:$((i + 1))}"; do left=$(( left - ${KEEP[$later]:-0} )); done
  limit=${BUDGET[$part]}
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt "$MIN_START" ]; then
    echo "gpu_check: $part skipped, $left s left of $TOTAL s"
    printf '{"state": "skipped", "seconds_left": %d}\n' "$left" > "$WORK/parts/$part.status"
    continue
  fi
  echo "gpu_check: $part (limit $limit s)"
  began=$(date +%s)
  # SIGTERM at the limit to the part alone (--foreground): it stops its adamerge run (which saves a checkpoint at the
  # step boundary) or FusionBench's loop and writes the figures of the steps done; SIGKILL 10 s later if it has not
  # (its adamerge child dies with it: gpu_check.py sets PR_SET_PDEATHSIG)
  timeout --foreground -k 10 "$limit" "$PYTHON" bench/gpu_check.py "$part" --work "$WORK" --preset "$PRESET" \
    > "$WORK/logs/$part.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - began ))
  tail -n 3 "$WORK/logs/$part.log"
  if [ $rc -eq 0 ]; then state=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state="timed out"; else state=failed; fi
  echo "gpu_check: $part $state (exit $rc) in $took s"
  printf '{"state": "%s", "exit": %d, "seconds": %d, "limit_s": %d}\n' "$state" "$rc" "$took" "$limit" \
    > "$WORK/parts/$part.status"
done

# 3. the summary, and the logs (one file: $OUT keeps at most 8 files)
"$PYTHON" bench/gpu_check.py summary --work "$WORK" --out "$OUT" || echo "gpu_check: the summary failed"
for f in "$WORK"/logs/*.log; do [ "$f" = "$LOG" ] || { echo "===== ${f##*/}"; tail -c 200000 "$f"; }; done \
  > "$OUT/gpu_check_parts.log"
echo "gpu_check: done in $(( $(date +%s) - START )) s; results in $OUT"
cp "$LOG" "$OUT/gpu_check.log"
