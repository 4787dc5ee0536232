"""A self-contained HTML report of a run or a sweep, for a person to open in a browser.

    python -m app.report <run dir | sweep dir> [--out report.html]

A run directory is one with `results.json` (and `config.yaml`); a sweep directory is one with
`summary.csv` (written by `python -m app.sweep -m ...`) and a folder per job; when the sweep
repeated configurations over seeds, its `summary_by_config.csv` is shown first, as mean ± sd
over each configuration's ok jobs. The page is one file: tables, and figures embedded as PNG
data URIs, so it can be mailed or archived as is. It reads only the results contract
(results.json through core/results.py `load_results`, which checks it; config.yaml;
summary.csv and summary_by_config.csv), never logs.
Default output: `<dir>/report.html`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import sys
from pathlib import Path
from typing import Any

from core.results import CONFIG_FILE, RESULTS_FILE, RoundRecord, load_results, plot_rounds
from app.sweep import SUMMARY_BY_CONFIG_FILE, SUMMARY_FILE

REPORT_FILE = "report.html"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
figure { margin: 1.5em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; } div.scroll { overflow-x: auto; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""
# Counts the figures the browser actually decoded (a test reads it back from the DOM).
SCRIPT = """
window.addEventListener("load", () => {
  const shown = [...document.images].filter((img) => img.complete && img.naturalWidth > 0);
  document.body.dataset.figuresShown = String(shown.length);
  document.body.dataset.figuresTotal = String(document.images.length);
});
"""


class ReportError(ValueError):
    """The directory holds neither a run's results nor a sweep's summary."""


# --------------------------------------------------------------------------- figures
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure(png_b64: str, caption: str) -> str:
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png_b64}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics_figure(rounds: list[RoundRecord]) -> str:
    buffer = io.BytesIO()
    plot_rounds(rounds, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _series_figure(rounds: list[RoundRecord], series: dict[str, Any], ylabel: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    for label, get in series.items():
        points = [(r.round, get(r)) for r in rounds if get(r) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", markersize=4, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


# --------------------------------------------------------------------------- tables
def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td{"" if numeric else " class=text"}>{html.escape(text)}</td>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}{k}.", v)]
    if isinstance(value, list):
        return [(prefix[:-1], "; ".join(map(str, value)))]
    return [(prefix[:-1], value)]


# --------------------------------------------------------------------------- pages
def _page(title: str, sections: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        + "".join(sections)
        + f"<script>{SCRIPT}</script></body></html>"
    )


def run_report(run_dir: Path) -> str:
    results = load_results(run_dir / RESULTS_FILE)
    rounds = results.rounds
    final = results.final.to_dict() if results.final is not None else {}
    config = (run_dir / CONFIG_FILE).read_text() if (run_dir / CONFIG_FILE).exists() else ""
    sections = [
        "<h2>Outcome</h2>",
        _table(["key", "value"], [list(kv) for kv in _flatten("", final)]),
    ]
    if rounds:
        sections.append("<h2>Figures</h2>")
        sections.append(_figure(_metrics_figure(rounds), "Accuracy and loss per round"))
        if any(r.privacy is not None for r in rounds):
            epsilon = {"epsilon": lambda r: r.privacy.epsilon if r.privacy is not None else None}
            png = _series_figure(rounds, epsilon, "epsilon")
            sections.append(_figure(png, "Privacy spent: epsilon after each round"))
        traffic = {
            "to clients (MB)": lambda r: r.comm.bytes_down / 1e6 if r.comm is not None else None,
            "from clients (MB)": lambda r: r.comm.bytes_up / 1e6 if r.comm is not None else None,
        }
        sections.append(_figure(_series_figure(rounds, traffic, "MB"), "Traffic per round"))
        # The table shows every measured key of every round, as results.json spells them.
        # (each site's metrics have a table of their own, below)
        flat = [dict(_flatten("", {k: v for k, v in r.to_dict().items() if k != "federated_sites"}))
                for r in rounds]  # fmt: skip
        keys = sorted({k for f in flat for k in f} - {"round"})
        rows = [[r.round, *[f.get(k, "") for k in keys]] for r, f in zip(rounds, flat)]
        sections += ["<h2>Rounds</h2>", _table(["round", *keys], rows)]
        sections += _sites_section(rounds)
    if config:
        sections.append(f"<h2>Configuration</h2><pre>{html.escape(config)}</pre>")
    return _page(f"Run report: {run_dir.name}", sections)


def _sites_section(rounds: list[RoundRecord]) -> list[str]:
    """The last federated evaluation's metrics site by site (evaluation.per_site)."""
    last = next((r for r in reversed(rounds) if r.federated_sites), None)
    if last is None:
        return []
    sites = last.federated_sites
    keys = sorted({k for m in sites.values() for k in m})
    rows = [[site, *[metrics.get(k, "") for k in keys]] for site, metrics in sites.items()]
    if last.federated is not None:
        rows.append(["mean (example-weighted)", *[last.federated.get(k, "") for k in keys]])
    note = ("<p>Each site's own metrics on its validation data; not covered by differential "
            "privacy.</p>")  # fmt: skip
    return [f"<h2>Per site (round {last.round})</h2>", note, _table(["site", *keys], rows)]


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def sweep_report(sweep_dir: Path) -> str:
    with open(sweep_dir / SUMMARY_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ReportError(f"{sweep_dir / SUMMARY_FILE} has no jobs yet")
    columns = list(rows[0])
    sections = _by_config_section(sweep_dir / SUMMARY_BY_CONFIG_FILE)
    sections += ["<h2>Jobs</h2>", _table(columns, [[_maybe_number(r[c]) for c in columns] for r in rows])]
    metric = next(
        (m for m in ("centralized_accuracy", "federated_accuracy", "centralized_loss") if m in columns),
        None,
    )
    plt = _pyplot()
    if metric:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
        labels = [f"{r['job']}: {r['overrides']}" for r in rows]
        ax.barh(labels, [_number(r[metric]) or 0.0 for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(metric)
        sections += ["<h2>Figures</h2>", _figure(_png(fig), f"Final {metric} per job")]
        if "privacy_epsilon" in columns:
            points = [(_number(r["privacy_epsilon"]), _number(r[metric]), r["job"]) for r in rows]
            points = [p for p in points if p[0] is not None and p[1] is not None]
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.scatter([p[0] for p in points], [p[1] for p in points])
            for eps, value, job in points:
                ax.annotate(job, (eps, value), fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("epsilon (log scale)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            sections.append(_figure(_png(fig), f"{metric} against epsilon"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for row in rows:
        path = sweep_dir / row["job"] / RESULTS_FILE
        if not path.exists():
            continue
        rounds = load_results(path).rounds
        scope = "centralized" if any(r.centralized is not None for r in rounds) else "federated"
        points = [
            (r.round, getattr(r, scope)["loss"]) for r in rounds if "loss" in (getattr(r, scope) or {})
        ]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3, label=f"job {row['job']} ({scope})")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    sections.append(_figure(_png(fig), "Loss per round, every job"))
    return _page(f"Sweep report: {sweep_dir.name}", sections)


def _by_config_section(path: Path) -> list[str]:
    """summary_by_config.csv as a table: a row per configuration, each metric as mean ± sd
    over its ok jobs (the mean alone for one job); nothing when the file is absent."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    metrics = [c[: -len("_mean")] for c in rows[0] if c.endswith("_mean")]
    header = ["configuration", "seeds", "ok", "failed", *metrics]
    body = [
        [r["config"] or "(defaults)", r["seeds"], int(r["n_ok"]), int(r["n_failed"]),
         *[_mean_sd(r[f"{m}_mean"], r[f"{m}_sd"]) for m in metrics]]
        for r in rows
    ]  # fmt: skip
    return [
        "<h2>Configurations: mean ± sd over seeds</h2>",
        "<p>Sample standard deviation over each configuration's ok jobs; failed jobs are "
        "counted, not averaged.</p>",
        _table(header, body),
    ]


def _mean_sd(mean: str, sd: str) -> str:
    if mean == "":
        return ""
    text = f"{float(mean):.4g}"
    return text if sd == "" else f"{text} ± {float(sd):.4g}"


def _maybe_number(value: str) -> Any:
    number = _number(value)
    return value if number is None else number


def build_report(directory: Path) -> str:
    directory = Path(directory)
    if (directory / SUMMARY_FILE).exists():
        return sweep_report(directory)
    if (directory / RESULTS_FILE).exists():
        return run_report(directory)
    raise ReportError(
        f"{directory} has neither {RESULTS_FILE} (a run's output_dir) nor {SUMMARY_FILE} (a "
        "sweep directory, multirun/<date>/<time>/): give one of those"
    )


def write_report(directory: Path, out: Path | None = None) -> Path:
    page = build_report(directory)
    out = Path(out) if out else Path(directory) / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a run's output_dir or a sweep directory")
    parser.add_argument("--out", type=Path, help=f"default: <directory>/{REPORT_FILE}")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.directory, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
