"""Sweep summaries: one table over the jobs of an ``adamerge --multirun`` sweep, the label-free pick, plots.

``SweepSummary`` (a Hydra callback, on by default in conf/config.yaml) rewrites the summary after every job,
so a sweep that dies half-way still leaves the finished jobs' table, and once more with the plots when the
multirun ends. ``python -m adamerge.reporting.sweep SWEEP_DIR`` rebuilds it by hand (e.g. after a killed sweep).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from adamerge.errors import AdamergeError, ConfigError, report_cli_error
from adamerge.reporting.results import read_json, read_run_results, write_json
from adamerge.reporting.selection import get_criterion, pick, pick_by_accuracy, unlabeled_means
from adamerge.storage.atomic import write_atomic

ERROR_FILE = "error.json"
SUMMARY_NAME = "sweep_summary"


def result_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep-table view of one method's results.json."""
    objective = result.get("objective") or {}
    return {
        "method": result["method"],
        "status": "ok",
        "error": None,
        "objective_name": objective.get("name"),
        "objective_config": objective,
        **unlabeled_means(result),
        "average_accuracy": result.get("average_accuracy"),
        "accuracy": dict(result.get("accuracy") or {}),
        "seconds": result.get("seconds"),
        "peak_memory_mb": result.get("peak_memory_mb"),
    }


def job_score(results: Sequence[Mapping[str, Any]], criterion: str = "objective") -> float | None:
    """The job's label-free score: its picked method's criterion value (what a hyperparameter search
    minimises); ``None`` when no method has one."""
    rows = [result_row(result) for result in results]
    chosen_criterion = get_criterion(criterion)
    chosen, _ = pick(rows, chosen_criterion)
    return None if chosen is None else chosen_criterion.score(rows[chosen])


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job directories (each has Hydra's ``.hydra/``), in job-number order."""
    def number(path: Path) -> tuple[int, str]:
        match = re.match(r"(\d+)", path.name)
        return (int(match.group(1)) if match else sys.maxsize, path.name)

    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=number)


def job_overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = [str(item).split("=", 1) for item in OmegaConf.load(path)]
    return {key.lstrip("+~"): value for key, value in (p for p in pairs if len(p) == 2)}


def failed_row(method: str | None, error: str) -> dict[str, Any]:
    """A job's error as a row with every column of :func:`result_row`, empty."""
    return {**result_row({"method": method}), "status": "failed", "error": error, "objective_config": None}


def job_rows(job: Path, sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per method the job ran, plus a failed row for its error (or for a job that never finished)."""
    identity = {"job": job.name, "job_dir": str(job.relative_to(sweep_dir)), "overrides": job_overrides(job)}
    rows = [result_row(result) for result in read_run_results(job)]
    if (job / ERROR_FILE).is_file():
        error = read_json(job / ERROR_FILE)
        rows.append(failed_row(error.get("method"), f"{error['type']}: {error['message']}"))
    elif not rows:
        rows.append(failed_row(None, "no results.json and no error record: the job was killed or is still running"))
    return [{**identity, **row} for row in rows]


def swept_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Overrides whose value differs between jobs (a key some jobs lack counts as differing)."""
    keys = sorted({key for row in rows for key in row["overrides"]})
    return [key for key in keys if len({row["overrides"].get(key) for row in rows}) > 1]


def summarize(sweep_dir: str | Path, criterion: str = "objective") -> dict[str, Any]:
    """Collect the sweep's rows and make the label-free and the test-accuracy picks."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory {sweep_dir} does not exist")
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no job directories (sub-directories with .hydra/): not a sweep")
    rows = [row for job in jobs for row in job_rows(job, sweep_dir)]
    chosen = get_criterion(criterion)
    label_free, note = pick(rows, chosen)
    by_accuracy = pick_by_accuracy(rows)
    cost = None
    if label_free is not None and by_accuracy is not None:
        cost = rows[by_accuracy]["average_accuracy"] - rows[label_free]["average_accuracy"]
    tasks = list(dict.fromkeys(task for row in rows for task in row["accuracy"]))  # first-seen order
    return {
        "sweep_dir": str(sweep_dir),
        "tasks": tasks,
        "swept": swept_keys(rows),
        "selection": {"criterion": chosen.name, "description": chosen.description, "label_free_pick": label_free,
                      "accuracy_pick": by_accuracy, "cost_of_not_peeking": cost, "note": note},
        "rows": rows,
        "plots": {},
    }


def _number(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
    return "" if value is None else f"{scale * value:.{digits}f}"


def table_columns(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(header, cell function) of the sweep table, shared by the CSV and the markdown."""
    columns: list[tuple[str, Any]] = [("job", lambda r: r["job"])]
    columns += [(key, lambda r, key=key: r["overrides"].get(key, "")) for key in summary["swept"]]
    columns += [
        ("method", lambda r: r["method"] or ""),
        ("status", lambda r: r["status"]),
        ("objective", lambda r: _number(r["objective"])),
        ("entropy", lambda r: _number(r["entropy"])),
        ("expert_agreement", lambda r: _number(r.get("expert_agreement"), 100, 2)),
        ("average_accuracy", lambda r: _number(r["average_accuracy"], 100, 2)),
    ]
    columns += [(f"accuracy/{task}", lambda r, task=task: _number(r["accuracy"].get(task), 100, 2))
                for task in summary["tasks"]]
    columns += [("seconds", lambda r: _number(r["seconds"], digits=1)),
                ("peak_memory_mb", lambda r: _number(r["peak_memory_mb"], digits=0))]
    return columns


def to_csv(summary: Mapping[str, Any]) -> str:
    columns = table_columns(summary) + [("error", lambda r: r["error"] or "")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([header for header, _ in columns])
    for row in summary["rows"]:
        writer.writerow([cell(row) for _, cell in columns])
    return buffer.getvalue()


def to_markdown(summary: Mapping[str, Any]) -> str:
    columns = table_columns(summary)
    selection = summary["selection"]
    marks = {selection["label_free_pick"]: "label-free pick", selection["accuracy_pick"]: "test-accuracy pick"}
    if selection["label_free_pick"] is not None and selection["label_free_pick"] == selection["accuracy_pick"]:
        marks = {selection["label_free_pick"]: "label-free pick = test-accuracy pick"}
    headers = [header.replace("accuracy/", "") for header, _ in columns] + ["pick"]
    lines = [f"# Sweep {summary['sweep_dir']}", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for index, row in enumerate(summary["rows"]):
        cells = [str(cell(row)).replace("|", "\\|") for _, cell in columns]
        lines.append("| " + " | ".join(cells + [marks.get(index, "")]) + " |")
    lines += ["", selection_text(summary)]
    failed = failed_jobs(summary)
    if failed:
        lines += ["", "## Failed jobs", ""] + [f"- {row['job']}: {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def selection_text(summary: Mapping[str, Any]) -> str:
    """The picks in words: what the label-free criterion chose, what peeking would have, and the difference."""
    selection, rows = summary["selection"], summary["rows"]

    def name(index: int) -> str:
        row = rows[index]
        overrides = ", ".join(f"{k}={row['overrides'].get(k)}" for k in summary["swept"] if k in row["overrides"])
        return f"job {row['job']} ({row['method']}{'; ' + overrides if overrides else ''})"

    text = f"Label-free selection ({selection['criterion']}: {selection['description']}): "
    if selection["label_free_pick"] is None:
        return text + f"no pick, {selection['note']}."
    chosen = rows[selection["label_free_pick"]]
    text += f"{name(selection['label_free_pick'])}, average accuracy {100 * chosen['average_accuracy']:.2f}%."
    if selection["accuracy_pick"] is not None:
        best = rows[selection["accuracy_pick"]]
        text += (f" Test accuracy would have picked {name(selection['accuracy_pick'])} at "
                 f"{100 * best['average_accuracy']:.2f}%: not peeking at the labels cost "
                 f"{100 * selection['cost_of_not_peeking']:.2f} points.")
    return text


def write_summary_files(sweep_dir: str | Path, criterion: str = "objective", plots: bool = True) -> dict[str, Any]:
    """Write sweep_summary.json / .md / .csv (and one PNG per swept parameter) into the sweep directory."""
    from adamerge.reporting.sweep_plots import plot_swept_parameter

    sweep_dir = Path(sweep_dir)
    summary = summarize(sweep_dir, criterion)
    # The tables first: a plot that fails must not cost the table of the jobs that finished.
    write_atomic(sweep_dir / f"{SUMMARY_NAME}.md", to_markdown(summary))
    write_atomic(sweep_dir / f"{SUMMARY_NAME}.csv", to_csv(summary))
    write_json(sweep_dir / f"{SUMMARY_NAME}.json", summary)
    if plots and summary["swept"]:
        for key in summary["swept"]:
            path = sweep_dir / f"sweep_{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.png"
            if plot_swept_parameter(summary, key, path) is not None:
                summary["plots"][key] = path.name
        write_json(sweep_dir / f"{SUMMARY_NAME}.json", summary)
    return summary


def failed_jobs(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [row for row in summary["rows"] if row["status"] != "ok"]


class SweepSummary(Callback):
    """Hydra callback: the sweep summary after every job (tables) and at the end of the multirun (with plots);
    exits non-zero at the end when a job failed, once every other job's row is written."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        try:
            write_summary_files(Path(str(config.hydra.sweep.dir)), selection_criterion(config), plots=False)
        except Exception as error:  # Hydra would only log it; the final summary reports it and exits non-zero
            print(f"adamerge: warning: sweep summary not updated after this job: {error!r}", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir() or not job_dirs(sweep_dir):
            return
        try:
            summary = write_summary_files(sweep_dir, selection_criterion(config))
        except Exception as error:  # Hydra logs a callback's exception and exits 0; a lost summary is an error
            sys.exit(report_cli_error("adamerge", f"writing the sweep summary of {sweep_dir} failed: {error!r}\n"
                                      f"(rebuild it with: python -m adamerge.reporting.sweep {sweep_dir})", 1))
        print(f"\n{selection_text(summary)}\nsweep summary: {sweep_dir / (SUMMARY_NAME + '.md')}")
        failed = failed_jobs(summary)
        if failed:
            sys.exit(report_cli_error("adamerge", f"{len(failed)} of {len(summary['rows'])} sweep rows failed: "
                                      + "; ".join(f"{row['job']}: {row['error']}" for row in failed), 1))


def selection_criterion(config: DictConfig) -> str:
    """The configured label-free criterion's name (``selection.name``; objective when the config has none)."""
    return str(OmegaConf.select(config, "selection.name", default="objective"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamerge.reporting.sweep", description="(Re)build a sweep's summary.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--selection", default="objective", help="label-free criterion (objective, entropy, expert_agreement)")
    args = parser.parse_args(argv)
    try:
        summary = write_summary_files(args.sweep_dir, args.selection)
    except AdamergeError as error:
        return report_cli_error("adamerge", error)
    print(to_markdown(summary))
    return 1 if failed_jobs(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
