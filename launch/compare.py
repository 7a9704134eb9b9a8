"""Compare tracked runs side by side: the config values that differ and the latest metrics.

    python launch/compare.py --experiment vitvq-stage1
    python launch/compare.py --experiment vitvq-stage1 --runs 1a2b3c4d 5e6f --metrics train/total_loss val/psnr
    python launch/compare.py --experiment vitvq-stage1 --plot curves.png --all-params

One column per run (name, short id, status), oldest first; rows are the params (the flattened config) whose
values differ between the runs (every param with ``--all-params``), then the latest value of each metric that
at least one run logged. ``--plot`` saves one subplot per metric with every run's curve. The store is
``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db`` here).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


from vitvq.configs.redact import redact
from vitvq.trainer.tracking import mlflow_client  # (MLflow itself is imported only there)

# The stage-1 names runs are compared on (issue 4); a name no run logged is left out of the table.
DEFAULT_METRICS = (
    "train/total_loss", "train/rec_loss", "train/perceptual_loss", "train/quant_loss", "train/g_loss",
    "train/disc_loss", "train/codebook_usage", "train/perplexity", "perf/images_per_s",
    "val/l1", "val/psnr", "val/lpips", "val/codebook_usage", "eval/rfid", "eval/fid", "eval/is",
)
MAX_CELL = 40  # characters per table cell; longer values end with "..."


def fetch_runs(client: Any, experiment: str, run_ids: Optional[Sequence[str]] = None,
               max_runs: int = 10) -> list[Any]:
    """Runs of ``experiment``, oldest first: the newest ``max_runs``, or those named in ``run_ids`` (full ids
    or unique prefixes, in the order given)."""
    experiment = redact(experiment)  # the name the trainer stored (tracking.py redacts it)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise SystemExit(f"no experiment {experiment!r} in {redact(client.tracking_uri)}; experiments there: {names}")
    if not run_ids:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=max_runs)
        return list(reversed(runs))
    everything = client.search_runs([exp.experiment_id], max_results=50000)
    out = []
    for rid in run_ids:
        matches = [r for r in everything if r.info.run_id.startswith(rid)]
        if len(matches) > 1:
            raise SystemExit(f"run id prefix {rid!r} is ambiguous: {[r.info.run_id for r in matches]}")
        if not matches:
            raise SystemExit(f"no run {rid!r} in experiment {experiment!r}")
        out.append(matches[0])
    return out


def differing_params(runs: Sequence[Any], all_params: bool = False) -> dict[str, list[Optional[str]]]:
    """``{param: [value per run]}`` for the params whose values are not all equal (a param a run lacks counts
    as a difference, its value None); every param when ``all_params``."""
    keys = sorted(set().union(*(r.data.params for r in runs))) if runs else []
    table = {k: [r.data.params.get(k) for r in runs] for k in keys}
    return table if all_params else {k: v for k, v in table.items() if len(set(v)) > 1}


def latest_metrics(runs: Sequence[Any], names: Sequence[str]) -> dict[str, list[Optional[float]]]:
    """``{metric: [latest value per run]}`` for the names that at least one run logged, in the order given.
    MLflow's latest value is the one at the highest step."""
    return {n: [r.data.metrics.get(n) for r in runs] for n in names if any(n in r.data.metrics for r in runs)}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.5g}"
    text = str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def format_table(runs: Sequence[Any], params: dict[str, list], metrics: dict[str, list],
                 n_params: Optional[int] = None) -> str:
    """A fixed-width text table: run header, then the params, then the metrics."""
    header = [["run"] + [r.info.run_name or "-" for r in runs], ["id"] + [r.info.run_id[:8] for r in runs],
              ["status"] + [r.info.status for r in runs]]
    title = "params" if n_params is None else f"params that differ ({len(params)} of {n_params})"
    body: list[Any] = [title] + [[k] + [fmt(v) for v in vals] for k, vals in params.items()]
    body += ["latest metrics"] + [[k] + [fmt(v) for v in vals] for k, vals in metrics.items()]
    rows = header + [r for r in body if isinstance(r, list)]
    widths = [max(len(fmt(row[i])) for row in rows) for i in range(len(runs) + 1)]
    line = lambda cells: "  ".join(fmt(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    rule = "  ".join("-" * w for w in widths)
    out = [line(row) for row in header]
    for row in body:
        out += [rule, row] if isinstance(row, str) else [line(row)]
    return "\n".join(out)


def plot_curves(client: Any, runs: Sequence[Any], names: Sequence[str], path: str | Path) -> Optional[Path]:
    """One subplot per metric in ``names`` that some run logged, one line per run; None when there is none."""
    names = list(latest_metrics(runs, names))
    if not names:
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for run in runs:
            hist = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp))
            if hist:
                ax.plot([m.step for m in hist], [m.value for m in hist], marker="." if len(hist) < 30 else None,
                        label=f"{run.info.run_name} ({run.info.run_id[:8]})")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="vitvq-stage1", help="MLflow experiment (default: vitvq-stage1)")
    parser.add_argument("--tracking-uri", default=None, help="e.g. sqlite:///mlflow.db (default: MLflow's)")
    parser.add_argument("--runs", nargs="+", default=None, help="run ids or unique prefixes (default: newest)")
    parser.add_argument("--max-runs", type=int, default=10, help="newest runs shown when --runs is not given")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric names to show")
    parser.add_argument("--plot", default=None, help="save the metric curves to this PNG")
    parser.add_argument("--all-params", action="store_true", help="list every param, not only those that differ")
    args = parser.parse_args(argv)

    client = mlflow_client(args.tracking_uri)
    runs = fetch_runs(client, args.experiment, args.runs, args.max_runs)
    if not runs:
        print(f"experiment {redact(args.experiment)!r} in {redact(client.tracking_uri)} has no runs")
        return 0
    params = differing_params(runs, args.all_params)
    n_params = None if args.all_params else len(differing_params(runs, all_params=True))
    metrics = latest_metrics(runs, args.metrics)
    print(f"experiment {redact(args.experiment)!r}: {len(runs)} run(s) from {redact(client.tracking_uri)}\n")
    print(format_table(runs, params, metrics, n_params))
    missing = [m for m in args.metrics if m not in metrics]
    if args.metrics != list(DEFAULT_METRICS) and missing:
        print(f"\nnot logged by any of these runs: {', '.join(missing)}")
    if args.plot:
        saved = plot_curves(client, runs, args.metrics, args.plot)
        print(f"\nwrote {saved}" if saved else "\nno metric to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
