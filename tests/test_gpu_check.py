"""bench/gpu_check.sh's pieces that run without a GPU: the report from a returned gpu_check.json, the causal-LM pool
builder, and the overrides the parts give the adamerge command (composed against the shipped experiments).
The whole script runs here with ``GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh`` (minutes: not part of the suite)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "bench"))  # gpu_check imports its sibling llm_pool
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def sample_summary() -> dict:
    """A gpu_check.json as `gpu_check.py summary` writes it: every part's status and result, one part timed out."""
    def ok(seconds: int) -> dict:
        return {"state": "ok", "exit": 0, "seconds": seconds, "limit_s": 140}

    return {
        "parts": {
            "env": {"status": ok(6), "result": {
                "preset": "gpu", "date": "2026-12-07T10:00:00+00:00", "cpu_count": 16,
                "versions": {"torch": "2.11.0+cu130", "transformers": "5.17.0", "lightning": "2.6.6"},
                "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.19, "cuda": "13.0",
                        "nvidia_smi": "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB"}}},
            "clip-build": {"status": ok(31), "result": {"shape": {"vision": {"hidden_size": 768}}, "build_seconds": 24.2}},
            "clip-adamerge": {"status": ok(95), "result": {"steps": 1000, "seconds_per_step": 0.0612,
                                                           "profile_seconds_per_step": 0.0588,
                                                           "peak_memory_mib": 5321.4, "peak_rss_mib": 4410.0,
                                                           "process_seconds": 92.3, "batch_per_task": 16}},
            "clip-fusionbench": {"status": ok(120), "result": {"steps": 1000, "seconds_per_step": 0.0918,
                                                               "steady_seconds_per_step": 0.0901,
                                                               "first_step_seconds": 4.2,
                                                               "peak_memory_mib": 7012.9, "peak_rss_mib": 3900.0,
                                                               "part_seconds": 110.0,
                                                               "fusion_bench": "0.2.33"}},
            "llm-build": {"status": ok(40), "result": {"shape": "qwen2.5-1.5b", "parameters": 1543714304,
                                                       "tasks": ["instruct", "math", "code", "chat"],
                                                       "storage_dtype": "bfloat16", "build_seconds": 35.5}},
            "llm-adamerge": {"status": ok(70), "result": {"steps": 10, "seconds_per_step": 0.412, "shape": "qwen2.5-1.5b",
                                                          "peak_memory_mib": 31020.0, "peak_rss_mib": 20500.0,
                                                          "memory_plan": {"host": "23.4 GiB", "device": "33.1 GiB"},
                                                          "process_seconds": 66.0}},
            "llm-progressive": {"status": {"state": "timed out", "exit": 124, "seconds": 80, "limit_s": 80},
                                "error_tail": "loading\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"},
            "llm-streamed": {"status": {"state": "skipped", "seconds_left": 12}},
        },
        "derived": {"clip_fusionbench_over_adamerge": 0.0918 / 0.0612},
    }


@pytest.fixture
def docs(tmp_path) -> tuple[Path, Path]:
    page, readme = tmp_path / "performance.md", tmp_path / "README.md"
    shutil.copy(ROOT / "docs" / "performance.md", page)
    shutil.copy(ROOT / "README.md", readme)
    return page, readme


def _block(path: Path, name: str) -> str:
    return path.read_text().split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def test_report_writes_the_gpu_figures_into_both_blocks(tmp_path, docs):
    report = _bench("gpu_check_report")
    page, readme = docs
    summary = tmp_path / "gpu_check.json"
    summary.write_text(json.dumps(sample_summary()))
    report.main([str(summary), "--page", str(page), "--readme", str(readme)])
    table = _block(page, "gpu-check")
    assert "NVIDIA H100 80GB HBM3 (79.2 GiB, driver 580.159.04, CUDA 13.0), torch 2.11.0+cu130" in table
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ") and " | " in line}
    clip = rows["adamerge `experiment=clip_vit_b32_8tasks` (layer-wise AdaMerging)"]
    assert "CLIP ViT-B/32 shape, 8 tasks × 16 images" in clip and "| 1000 | 0.061 | 5,321 | 4,410 | 92 | ok |" in clip
    assert "| 1000 | 0.092 | 7,013 | 3,900 | 110 | ok |" in rows["FusionBench 0.2.33 `CLIPLayerWiseAdaMergingAlgorithm`"]
    assert "qwen2.5-1.5b shape (1,543,714,304 parameters), K = 4, bfloat16" in rows[
        "adamerge layer-wise AdaMerging, task vectors in memory"]
    assert rows["adamerge progressive distillation (block by block)"].endswith(
        "timed out after 80 s (limit 80 s): torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB |")
    assert rows["adamerge layer-wise AdaMerging, modelpool.streaming=disk"].endswith("skipped (12 s left) |")
    assert "FusionBench's seconds per step over adamerge's, same pool, steps and batch: 1.50." in table
    assert ("adamerge's own step profile (results.json, CUDA events) 0.0588 s/step; FusionBench's steps 2 to N "
            "0.0901 s/step (its first step 4.2 s" in table)
    assert ("adamerge's memory plan (printed before loading) against the measured peak GPU memory: "
            "llm-adamerge 33.1 GiB planned, 30.29 GiB measured." in table)
    assert "`python bench/gpu_check_report.py`" in table  # the block names its generator (tests/test_docs.py)
    line = _block(readme, "gpu-check-line").strip()
    assert line.startswith("GPU check on NVIDIA H100 80GB HBM3: CLIP ViT-B/32 shape: layer-wise AdaMerging 0.061 s/step "
                           "(FusionBench 0.092); qwen2.5-1.5b shape causal LM: 0.41 s/step, 31,020 MiB peak GPU memory")
    assert len(line.splitlines()) == 1
    # The rest of both files is untouched.
    original = (ROOT / "docs" / "performance.md").read_text()
    assert page.read_text().split("<!-- gpu-check:start -->")[0] == original.split("<!-- gpu-check:start -->")[0]


def test_report_refuses_a_cpu_run_and_a_file_that_is_not_a_summary(tmp_path, docs):
    report = _bench("gpu_check_report")
    page, readme = docs
    cpu = sample_summary()
    cpu["parts"]["env"]["result"].update(gpu=None, preset="smoke", cpu="AMD EPYC")
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(cpu))
    with pytest.raises(SystemExit, match="not measured on a GPU"):
        report.main([str(path), "--page", str(page), "--readme", str(readme)])
    assert page.read_text() == (ROOT / "docs" / "performance.md").read_text()
    report.main([str(path), "--page", str(page), "--readme", str(readme), "--allow-cpu"])
    assert "Machine: no GPU: AMD EPYC, 16 CPUs" in _block(page, "gpu-check")
    assert "GPU check on no GPU (CPU smoke preset)" in _block(readme, "gpu-check-line")
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="is not a gpu_check.json"):
        report.main([str(path), "--page", str(page), "--readme", str(readme)])


def test_pending_blocks_are_what_the_docs_hold():
    """The committed blocks are the script's own --pending text (no figures before a GPU run)."""
    report = _bench("gpu_check_report")
    table, line = report.blocks(None)
    assert _block(ROOT / "docs" / "performance.md", "gpu-check").strip() == table
    assert _block(ROOT / "README.md", "gpu-check-line").strip() == line


def test_llm_pool_fine_tunes_are_low_rank_and_tied(tmp_path):
    import datasets
    import torch
    import transformers
    from safetensors.torch import load_file

    llm_pool = _bench("llm_pool")
    pool = llm_pool.build_causal_lm_pool(tmp_path, shape="tiny", tasks=2, rank=3, storage_dtype="float32",
                                         prompts_per_task=5, prompt_words=10)
    assert pool["tasks"] == ["instruct", "math"] and pool["parameters"] > 0
    base = load_file(Path(pool["paths"]["pretrained"]) / "model.safetensors")
    tuned = load_file(Path(pool["paths"]["finetuned"]["math"]) / "model.safetensors")
    assert set(tuned) == set(base) and "lm_head.weight" not in tuned  # tied: the embedding is the LM head
    for name, weight in base.items():
        delta = (tuned[name].double() - weight.double())
        assert delta.abs().max() > 0, name
        if weight.ndim == 2:
            singular = torch.linalg.svdvals(delta)
            assert singular[3] < 1e-4 * singular[0], name  # rank 3, up to float32 rounding
    model = transformers.AutoModelForCausalLM.from_pretrained(pool["paths"]["finetuned"]["math"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pool["paths"]["pretrained"])
    prompts = datasets.load_from_disk(pool["paths"]["data"]["math"])["test"]["text"]
    assert len(prompts) == 5
    ids = tokenizer(list(prompts))["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)  # every generated word is in the vocabulary
    assert max(max(row) for row in ids) < llm_pool.SHAPES["tiny"]["vocab_size"]
    with pytest.raises(ValueError, match="unknown causal-LM shape 'qwen9'"):
        llm_pool.build_causal_lm_pool(tmp_path / "bad", shape="qwen9")
    with pytest.raises(ValueError, match="storage_dtype must name a torch floating dtype"):
        llm_pool.build_causal_lm_pool(tmp_path / "bad", shape="tiny", storage_dtype="int8")


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from adamerge.cli.main import register_resolvers
    from adamerge.methods.configs import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("cuda", [True, False])
def test_the_parts_overrides_compose_against_the_shipped_experiments(tmp_path, cuda):
    check = _bench("gpu_check")
    cfg = _compose(check.clip_overrides(tmp_path / "clip", "gpu", cuda=cuda))
    assert cfg.trainer.max_steps == 1000 and cfg.data.batch_size == 16 and cfg.method.name == "adamerging_layer_wise"
    assert cfg.trainer.accelerator == ("gpu" if cuda else "cpu")
    assert list(cfg.modelpool.finetuned) == list(check.CLIP_TASKS)
    assert cfg.modelpool.finetuned.dtd == str(tmp_path / "clip" / "dtd")
    assert cfg.data.tasks.stanford_cars.path == str(tmp_path / "clip" / "data" / "stanford_cars")

    pool = {"paths": {"pretrained": str(tmp_path / "pre"), "finetuned": {"instruct": "i", "math": "m"},
                      "data": {"instruct": "di", "math": "dm"}}}
    rows = {part: _compose(check.llm_overrides(pool, part, "gpu", cuda=cuda)) for part in check.LLM_PARTS}
    autocast = "bfloat16" if cuda else None
    adamerging = rows["llm-adamerge"]
    assert adamerging.method.name == "adamerging_layer_wise" and adamerging.method.layer_groups == "block"
    assert adamerging.method.autocast_dtype == autocast and adamerging.modelpool.streaming is False
    assert adamerging.trainer.max_steps == 10 and list(adamerging.modelpool.finetuned) == ["instruct", "math"]
    assert adamerging.data.tasks.math.max_eval_samples == 8 and adamerging.data.tasks.math.preprocessor.text_column == "text"
    assert rows["llm-streamed"].modelpool.streaming == "disk"
    progressive = rows["llm-progressive"].method
    assert progressive.name == "progressive_distillation" and "layer_groups" not in progressive
    assert (progressive.steps_per_block, progressive.samples_per_task, progressive.autocast_dtype) == (2, 16, autocast)


def test_the_loop_time_is_read_from_lightnings_profiler_report(tmp_path):
    import time

    from lightning.pytorch.profilers import SimpleProfiler

    check = _bench("gpu_check")
    profiler = SimpleProfiler(dirpath=tmp_path, filename=check.FIT_PROFILE)
    profiler.setup(stage="fit")  # as the Trainer does: the report is fit-<filename>.txt
    with profiler.profile("run_training_epoch"):
        for _ in range(3):
            with profiler.profile("run_training_batch"):
                time.sleep(0.01)
    profiler.describe()
    rows = check.lightning_profile(tmp_path / f"fit-{check.FIT_PROFILE}.txt")
    assert rows["run_training_batch"]["calls"] == 3 and rows["run_training_epoch"]["calls"] == 1
    assert 0.03 <= rows["run_training_batch"]["total"] <= rows["run_training_epoch"]["total"]
    assert check.lightning_profile(tmp_path / "missing.txt") == {}


def test_the_planned_peaks_are_read_from_the_commands_output():
    check = _bench("gpu_check")
    log = ("memory plan (before loading; 4 tasks, learning on cuda):\n"
           "  host peak 23.4 GiB: frozen model 2.9 GiB + task vectors 11.5 GiB\n"
           "  device peak 812.5 MiB: frozen model 2.9 GiB\n  note: something\ntask vectors: {...}\n")
    assert check.planned_peaks(log) == {"host": "23.4 GiB", "device": "812.5 MiB"}
    assert check.planned_peaks("memory plan: not made (no safetensors headers)") == {}


def test_the_summary_gathers_every_part_and_why_one_has_no_figures(tmp_path, capsys):
    """What gpu_check.sh leaves (status lines, part JSONs, logs) -> gpu_check.json and gpu_check.md in $OUT."""
    check = _bench("gpu_check")
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "parts").mkdir(parents=True)
    (work / "logs").mkdir()
    sample = sample_summary()["parts"]
    for part in ("env", "clip-build", "clip-adamerge", "clip-fusionbench"):
        (work / "parts" / f"{part}.status").write_text(json.dumps(sample[part]["status"]))
        (work / "parts" / f"{part}.json").write_text(json.dumps(sample[part]["result"]))
    (work / "parts" / "llm-build.status").write_text(json.dumps({"state": "failed", "exit": 1, "seconds": 3, "limit_s": 80}))
    # a part stopped at its limit keeps the figures of the steps it did
    (work / "parts" / "llm-streamed.status").write_text(json.dumps({"state": "timed out", "exit": 124, "seconds": 80,
                                                                    "limit_s": 80}))
    (work / "parts" / "llm-streamed.json").write_text(json.dumps({"steps": 5, "seconds_per_step": 2.5,
                                                                  "partial": "5 steps done before the time limit"}))
    (work / "logs" / "llm-build.log").write_text("Traceback ...\nRuntimeError: CUDA error: out of memory\n")
    summary = check.part_summary(work, out)
    written = json.loads((out / "gpu_check.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["derived"]["clip_fusionbench_over_adamerge"] == pytest.approx(0.0918 / 0.0612)
    assert "RuntimeError: CUDA error: out of memory" in written["parts"]["llm-build"]["error_tail"]
    assert written["parts"]["llm-adamerge"] == {"status": {"state": "not run"}, "error_tail": None}
    markdown = (out / "gpu_check.md").read_text()
    assert markdown in capsys.readouterr().out + "\n"  # printed too: the device call's output shows it
    assert "`llm-build`: failed after 3 s (limit 80 s): RuntimeError: CUDA error: out of memory." in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| causal-LM pool (not built) |")]
    assert len(rows) == 3 and sum(row.endswith("| — | — | — | — | — | not run |") for row in rows) == 2
    assert rows[1].endswith("| 5 | 2.500 | — | — | — | timed out after 80 s (limit 80 s): 5 steps done before the "
                            "time limit |")
