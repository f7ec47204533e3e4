#!/usr/bin/env bash
# The package as a user installs it: build the wheel and sdist (twine check), install the wheel alone in a venv
# of its own, and from a directory outside the checkout run a short job on the user's own pool and data
# (--config-dir groups beside the shipped ones), the HTML report, and load_merged on its export.
#   .ci/installed_run.sh PYTHON WORKDIR   (PYTHON: an interpreter with `build` and `twine`)
set -euo pipefail
python="$1"
work="$(mkdir -p "$2" && cd "$2" && pwd)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "$work/dist" "$work/venv" "$work/outside"
"$python" -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$python" -m twine check --strict "$work/dist"/*
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0 "$work/dist"/adamerge-*.whl
mkdir -p "$work/outside" && cd "$work/outside"
export PATH="$work/venv/bin:$PATH" ADAMERGE_CACHE_DIR="$work/outside/cache"
# A tiny zoo in the demo's formats, and the user's groups pointing at its files by plain paths. Never the repo's
# tree: python runs from here, so `adamerge` is the installed wheel.
python - <<'PY'
from pathlib import Path

import adamerge
from adamerge.demo.zoo import build_demo_zoo
from adamerge.methods.configs import CONF_DIR

assert "site-packages" in adamerge.__file__ and "site-packages" in str(CONF_DIR), (adamerge.__file__, CONF_DIR)
zoo = build_demo_zoo(recipe={"train_size": 48, "test_size": 32, "probe": {"C": 1.0, "max_iter": 50},
                             "finetune": {"steps": 3, "batch_size": 8, "lr": 1e-3, "optimizer": "adam",
                                          "schedule": "cosine"}}, progress=False)
for group, name in (("modelpool", "my_pool"), ("data", "my_data")):
    (Path("mine") / group).mkdir(parents=True, exist_ok=True)
    text = (CONF_DIR / group / "demo.yaml").read_text().replace("${zoo_dir}", str(zoo))
    (Path("mine") / group / f"{name}.yaml").write_text(text)
PY
adamerge --cfg job > /dev/null  # the shipped demo configuration composes
adamerge --config-dir ./mine modelpool=my_pool data=my_data method=adamerging_task_wise trainer.max_steps=2 \
  logger=csv num_threads=1 data.batch_size=8 trainer.enable_progress_bar=false hydra.run.dir=run
adamerge-report run
test -s run/report.html
python -c "import adamerge; print('reloaded tasks:', adamerge.load_merged('run/merged_model').tasks)"
