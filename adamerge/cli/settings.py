"""The run's settings, parsed once from the composed Hydra configuration into frozen, validated objects.

Everything the configuration alone can tell is checked here, in milliseconds, before any checkpoint is read; each
parse raises a :class:`~adamerge.errors.ConfigError` (or the specific error of that kind of mistake) naming the key
and the value to change. What comes out -- :class:`RunSettings` for a run, :class:`Outputs` for the run directory's
check -- is what the rest of a run reads; the raw configuration stays here, at the command, where Hydra instantiates
the objects it names (the pool, the data, the logger, the trainer). A configuration with several mistakes reports
them in this order: the methods' names, run options, hyperparameters, data, checkpoint paths, export, protected tasks,
heads.

Long because: it is the one place a run's raw configuration is read, one parse per group in the order above; a group
with rules of its own is parsed beside the code it configures (protected tasks, heads) and only called from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from adamerge.errors import AdamergeError, ConfigError, PoolDataMismatchError
from adamerge.export.heads import check_task_names
from adamerge.export.signing import check_sign_config
from adamerge.methods.checks import is_count
from adamerge.methods.configs import method_config
from adamerge.methods.registry import get_method
from adamerge.pool.checkpoints import CheckpointError, looks_like_path
from adamerge.reporting.selection import get_criterion
from adamerge.training import task_batching
from adamerge.training.heads_config import HeadSettings, parse_heads
from adamerge.training.protected_config import ProtectedSettings, parse_protected

# Not merges but reference rows of a comparison: each fine-tuned model on its own task.
EVALUATION_ONLY = ("individual",)
EVALUATION = "evaluation"  # the kind of an evaluation-only row, beside the registry's "static" and "learned"
NONFINITE_POLICIES = ("stop", "skip")
COMPARE = "compare"


def plain(node: Any) -> Any:
    """A configuration node as plain, resolved Python values (anything else unchanged)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration, without Hydra's own node: what the run directory was made by (``run_config.json``,
    compared by ``resume=true``)."""
    task = {key: cfg[key] for key in cfg if key != "hydra"}  # Hydra's node may not resolve outside a job
    return OmegaConf.to_container(OmegaConf.create(task), resolve=True)


@dataclass(frozen=True)
class RunOptions:
    """The run-level switches (``conf/config.yaml``)."""

    resume: bool = False
    checkpoint_every: int = 0  # checkpoint.every_n_steps; 0: no checkpoints, so no resume
    keep_checkpoints: bool = False  # checkpoint.keep
    on_nonfinite: str = "stop"
    task_batching: str = "sequential"
    activation_checkpointing: bool | str = False  # True: the backbone's blocks found by size; a str: their path
    compile: str | None = None  # a torch.compile backend, None: eager
    seed: int = 0
    num_threads: int | None = None
    selection: str = "objective"  # the label-free criterion a sweep's summary picks by
    expert_cache_max_gb: float = 4.0
    accelerator: str = "auto"  # trainer.accelerator
    max_steps: Any = -1  # trainer.max_steps


@dataclass(frozen=True)
class DataSettings:
    """What a run reads of the ``data`` group itself (the data module is built from the group by Hydra)."""

    batch_size: int | None
    eval_batch_size: int = 64


@dataclass(frozen=True)
class ExportSettings:
    """The ``export`` group: whether and how each method's fused model is written."""

    enabled: bool = False
    static: bool = False  # also the data-free merges
    overwrite: bool = False
    per_task_hf: bool = False
    license: str | None = None
    sign: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Outputs:
    """What a run writes and where: the methods (in order, with their kind), whether the run directory holds one
    sub-directory per method (a comparison), resume and the export. Enough to check the run directory."""

    methods: tuple[str, ...]
    kinds: Mapping[str, str]  # static | learned | evaluation
    comparison: bool
    resume: bool
    export: ExportSettings

    def method_dir(self, run_dir: Path, name: str) -> Path:
        """Where a method's files go: the run directory itself, or a sub-directory per method in a comparison."""
        return Path(run_dir) / name if self.comparison else Path(run_dir)

    @property
    def learned(self) -> list[str]:
        return [name for name in self.methods if self.kinds[name] == "learned"]

    @property
    def exported(self) -> list[str]:
        """The methods whose fused model this run writes."""
        if not self.export.enabled:
            return []
        return [name for name in self.methods if self.kinds[name] == "learned"
                or (self.kinds[name] == "static" and self.export.static)]


@dataclass(frozen=True)
class RunSettings:
    """Everything a run reads of its configuration, validated."""

    outputs: Outputs
    options: RunOptions
    hyperparameters: Mapping[str, Mapping[str, Any]]  # per method: conf/method file <- overrides <- command line
    data: DataSettings
    protected: ProtectedSettings
    heads: HeadSettings = HeadSettings()  # frozen, or adapt: each task's head re-learned (adamerge.training.adapted_heads)

    @property
    def methods(self) -> tuple[str, ...]:
        return self.outputs.methods


# -- the parses, in the order a configuration reports its mistakes ------------------------------------------------
def parse_method_names(cfg: DictConfig) -> tuple[str, ...]:
    """``method.name``, or the methods of a comparison (``method=compare``)."""
    if cfg.method.name != COMPARE:
        return (cfg.method.name,)
    if not cfg.method.get("methods"):  # a comparison of nothing would "succeed" and write an empty summary
        raise ConfigError(f"method.methods={cfg.method.get('methods')!r} is empty: list the methods to compare, "
                          "e.g. method.methods=[task_arithmetic,ties]")
    return tuple(cfg.method.methods)


def parse_resume(cfg: DictConfig) -> bool:
    resume = cfg.get("resume", False)
    if not isinstance(resume, bool):
        raise ConfigError(f"resume={cfg.resume!r} is invalid: it must be true or false")
    return resume


def parse_run_options(cfg: DictConfig) -> RunOptions:
    """Resume, checkpoint frequency, what a non-finite step does, task batching, compile, the seed, threads, the
    label-free selection criterion."""
    resume = parse_resume(cfg)
    checkpoint = cfg.get("checkpoint") or {}
    every = checkpoint.get("every_n_steps", 0)
    if not is_count(every, minimum=0):
        raise ConfigError(f"checkpoint.every_n_steps={every!r} is invalid: it must be an integer >= 0 (0: no "
                          "checkpoints, so no resume)")
    policy = cfg.get("on_nonfinite", "stop")
    if policy not in NONFINITE_POLICIES:
        raise ConfigError(f"on_nonfinite={policy!r} is invalid: it must be one of {', '.join(NONFINITE_POLICIES)}")
    batching = task_batching.check_mode_name(cfg.get("task_batching", "sequential"))
    checkpointing = cfg.get("activation_checkpointing", False)
    if checkpointing is None:
        checkpointing = False
    if not isinstance(checkpointing, (bool, str)) or checkpointing in ("", "auto"):
        raise ConfigError(f"activation_checkpointing={checkpointing!r} is invalid: it must be true, false or the "
                          "path of the backbone's module list of blocks (e.g. model.layers)")
    backend = cfg.get("compile")
    if backend is not None and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"compile={backend!r} is invalid: use null (eager) or a torch.compile backend: "
                          f"{', '.join(torch._dynamo.list_backends())}")
    seed = cfg.get("seed", 0)
    if not is_count(seed, minimum=0):
        raise ConfigError(f"seed={cfg.get('seed')!r} is invalid: it must be an integer >= 0")
    threads = cfg.get("num_threads")
    if threads is not None and not is_count(threads, minimum=1):
        raise ConfigError(f"num_threads={threads!r} is invalid: it must be an integer >= 1, or null")
    selection = str((cfg.get("selection") or {}).get("name", "objective"))
    get_criterion(selection)
    cache_gb = cfg.get("expert_cache_max_gb", 4.0)
    if isinstance(cache_gb, bool) or not isinstance(cache_gb, (int, float)) or not cache_gb >= 0:
        raise ConfigError(f"expert_cache_max_gb={cache_gb!r} is invalid: it must be a number >= 0 (GB of host memory)")
    trainer = cfg.get("trainer") or {}
    return RunOptions(
        resume=resume, checkpoint_every=int(every), keep_checkpoints=bool(checkpoint.get("keep", False)),
        on_nonfinite=policy, task_batching=batching, activation_checkpointing=checkpointing, compile=backend,
        seed=int(seed),
        num_threads=int(threads) if threads else None, selection=selection,
        expert_cache_max_gb=float(cache_gb), accelerator=trainer.get("accelerator", "auto"),
        max_steps=trainer.get("max_steps", -1),
    )


def method_kind(name: str) -> str:
    """``static`` or ``learned`` (the registry's kind; an unknown name fails naming the methods there are), or
    ``evaluation`` for a reference row."""
    return EVALUATION if name in EVALUATION_ONLY else get_method(name).kind


def parse_methods(cfg: DictConfig, names: Sequence[str],
                  hyperparameters_of: Callable[[DictConfig, str], dict] = method_config) -> dict[str, dict[str, Any]]:
    """Every method's hyperparameters (its conf/method file, the experiment's overrides, the command line), checked
    against the method's ranges, and the step budget of learned ones."""
    num_tasks = len(cfg.modelpool.finetuned)
    chosen = {}
    for name in names:
        if name in EVALUATION_ONLY:
            chosen[name] = {}
            continue
        spec = get_method(name)
        given = hyperparameters_of(cfg, name)
        hparams = spec.resolve_hparams(given)
        if spec.validate is not None:
            spec.validate(num_tasks, hparams)
        max_steps = cfg.trainer.get("max_steps", -1)
        if spec.kind == "learned" and not is_count(max_steps, minimum=1):
            raise ConfigError(f"trainer.max_steps={max_steps!r} is invalid for learned method {name!r}: "
                              "it must be an integer >= 1 (the number of learning steps)")
        chosen[name] = given
    return chosen


def parse_data(cfg: DictConfig) -> DataSettings:
    """Batch sizes, and the task names shared by the data and the model pool."""
    data = cfg.get("data") or {}
    for key in ("batch_size", "eval_batch_size"):
        if key in data and not is_count(data[key], minimum=1):
            raise ConfigError(f"data.{key}={data[key]!r} is invalid: it must be an integer >= 1")
    pool = cfg.get("modelpool") or {}
    data_tasks, pool_tasks = data.get("tasks"), pool.get("finetuned")
    if isinstance(data_tasks, Mapping) and isinstance(pool_tasks, Mapping):
        only_data, only_pool = sorted(set(data_tasks) - set(pool_tasks)), sorted(set(pool_tasks) - set(data_tasks))
        if only_data or only_pool:
            raise PoolDataMismatchError(
                "the data and the model pool name different tasks: "
                + "; ".join(part for part in (
                    f"data.tasks has {only_data} without a fine-tuned checkpoint" if only_data else "",
                    f"modelpool.finetuned has {only_pool} without data" if only_pool else "",
                ) if part)
            )
        for task, settings in data_tasks.items():
            limit = (settings or {}).get("max_eval_samples")
            if limit is not None and not is_count(limit, minimum=1):
                raise ConfigError(f"data.tasks.{task}.max_eval_samples={limit!r} is invalid: it must be an integer "
                                  ">= 1, or null for the whole split")
    return DataSettings(batch_size=data.get("batch_size"), eval_batch_size=int(data.get("eval_batch_size", 64)))


def check_checkpoint_files(cfg: DictConfig) -> None:
    """Every checkpoint given as a local path exists, before any of them is read."""
    pool = cfg.get("modelpool") or {}
    entries = [("modelpool.pretrained", pool.get("pretrained"))]
    entries += [(f"modelpool.finetuned.{task}", source) for task, source in (pool.get("finetuned") or {}).items()]
    for key, source in entries:
        if isinstance(source, str) and looks_like_path(source) and not os.path.exists(os.path.expanduser(source)):
            raise CheckpointError(f"{key}={source!r}: no such file or directory")


def parse_export(cfg: DictConfig, names: Sequence[str], kinds: Mapping[str, str]) -> ExportSettings:
    """The export switches, the signing settings and task names that can name the export's head files (the last two
    only when this run exports something)."""
    export = cfg.get("export") or {}
    for key in ("enabled", "static", "overwrite", "per_task_hf"):
        if not isinstance(export.get(key, False), bool):
            raise ConfigError(f"export.{key}={export.get(key)!r} is invalid: it must be true or false")
    license_id = export.get("license")
    if license_id is not None and (not isinstance(license_id, str) or not license_id.strip()):
        raise ConfigError(f"export.license={license_id!r} is invalid: give a license id (e.g. apache-2.0) or null")
    sign = plain(export.get("sign"))
    settings = ExportSettings(enabled=export.get("enabled", False), static=export.get("static", False),
                              overwrite=export.get("overwrite", False), per_task_hf=export.get("per_task_hf", False),
                              license=license_id, sign=sign if sign else None)
    exported = Outputs(tuple(names), kinds, False, False, settings).exported
    if sign is not None and exported:
        check_sign_config(sign)
    if exported:
        try:
            check_task_names((cfg.get("modelpool") or {}).get("finetuned") or {}, where="modelpool.finetuned task")
        except AdamergeError as error:
            raise ConfigError(str(error)) from error
    return settings


def parse_outputs(cfg: DictConfig) -> Outputs:
    """Only what the run directory's check needs (the command's guard runs it before Hydra writes the directory)."""
    names = parse_method_names(cfg)
    kinds = {name: method_kind(name) for name in names}
    resume = parse_resume(cfg)
    return Outputs(names, kinds, cfg.method.name == COMPARE, resume, parse_export(cfg, names, kinds))


def parse_run_settings(cfg: DictConfig) -> RunSettings:
    """Everything the configuration alone can tell, checked in the order the module docstring gives."""
    names = parse_method_names(cfg)
    options = parse_run_options(cfg)
    hyperparameters = parse_methods(cfg, names)
    kinds = {name: method_kind(name) for name in names}
    data = parse_data(cfg)
    check_checkpoint_files(cfg)
    export = parse_export(cfg, names, kinds)
    pool_tasks = (plain(cfg.get("modelpool")) or {}).get("finetuned") or {}
    protected = parse_protected(plain(cfg.get("protected")), pool_tasks)
    outputs = Outputs(names, kinds, cfg.method.name == COMPARE, options.resume, export)
    heads = parse_heads(plain(cfg.get("heads")), outputs.learned)
    return RunSettings(outputs, options, hyperparameters, data, protected, heads)
