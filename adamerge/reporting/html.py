"""``adamerge-report DIR``: one self-contained HTML page for a run, a comparison or a ``--multirun`` sweep.

The page reads only the JSON files a run writes and re-plots every figure from them (nothing links to the run's
own PNGs, which hold absolute paths), so it stays readable after the directory is moved or mailed.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adamerge.errors import AdamergeError, ConfigError, report_cli_error
from adamerge.reporting.plots import PNG_SIGNATURE, accuracy_bars, coefficient_heatmap_png, learning_curves
from adamerge.reporting.results import read_json, read_run_results
from adamerge.reporting.sweep import job_dirs, write_summary_files
from adamerge.storage.atomic import write_atomic

EXPECTED = "summary.json or results.json (a run) or sweep_summary.json (a sweep)"
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 14px; }
.table-scroll { overflow-x: auto; max-width: 100%; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.error { color: #a00; }
tr.failed { background: #fff3f3; } .pick { background: #e7f1ff; border-radius: 3px; padding: 0 4px; font-size: 12px; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; } img { max-width: 100%; }
figcaption, .muted { color: #666; font-size: 13px; } code { background: #f5f5f5; padding: 0 3px; }
"""

Cell = tuple[str, str]  # (inner HTML, the <td> attributes)
NUM, TEXT = ' class="num"', ""


def esc(value: Any) -> str:
    return html.escape(str(value))


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def require(data: Any, keys: Sequence[str], path: Path) -> Any:
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}: not an adamerge results file")
    return data


def load_run(directory: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The tasks and one results record per method of a comparison or of a single-method run."""
    records = [require(r, ("method", "tasks", "accuracy", "average_accuracy"), directory)
               for r in read_run_results(directory)]
    if not records:
        raise ConfigError(f"{directory} holds a summary.json but no <method>/results.json")
    return records[0]["tasks"], records


def table(header: Sequence[str], rows: Sequence[Sequence[Cell]], row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{esc(label)}</th>" for label in header)
    lines = []
    for index, row in enumerate(rows):
        css = f' class="{row_classes[index]}"' if index < len(row_classes) and row_classes[index] else ""
        lines.append(f"<tr{css}>" + "".join(f"<td{attributes}>{inner}</td>" for inner, attributes in row) + "</tr>")
    # Wide tables (many tasks) scroll inside their own box instead of being cut at the page's edge.
    return f'<div class="table-scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table></div>'


def task_cells(values: Sequence[Mapping[str, float | None]], columns: Sequence[str],
               fmt: Callable[[float | None], str], bold_best: bool = True) -> list[list[Cell]]:
    """One row of number cells per mapping; with ``bold_best``, the highest value of each column in bold."""
    present = {c: [v[c] for v in values if v.get(c) is not None] for c in columns}
    tops = {c: max(present[c]) if bold_best and present[c] else None for c in columns}
    return [[(f"<b>{fmt(v[c])}</b>" if tops[c] is not None and v.get(c) == tops[c] else fmt(v.get(c)), NUM)
             for c in columns] for v in values]


def image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def accuracy_columns(record: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float | None]:
    return {**{t: record.get("accuracy", {}).get(t) for t in tasks}, "average": record.get("average_accuracy")}


def results_table(tasks: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    columns = [*tasks, "average"]
    scores = task_cells([accuracy_columns(r, tasks) for r in records], columns, percent)
    rows = [[(esc(r["method"]), TEXT), *cells, (number(r.get("seconds"), 1), NUM),
             (number(r.get("peak_memory_mb"), 0), NUM)] for r, cells in zip(records, scores)]
    return table(["method", *(f"{c} (%)" for c in columns), "seconds", "peak memory (MB)"], rows)


def unlabeled_tables(tasks: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    scored = [r for r in records if r.get("unlabeled")]
    if not scored:
        return ""
    parts = ["<h2>Label-free scores on the evaluation inputs</h2>",
             '<p class="muted">What a sweep can select by without labels: the objective and the prediction entropy '
             "of the final merge, computed from inputs only.</p>"]
    for name in ("objective", "entropy"):
        cells = task_cells([r["unlabeled"].get(name, {}) for r in scored], tasks, lambda v: number(v, 4), False)
        parts.append(f"<h3>{esc(name)}</h3>" + table(["method", *tasks],
                                                     [[(esc(r["method"]), TEXT), *c] for r, c in zip(scored, cells)]))
    return "".join(parts)


def is_learned(record: Mapping[str, Any]) -> bool:
    return any(record.get(k) for k in ("coefficients", "objective_history", "label_free", "profile"))


def figures(record: Mapping[str, Any], tasks: Sequence[str]) -> str:
    method = record["method"]
    parts = []
    if record.get("coefficients"):
        heatmap = coefficient_heatmap_png(record["coefficients"], tasks, method)
        parts.append(image(heatmap, f"{method}: merge coefficients"))
    if record.get("objective_history") or record.get("entropy_history"):
        objective_name = (record.get("objective") or {}).get("name", "objective")
        curves = learning_curves(record.get("objective_history") or [], record.get("entropy_history") or [],
                                 objective_name, method)
        parts.append(image(curves, f"{method}: objective and entropy per step"))
    return "".join(parts)


def method_section(record: Mapping[str, Any], tasks: Sequence[str]) -> str:
    parts = [f"<h3>{esc(record['method'])}</h3>"]
    if record.get("config"):
        settings = ", ".join(f"{k}={v}" for k, v in record["config"].items())
        parts.append(f"<p>hyperparameters: <code>{esc(settings)}</code></p>")
    if record.get("objective"):
        parts.append(f"<p>objective: <code>{esc(json.dumps(record['objective']))}</code></p>")
    parts.append(figures(record, tasks))
    if record.get("label_free"):
        start = record.get("start_accuracy") or {}
        rows = [[(esc(t), TEXT), (number(s["objective_start"], 4), NUM), (number(s["objective_end"], 4), NUM),
                 (number(s["objective_end"] - s["objective_start"], 4), NUM), (percent(s["prediction_changed"]), NUM),
                 (percent(start.get(t)), NUM), (percent(record["accuracy"].get(t)), NUM)]
                for t, s in record["label_free"].items()]
        header = ["task", "objective start", "objective end", "change", "predictions changed (%)",
                  "accuracy start (%)", "accuracy end (%)"]
        parts.append("<h4>Label-free report</h4>" + table(header, rows))
    if record.get("profile"):
        rows = [[(esc(phase), TEXT), (number(p.get("ms_per_step"), 1), NUM), (percent(p.get("fraction")), NUM),
                 (number(p.get("seconds"), 2), NUM)] for phase, p in record["profile"].items()]
        parts.append("<h4>Step profile</h4>" + table(["phase", "ms per step", "share (%)", "seconds"], rows))
    return "".join(parts)


def run_body(directory: Path) -> str:
    tasks, records = load_run(directory)
    learned = [r for r in records if is_learned(r)]
    parts = ["<h2>Results</h2>", '<p class="muted">Test accuracy (%); the best value of each column in bold.</p>',
             results_table(tasks, records), image(accuracy_bars(records, tasks), "accuracy per task"),
             unlabeled_tables(tasks, records)]
    if learned:
        parts += ["<h2>Learned methods</h2>", *(method_section(r, tasks) for r in learned)]
    return "".join(parts)


def sweep_body(directory: Path, summary: Mapping[str, Any]) -> str:
    tasks, rows, selection = summary["tasks"], summary["rows"], summary.get("selection") or {}
    marks: dict[int, list[str]] = {}
    for key, label in (("label_free_pick", "label-free pick"), ("accuracy_pick", "accuracy pick")):
        if selection.get(key) is not None:
            marks.setdefault(selection[key], []).append(label)
    ok = [r for r in rows if r["status"] == "ok"]
    scores = iter(task_cells([accuracy_columns(r, tasks) for r in ok], ["average", *tasks], percent))
    # Overrides every job shares (the zoo, the budget...) are listed once; each row shows the swept ones.
    swept = summary.get("swept", [])
    objective_names = {r.get("objective_name") for r in ok} - {None}
    objective = f"objective ({objective_names.pop()})" if len(objective_names) == 1 else "objective"
    header = ["job", "overrides", "method", "status", objective, "entropy", "average (%)",
              *(f"{t} (%)" for t in tasks), "seconds", "peak memory (MB)"]
    body = []
    for index, row in enumerate(rows):
        job = esc(row["job"]) + "".join(f' <span class="pick">{esc(m)}</span>' for m in marks.get(index, []))
        own = " ".join(f"{k}={v}" for k, v in (row.get("overrides") or {}).items() if k in swept)
        cells = [(job, TEXT), (esc(own), TEXT), (esc(row["method"]), TEXT), (esc(row["status"]), TEXT)]
        if row["status"] == "ok":
            cells += [(number(row.get("objective"), 4), NUM), (number(row.get("entropy"), 4), NUM), *next(scores),
                      (number(row.get("seconds"), 1), NUM), (number(row.get("peak_memory_mb"), 0), NUM)]
        else:
            cells.append((esc(row.get("error") or "no error recorded"), f' colspan="{len(header) - 4}" class="error"'))
        body.append(cells)
    common = " ".join(f"{k}={v}" for k, v in sorted((rows[0].get("overrides") or {}).items()) if k not in swept)
    parts = ["<h2>Sweep</h2>", f"<p>swept: <code>{esc(', '.join(summary.get('swept', [])))}</code></p>",
             f"<p>overrides of every job: <code>{esc(common or 'none')}</code></p>",
             table(header, body, ["" if r["status"] == "ok" else "failed" for r in rows]),
             selection_text(rows, selection)]
    plots = summary.get("plots") or {}
    if plots:
        parts.append("<h2>Sweep plots</h2>")
        for name, relative in plots.items():
            path = directory / relative
            png = path.read_bytes() if path.is_file() else b""
            parts.append(image(png, name) if png.startswith(PNG_SIGNATURE)
                         else f'<p class="muted">plot {esc(name)}: {esc(path)} is missing or not a PNG</p>')
    parts.append("<h2>Jobs</h2>")
    jobs: dict[str, Mapping[str, Any]] = {}
    for row in ok:  # a comparison job has a row per method but one section
        jobs.setdefault(row["job_dir"], row)
    parts += [job_section(directory / job_dir, row) for job_dir, row in jobs.items()]
    return "".join(parts)


def selection_text(rows: Sequence[Mapping[str, Any]], selection: Mapping[str, Any]) -> str:
    def job(index: int | None) -> str:
        if index is None:
            return "none"
        return f"{rows[index]['job']} (average accuracy {percent(rows[index].get('average_accuracy'))}%)"

    cost = selection.get("cost_of_not_peeking")
    items = [("criterion", f"{selection.get('criterion', '—')}: {selection.get('description') or ''}"),
             ("label-free pick", job(selection.get("label_free_pick"))),
             ("test accuracy would pick", job(selection.get("accuracy_pick"))),
             ("cost of not peeking",
              "—" if cost is None else f"{100 * cost:.1f} percentage points of average accuracy")]
    if selection.get("note"):
        items.append(("note", selection["note"]))
    return "<h3>Selection</h3><ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in items) + "</ul>"


def job_section(job_dir: Path, row: Mapping[str, Any]) -> str:
    heading = f"<h3>{esc(row['job'])}</h3>"
    if not ((job_dir / "summary.json").exists() or (job_dir / "results.json").exists()):
        return heading + f'<p class="muted">{esc(job_dir)} holds no summary.json or results.json</p>'
    tasks, records = load_run(job_dir)
    bars = image(accuracy_bars(records, tasks, title=row["job"]), f"{row['job']}: accuracy per task")
    return heading + bars + "".join(figures(r, tasks) for r in records if is_learned(r))


def render(directory: Path) -> str:
    """The report's body for ``directory``; a ConfigError naming it when it is no run or sweep directory."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; expected a run or sweep directory holding {EXPECTED}")
    sweep_file = directory / "sweep_summary.json"
    if sweep_file.exists():
        return sweep_body(directory, require(read_json(sweep_file), ("tasks", "rows"), sweep_file))
    if (directory / "summary.json").exists() or (directory / "results.json").exists():
        return run_body(directory)
    if job_dirs(directory):  # a sweep killed before its summary was written: build it from the jobs' files
        return sweep_body(directory, write_summary_files(directory))
    raise ConfigError(f"{directory} holds none of {EXPECTED}")


def write_report(directory: str | Path, output: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of a run or sweep directory (default ``<directory>/report.html``)."""
    directory = Path(directory)
    body = render(directory)
    output = Path(output) if output is not None else directory / "report.html"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>adamerge report: '
            f"{esc(directory.name)}</title><style>{CSS}</style></head><body><h1>adamerge report</h1>"
            f'<p class="muted">{esc(directory.resolve())}</p>{body}</body></html>\n')
    try:
        # Pure ASCII (other characters as references) reads the same whatever the locale's encoding.
        return write_atomic(output, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    except OSError as error:
        raise ConfigError(f"cannot write the report to {output} ({error.strerror}); "
                          "choose another path with -o") from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamerge-report", description="Write one self-contained HTML report "
                                     "of an adamerge run, comparison or sweep directory.")
    parser.add_argument("directory", type=Path, help=f"a run or sweep directory holding {EXPECTED}")
    parser.add_argument("-o", "--output", type=Path, help="where to write the page (default: DIRECTORY/report.html)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.directory, args.output)
    except AdamergeError as error:
        return report_cli_error(parser.prog, error)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
