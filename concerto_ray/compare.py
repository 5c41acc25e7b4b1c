"""MLflow runs side by side: the params that tell them apart, their final metrics, and their loss curves as a PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from concerto_ray.errors import ConfigError

# Params shown even when every run has the same value, matched on the last dotted part of the key
# ("optim.lr" matches "lr"): they say at a glance what was trained and how.
HEADLINE_PARAMS = frozenset({"name", "lr", "batch_size", "epochs", "max_steps", "seed"})
MISSING = "-"


@dataclass
class _Row:
    label: str
    values: list[str]


def compare_runs(
    run_ids_or_names: list[str],
    tracking_uri: str | None = None,
    out: str | Path = "compare.png",
    experiment: str | None = None,
) -> str:
    """Return an aligned text table of the runs' params and metrics, and plot their loss curves to `out`.

    Each run is given by its id or its name (names are looked up in `experiment`, or in every experiment).
    Params appear when their values differ between the runs, or when they are headline params. Every metric
    shows its final value; loss metrics ("loss" and "*_loss") also show their minimum over the run.
    """
    if not run_ids_or_names:
        raise ConfigError("compare: give at least one run id or name")
    client = MlflowClient(tracking_uri)
    runs = [_find_run(client, ref, experiment) for ref in run_ids_or_names]
    # Full histories only for the losses: they are what gets plotted, and other metrics show their final value.
    histories = [
        {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics if _is_loss(key)}
        for run in runs
    ]
    rows = [_Row("run id", [run.info.run_id for run in runs])]
    rows += _param_rows(runs)
    rows += _metric_rows(runs, histories)
    table = _format_table([run.info.run_name or run.info.run_id for run in runs], rows)
    curves = sorted({key for history in histories for key in history})
    if not curves:
        return table + "\nno loss metrics to plot"
    _plot_losses(runs, histories, curves, Path(out))
    return table + f"\nloss curves: {out}"


def _find_run(client: MlflowClient, ref: str, experiment: str | None) -> Run:
    """The run named `ref`, or else the run whose id is `ref`; a name shared by several runs is an error."""
    if experiment is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"compare: no MLflow experiment named {experiment!r}")
        experiment_ids = [found.experiment_id]
    quote = '"' if "'" in ref else "'"
    named = client.search_runs(experiment_ids, filter_string=f"attributes.run_name = {quote}{ref}{quote}")
    if len(named) > 1:
        ids = ", ".join(run.info.run_id for run in named)
        raise ConfigError(f"compare: run name {ref!r} matches {len(named)} runs ({ids}); give a run id instead")
    if named:
        return named[0]
    try:
        return client.get_run(ref)
    except MlflowException:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise ConfigError(
            f"compare: no MLflow run with id or name {ref!r} in {where} at {client.tracking_uri}"
        ) from None


def _param_rows(runs: list[Run]) -> list[_Row]:
    keys = sorted({key for run in runs for key in run.data.params})
    rows = []
    for key in keys:
        values = [run.data.params.get(key, MISSING) for run in runs]
        if len(set(values)) > 1 or key.rsplit(".", 1)[-1] in HEADLINE_PARAMS:
            rows.append(_Row(f"param {key}", values))
    return rows


def _metric_rows(runs: list[Run], histories: list[dict]) -> list[_Row]:
    rows = []
    for key in sorted({key for run in runs for key in run.data.metrics}):
        rows.append(_Row(f"{key} final", [_number(run.data.metrics.get(key)) for run in runs]))
        if _is_loss(key):
            minima = [min((m.value for m in history.get(key, [])), default=None) for history in histories]
            rows.append(_Row(f"{key} min", [_number(value) for value in minima]))
    return rows


def _is_loss(key: str) -> bool:
    return key == "loss" or key.endswith("_loss")


def _number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.6g}"


def _format_table(headers: list[str], rows: list[_Row]) -> str:
    label_width = max(len(row.label) for row in rows)
    widths = [max(len(header), *(len(row.values[i]) for row in rows)) for i, header in enumerate(headers)]

    def line(label: str, cells: list[str]) -> str:
        return "  ".join([label.ljust(label_width), *(c.ljust(w) for c, w in zip(cells, widths))]).rstrip()

    return "\n".join([line("", headers), *(line(row.label, row.values) for row in rows)])


def _plot_losses(runs: list[Run], histories: list[dict], curves: list[str], out: Path) -> None:
    figure = Figure(figsize=(6, 3.2 * len(curves)), layout="constrained")
    FigureCanvasAgg(figure)  # renders without a display, whatever backend pyplot is set to
    axes = figure.subplots(len(curves), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, curves):
        for run, history in zip(runs, histories):
            points = sorted((m.step, m.value) for m in history.get(key, []))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=run.info.run_name or run.info.run_id[:8])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
