"""Turn the gpu_check.json that bench/gpu_check.sh returns from a GPU machine into the docs' figures.

Rewrites the ``gpu-check`` block of docs/performance.md (the table of every part, the GPU named) and the
``gpu-check-line`` block of README.md (one line). ``gpu_check.py summary`` uses :func:`summary_markdown` for the
gpu_check.md it writes next to the JSON.

    python bench/gpu_check_report.py /work/.device/.../gpu_check.json     # after the device call
    python bench/gpu_check_report.py --pending                            # the blocks before any GPU run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's adamerge (replace_marked_block)
PAGE = ROOT / "docs" / "performance.md"  # the page holding this script's generated block
GENERATOR = "bench/gpu_check_report.py"
LLM_ROWS = {  # part -> what it runs
    "llm-adamerge": "adamerge layer-wise AdaMerging, task vectors in memory",
    "llm-streamed": "adamerge layer-wise AdaMerging, modelpool.streaming=disk",
    "llm-progressive": "adamerge progressive distillation (block by block)",
}
PENDING = ("No GPU run yet: `bash bench/gpu_check.sh` (the device call is at the top of that script) returns "
           f"gpu_check.json, and `python {GENERATOR} gpu_check.json` writes its figures here.")


def _number(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def gpu_line(summary: dict[str, Any]) -> str:
    """'NVIDIA H100 80GB HBM3 (79.2 GiB, driver 580.159.04), torch 2.11.0+cu130' or the CPU the smoke ran on."""
    env = (summary["parts"].get("env") or {}).get("result")
    if not env:
        return "an unrecorded machine (the env part did not run)"
    versions = env.get("versions") or {}
    gpu = env.get("gpu")
    if gpu:
        driver = ""
        if gpu.get("nvidia_smi"):
            fields = [f.strip() for f in gpu["nvidia_smi"].split(",")]
            driver = f", driver {fields[1]}" if len(fields) > 1 else ""
        where = f"{gpu['name']} ({gpu['memory_gib']:.1f} GiB{driver}, CUDA {gpu.get('cuda')})"
    else:
        where = f"no GPU: {env.get('cpu') or 'CPU'}, {env.get('cpu_count')} CPUs"
    return (f"{where}, torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
            f"lightning {versions.get('lightning')}, {env.get('preset')} preset, {env.get('date')}")


def _status(entry: dict[str, Any]) -> str:
    status = entry.get("status") or {}
    state = status.get("state", "not run")
    if state == "ok":
        return "ok"
    if state == "skipped":
        return f"skipped ({status.get('seconds_left')} s left)"
    if state == "not run":  # gpu_check.sh never reached it (the call ended first)
        return state
    partial = (entry.get("result") or {}).get("partial")
    if partial:
        return f"{state} after {status.get('seconds')} s (limit {status.get('limit_s')} s): {partial}"
    reason = ""
    tail = (entry.get("error_tail") or "").strip().splitlines()
    errors = [line for line in tail if "Error" in line or "error" in line]
    if errors:
        reason = ": " + errors[-1].strip()[:160].replace("|", "/")
    return f"{state} after {status.get('seconds')} s (limit {status.get('limit_s')} s){reason}"


def _row(what: str, run: str, entry: dict[str, Any]) -> str:
    result = entry.get("result") or {}
    wall = result.get("process_seconds", result.get("part_seconds"))
    return (f"| {what} | {run} | {_number(result.get('steps'), 'd')} | {_number(result.get('seconds_per_step'), '.3f')} | "
            f"{_number(result.get('peak_memory_mib'), ',.0f')} | {_number(result.get('peak_rss_mib'), ',.0f')} | "
            f"{_number(wall, '.0f')} | {_status(entry)} |")


def clip_shape(summary: dict[str, Any]) -> str:
    """'CLIP ViT-B/32 shape', or the smoke preset's toy shape."""
    clip = (summary["parts"].get("clip-build") or {}).get("result") or {}
    return "CLIP ViT-B/32 shape" if clip.get("shape", {}).get("vision", {}).get("hidden_size") == 768 \
        else "CLIP (smoke shape)"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The table of every part's figures, the machine named, and the FusionBench/adamerge ratio."""
    parts = summary["parts"]
    llm = (parts.get("llm-build") or {}).get("result") or {}
    batch = ((parts.get("clip-adamerge") or {}).get("result") or {}).get("batch_per_task", "?")
    clip_what = f"{clip_shape(summary)}, 8 tasks × {batch} images"
    llm_what = (f"{llm['shape']} shape ({llm['parameters']:,d} parameters), K = {len(llm['tasks'])}, "
                f"{llm['storage_dtype']}") if llm else "causal-LM pool (not built)"
    lines = [
        f"Machine: {gpu_line(summary)}.",
        "",
        "| pool | run | steps | s / step | peak GPU MiB | peak host RSS MiB | wall s | status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        _row(clip_what, "adamerge `experiment=clip_vit_b32_8tasks` (layer-wise AdaMerging)", parts.get("clip-adamerge", {})),
        _row(clip_what, "FusionBench " + str((parts.get("clip-fusionbench") or {}).get("result", {}).get("fusion_bench", ""))
             + " `CLIPLayerWiseAdaMergingAlgorithm`", parts.get("clip-fusionbench", {})),
        *[_row(llm_what, run, parts.get(part, {})) for part, run in LLM_ROWS.items()],
        "",
    ]
    ratio = (summary.get("derived") or {}).get("clip_fusionbench_over_adamerge")
    if ratio is not None:
        lines.append(f"FusionBench's seconds per step over adamerge's, same pool, steps and batch: {ratio:.2f}.")
    builds = [f"{name} {entry['result']['build_seconds']:.0f} s" for name, entry in
              (("CLIP pool", parts.get("clip-build", {})), ("causal-LM pool", parts.get("llm-build", {})))
              if entry.get("result")]
    if builds:
        lines.append("Pools built (random seeded weights, written with save_pretrained) in: " + ", ".join(builds) + ".")
    for part in ("env", "clip-build", "llm-build"):  # the parts without a row of their own
        if (parts.get(part) or {}).get("status", {}).get("state", "not run") != "ok":
            lines.append(f"`{part}`: {_status(parts.get(part) or {})}.")
    ours = (parts.get("clip-adamerge") or {}).get("result") or {}
    theirs = (parts.get("clip-fusionbench") or {}).get("result") or {}
    if ours.get("profile_seconds_per_step") or theirs.get("steady_seconds_per_step"):
        lines.append(f"Within the CLIP runs: adamerge's own step profile (results.json, CUDA events) "
                     f"{_number(ours.get('profile_seconds_per_step'), '.4f')} s/step; FusionBench's steps 2 to N "
                     f"{_number(theirs.get('steady_seconds_per_step'), '.4f')} s/step (its first step "
                     f"{_number(theirs.get('first_step_seconds'), '.1f')} s, starting its data loaders).")
    plans = []
    for part in ("clip-adamerge", *LLM_ROWS):
        result = (parts.get(part) or {}).get("result") or {}
        planned = (result.get("memory_plan") or {}).get("device")
        if planned and result.get("peak_memory_mib") is not None:
            plans.append(f"{part} {planned} planned, {result['peak_memory_mib'] / 1024:.2f} GiB measured")
    if plans:
        lines.append("adamerge's memory plan (printed before loading) against the measured peak GPU memory: "
                     + "; ".join(plans) + ".")
    lines.append("s / step: the wall time of the learning loop over its steps -- adamerge's Lightning `fit` loop "
                 "(`run_training_epoch` of Lightning's SimpleProfiler), FusionBench's `test_time_adaptation` loop "
                 "after its zero-shot heads are built (to a timestamp after the last step's `loss.item()`). Peak "
                 "GPU: `torch.cuda.max_memory_allocated` in each process; peak host RSS: each process's own peak "
                 "resident memory; wall: the whole process, imports, loading and evaluation included.")
    return "\n".join(lines)


def readme_line(summary: dict[str, Any]) -> str:
    parts = summary["parts"]
    env = (parts.get("env") or {}).get("result") or {}
    gpu = (env.get("gpu") or {}).get("name") or "no GPU (CPU smoke preset)"
    ours = (parts.get("clip-adamerge") or {}).get("result") or {}
    theirs = (parts.get("clip-fusionbench") or {}).get("result") or {}
    llm = (parts.get("llm-adamerge") or {}).get("result") or {}
    pieces = []
    if ours.get("seconds_per_step"):
        text = f"{clip_shape(summary)}: layer-wise AdaMerging {ours['seconds_per_step']:.3f} s/step"
        if theirs.get("seconds_per_step"):
            text += f" (FusionBench {theirs['seconds_per_step']:.3f})"
        pieces.append(text)
    if llm.get("seconds_per_step"):
        pieces.append(f"{llm['shape']} shape causal LM: {llm['seconds_per_step']:.2f} s/step, "
                      f"{_number(llm.get('peak_memory_mib'), ',.0f')} MiB peak GPU memory")
    figures = "; ".join(pieces) if pieces else "no part produced figures"
    return f"GPU check on {gpu}: {figures} ([performance](docs/performance.md#gpu-check), `{GENERATOR}`)."


def blocks(summary: dict[str, Any] | None) -> tuple[str, str]:
    """The gpu-check block (docs/performance.md) and the gpu-check-line block (README.md); None: no GPU run yet."""
    if summary is None:
        return PENDING, f"GPU check: not run on a GPU yet (`bench/gpu_check.sh`, `{GENERATOR}`)."
    table = summary_markdown(summary) + f"\n\nGenerated by `python {GENERATOR}` from the gpu_check.json of `bash bench/gpu_check.sh`."
    return table, readme_line(summary)


def load_summary(path: Path, allow_cpu: bool) -> dict[str, Any]:
    summary = json.loads(Path(path).read_text())
    if not isinstance(summary, dict) or "parts" not in summary:
        raise SystemExit(f"{path} is not a gpu_check.json (no 'parts'): pass the file bench/gpu_check.sh wrote to $OUT")
    env = (summary["parts"].get("env") or {}).get("result") or {}
    if not env.get("gpu") and not allow_cpu:
        raise SystemExit(f"{path} was not measured on a GPU (env part: {env.get('preset', 'missing')} preset, no GPU); "
                         "the docs take GPU figures only (--allow-cpu writes it anyway, for tests)")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", nargs="?", type=Path, help="the gpu_check.json from $OUT")
    parser.add_argument("--pending", action="store_true", help="write the blocks' text for 'no GPU run yet'")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page with the gpu-check block")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the file with the gpu-check-line block")
    parser.add_argument("--allow-cpu", action="store_true", help="accept a run without a GPU (the smoke preset)")
    args = parser.parse_args(argv)
    if args.pending == (args.summary is not None):
        parser.error("give either a gpu_check.json or --pending")
    from adamerge.reporting.results import replace_marked_block

    table, line = blocks(None if args.pending else load_summary(args.summary, args.allow_cpu))
    replace_marked_block(args.page, "gpu-check", table)
    replace_marked_block(args.readme, "gpu-check-line", line)
    print(f"wrote the gpu-check block of {args.page} and the gpu-check-line block of {args.readme}")


if __name__ == "__main__":
    main()
