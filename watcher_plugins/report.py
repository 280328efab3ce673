"""output_dir/report.html: the leaderboard and the plots of one compare_models run, on one page.

The page is self-contained so that it can be mailed, archived or opened on a machine with no network:
plotly.js is embedded once, inline, and every figure is drawn by it. Every piece of text that comes from
the run (model types, params, reasons) is HTML-escaped; plotly escapes what goes into its JSON.
"""

from __future__ import annotations

import html
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from pathlib import Path

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

REPORT_FILE = "report.html"
_TEMPLATE = "plotly_white"

#: The metric a study's values are, where neither the caller nor the summary names one.
DEFAULT_METRIC = "r2"
#: How the page names a metric, and what it measures. A metric not listed is shown by its key.
METRICS: dict[str, tuple[str, str]] = {
    "r2": ("R²", "coefficient of determination, higher is better"),
    "rmse": ("RMSE", "root mean squared error, lower is better"),
    "mae": ("MAE", "mean absolute error, lower is better"),
    "logloss": ("log loss", "lower is better"),
    "auc": ("ROC AUC", "area under the ROC curve, higher is better"),
    "accuracy": ("accuracy", "higher is better"),
}
#: What a trial's value is called on the page for the default metric (each value is a mean over the folds).
OBJECTIVE_NAME = f"mean {METRICS[DEFAULT_METRIC][0]}"
#: At most this many ticks on a trial-number axis; they are whole numbers whatever the count.
_MAX_TRIAL_TICKS = 10


def metric_display_name(metric: str) -> str:
    """"R²" for "r2", "RMSE" for "rmse", ...; an unknown metric as it is named."""
    return METRICS.get(metric, (metric, ""))[0]


def write_report(output_dir: Path, studies: dict[str, optuna.Study], summary: dict,
                 gpu_samples: list | None, metric: str | None = None) -> Path:
    """Write output_dir/report.html from the studies (by model type), the run's summary and GPU samples.

    ``gpu_samples`` are ``GpuSample`` records or their dicts (``GpuMonitor.samples`` or
    ``GpuMonitor.to_json()["samples"]``); with none, the page has no GPU section. ``metric`` is what the
    studies' values are (a key of METRICS); by default the summary's ``metric``, else its params' (a metric
    param), else r2. Returns the path.
    """
    page = _ReportPage(metric or summary.get("metric") or (summary.get("params") or {}).get("metric")
                       or DEFAULT_METRIC)
    page.add_header(summary)
    page.add_leaderboard(summary)
    page.add_model_comparison(studies)
    page.add_optimization_histories(studies)
    page.add_param_importances(studies)
    if gpu_samples:
        page.add_gpu_usage([_sample_dict(sample) for sample in gpu_samples])
    path = Path(output_dir) / REPORT_FILE
    _write_atomically(path, page.render())
    return path


class _ReportPage:
    """Collects the sections as HTML fragments; figures share the one embedded plotly.js."""

    def __init__(self, metric: str = DEFAULT_METRIC) -> None:
        self.sections: list[str] = []
        self._figure_count = 0
        self.metric = metric
        self.objective = f"mean {metric_display_name(metric)}"  # each trial's value: the mean over its folds
        self.title = "compare_models report"

    def figure(self, fig: go.Figure) -> str:
        self._figure_count += 1
        fig.update_layout(template=_TEMPLATE)
        # A stable div id per figure keeps two reports of the same run byte-identical (easy to diff); a fixed
        # height, because plotly's default "100%" of a page section with no height of its own is nothing.
        return pio.to_html(fig, full_html=False, include_plotlyjs=False,
                           div_id=f"figure-{self._figure_count}", default_height=f"{fig.layout.height or 460}px",
                           config={"displaylogo": False, "responsive": True})

    def section(self, title: str, body: str) -> None:
        self.sections.append(f"<section>\n<h2>{_esc(title)}</h2>\n{body}\n</section>")

    def add_header(self, summary: dict) -> None:
        facts = []
        params = summary.get("params") or {}
        target = _target_name(summary)
        name, measures = METRICS.get(self.metric, (self.metric, ""))
        self.title = "compare_models report: " + (f"{target}, " if target else "") + f"scored by {self.objective}"
        if target:
            facts.append(("target", target))
        folds = f" over the {params['folds']} folds" if "folds" in params else " over the folds"
        facts.append(("metric", f"{name}" + (f" ({measures})" if measures else "") + f", each trial's mean{folds}"))
        dataset = summary.get("dataset")
        if dataset:
            facts.append(("dataset", f"{dataset.get('name')} ({dataset.get('rows')} rows x "
                                     f"{dataset.get('features')} features)"))
        if "folds" in params:
            facts.append(("cross-validation", f"{params['folds']}-fold"))
        if "devices" in summary:
            devices = summary["devices"]
            facts.append(("devices", ", ".join(f"GPU {d}" for d in devices) if devices else "CPU"))
        if summary.get("storage"):
            facts.append(("Optuna storage", summary["storage"]))
        if summary.get("seconds") is not None:
            facts.append(("run time", f"{summary['seconds']:.1f} s"))
        if "trials" in params:
            facts.append(("trials asked for", f"{params['trials']} per model type"))
        rows = "\n".join(f"<tr><th>{_esc(key)}</th><td>{_esc(value)}</td></tr>" for key, value in facts)
        banner = ""
        if summary.get("interrupted"):
            # A page mailed or archived on its own must not pass for a finished run.
            banner = ('\n<p class="interrupted">This run was interrupted: the results are those of the trials '
                      "that finished before it stopped.</p>")
        self.sections.append(f'<h1>{_esc(self.title)}</h1>{banner}\n<table class="facts">\n{rows}\n</table>')

    def add_leaderboard(self, summary: dict) -> None:
        head = ("model type", "executor", f"best {self.objective}", "best trial", "trials complete",
                "trials failed", "most common failure", "seconds", "best params")
        rows = []
        for row in summary.get("leaderboard", []):
            cells = (row.get("model_type"), row.get("executor"), _fmt_score(row.get("best_score")),
                     _fmt_optional(row.get("best_trial")), row.get("trials_complete"),
                     row.get("trials_failed"), row.get("reason") if row.get("trials_failed") else "",
                     _fmt_seconds(row.get("seconds")),
                     params_text(row.get("best_params") or {}))
            rows.append("<tr>" + "".join(f"<td>{_esc(cell)}</td>" for cell in cells) + "</tr>")
        if rows:
            body = ('<table class="leaderboard">\n<tr>' + "".join(f"<th>{_esc(h)}</th>" for h in head)
                    + "</tr>\n" + "\n".join(rows) + "\n</table>")
        else:
            body = _note("No model type finished.")
        unavailable = summary.get("unavailable") or {}
        if unavailable:
            items = "\n".join(f"<li><b>{_esc(model_type)}</b>: {_esc(reason)}</li>"
                              for model_type, reason in unavailable.items())
            body += f'\n<h3>Unavailable</h3>\n<ul class="unavailable">\n{items}\n</ul>'
        not_run = summary.get("not_run") or []
        if not_run:
            items = "\n".join(f"<li><b>{_esc(model_type)}</b></li>" for model_type in not_run)
            body += f'\n<h3>Not run: the run was interrupted before they started</h3>\n<ul class="not-run">\n{items}\n</ul>'
        self.section("Leaderboard", body)

    def add_model_comparison(self, studies: dict[str, optuna.Study]) -> None:
        completed = {model_type: _completed(study) for model_type, study in studies.items()}
        completed = {model_type: trials for model_type, trials in completed.items() if trials}
        if not completed:
            self.section("Model comparison", _note("No complete trials to compare."))
            return
        fig = go.Figure()
        for model_type, trials in completed.items():
            fig.add_trace(go.Box(
                x=[model_type] * len(trials), y=[t.value for t in trials], name=model_type,
                boxpoints="all", jitter=0.4, pointpos=0, showlegend=False,
                text=[f"trial {t.number}" for t in trials],
                hovertemplate="%{text}<br>" + self.objective + " %{y:.4f}<extra></extra>"))
        bests = {model_type: _best(trials) for model_type, trials in completed.items()}
        winner = max(bests, key=lambda model_type: (bests[model_type].value, model_type))
        fig.add_trace(go.Scatter(
            x=list(bests), y=[t.value for t in bests.values()], mode="markers",
            name="best trial of each model type",
            marker={"symbol": "star", "size": 16, "line": {"width": 1, "color": "black"},
                    "color": ["gold" if model_type == winner else "white" for model_type in bests]},
            text=[f"best trial {t.number}" for t in bests.values()],
            hovertemplate="%{text}<br>" + self.objective + " %{y:.4f}<extra></extra>"))
        fig.update_layout(title=f"{self.objective} of every complete trial (gold star: best overall, "
                                f"{winner})", yaxis_title=self.objective, xaxis_title="model type", legend={"orientation": "h"})
        self.section("Model comparison", self.figure(fig))

    def add_optimization_histories(self, studies: dict[str, optuna.Study]) -> None:
        parts = []
        for model_type, study in studies.items():
            parts.append(f"<h3>{_esc(model_type)}</h3>")
            if not _completed(study):
                parts.append(_note("No complete trials."))
                continue
            fig = optuna.visualization.plot_optimization_history(study, target_name=self.objective)
            fig.update_layout(title=f"{model_type}: optimisation history")
            last = max(t.number for t in study.get_trials(deepcopy=False))
            fig.update_xaxes(title_text="trial number", **_trial_number_ticks(last))
            parts.append(self.figure(fig))
        self.section("Optimisation history", "\n".join(parts) or _note("No studies."))

    def add_param_importances(self, studies: dict[str, optuna.Study]) -> None:
        parts = []
        for model_type, study in studies.items():
            parts.append(f"<h3>{_esc(model_type)}</h3>")
            fig, why_not = _param_importance_figure(study, self.objective)
            if fig is None:
                parts.append(_note(f"Importances not computed: {why_not}."))
                continue
            fig.update_layout(title=f"{model_type}: parameter importances")
            parts.append(self.figure(fig))
        self.section("Parameter importances", "\n".join(parts) or _note("No studies."))

    def add_gpu_usage(self, samples: list[dict]) -> None:
        by_gpu: dict[int, list[dict]] = {}
        for sample in sorted(samples, key=lambda s: (s["gpu"], s["t_s"])):
            by_gpu.setdefault(int(sample["gpu"]), []).append(sample)
        parts = []
        for gpu, gpu_samples in by_gpu.items():
            times = [s["t_s"] for s in gpu_samples]
            utilization = [s["utilization_pct"] for s in gpu_samples]
            used = [s["memory_used_mib"] for s in gpu_samples]
            total = max(s["memory_total_mib"] for s in gpu_samples)
            parts.append(f"<h3>GPU {gpu}</h3>")
            parts.append(f"<p>{len(gpu_samples)} samples over {times[-1] - times[0]:.1f} s; mean utilisation "
                         f"{sum(utilization) / len(utilization):.0f}%; peak memory {max(used):,.0f} of "
                         f"{total:,.0f} MiB.</p>")
            fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                                subplot_titles=("utilisation (%)", "memory used (MiB)"))
            fig.add_trace(go.Scatter(x=times, y=utilization, mode="lines", name="utilisation %"),
                          row=1, col=1)
            fig.add_trace(go.Scatter(x=times, y=used, mode="lines", name="memory used"), row=2, col=1)
            fig.add_trace(go.Scatter(x=[times[0], times[-1]], y=[total, total], mode="lines",
                                     name="memory total", line={"dash": "dash"}), row=2, col=1)
            fig.update_yaxes(range=[0, 100], row=1, col=1)
            fig.update_yaxes(rangemode="tozero", row=2, col=1)
            fig.update_xaxes(title_text="seconds since the run started", row=2, col=1)
            fig.update_layout(title=f"GPU {gpu}: utilisation and memory over time", height=520)
            parts.append(self.figure(fig))
        self.section("GPU utilisation and memory", "\n".join(parts))

    def render(self) -> str:
        # The bundle contains no "</script>", which is how plotly's own to_html can inline it too.
        plotly_js = get_plotlyjs()
        body = "\n".join(self.sections)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(self.title)}</title>\n"
            f"<style>{_CSS}</style>\n"
            f'<script type="text/javascript">{plotly_js}</script>\n'
            f"</head>\n<body>\n{body}\n</body>\n</html>\n"
        )


def _target_name(summary: dict) -> str | None:
    """The target column, from the data param the run had (or a ``target`` the summary names)."""
    if summary.get("target"):
        return str(summary["target"])
    data = (summary.get("params") or {}).get("data")
    if not isinstance(data, dict):
        return None
    if data.get("target"):
        return str(data["target"])
    if data.get("path"):
        return "y (the file's y array)"  # an .npz file: its arrays are X and y
    if data.get("embedded"):
        return f"y (the embedded {data['embedded']} data's target)"
    return None


def _trial_number_ticks(last: int) -> dict:
    """Axis settings for trial numbers 0..last: whole-number ticks only, at most _MAX_TRIAL_TICKS of them
    (steps of 1, 2, 5, 10, 20, 50, ...)."""
    step = 1
    while last / step > _MAX_TRIAL_TICKS:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2  # 1, 2, 5, 10, 20, 50, ...
    # half a trial of room at each end: a marker on trial 0 (or the last) is drawn whole, not cut by the axis
    return {"tickmode": "linear", "tick0": 0, "dtick": step, "tickformat": "d", "range": [-0.5, last + 0.5]}


def params_text(params: dict, separators: tuple[str, str] = (", ", ": ")) -> str:
    """A trial's params as JSON for people to read: floats to 4 significant digits (0.1259791780079
    reads 0.126); summary.json keeps them whole."""
    def short(value):
        if isinstance(value, float) and math.isfinite(value):
            return float(f"{value:.4g}")
        if isinstance(value, list):
            return [short(v) for v in value]
        return value

    return json.dumps({name: short(value) for name, value in params.items()}, separators=separators, default=str)


def leaderboard_params_study(study: optuna.Study) -> optuna.Study:
    """The complete trials of ``study`` with the params the leaderboard shows (each trial's job params) in
    place of Optuna's own, so that importances are named and measured as the leaderboard's params.

    A shown param that is one of Optuna's, with the same values, keeps its distribution (``lr``); one
    derived from several (the NN's ``hidden_layers`` from ``n_layers`` and ``first_width``) becomes a
    categorical over the values the trials had, so its importance is that of the whole shape, interactions
    included. A param with one value only is left out. In memory; the study is not changed.
    """
    trials = _completed(study)
    shown = [_shown_params(t) for t in trials]
    names = list(dict.fromkeys(name for params in shown for name in params))
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    encode: dict[str, bool] = {}
    for name in names:
        having = [(t, params[name]) for t, params in zip(trials, shown) if name in params]
        values = [value for _, value in having]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < 2:
            continue  # the same in every trial: nothing to measure
        own = {repr(t.distributions.get(name)) for t, _ in having}
        if len(own) == 1 and all(name in t.params and t.params[name] == value
                                 and type(t.params[name]) is type(value) for t, value in having):
            distributions[name], encode[name] = having[0][0].distributions[name], False  # Optuna's own param
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            distributions[name] = optuna.distributions.FloatDistribution(float(min(values)), float(max(values)))
            encode[name] = False
        else:
            choices = sorted({json.dumps(v, sort_keys=True, default=str) for v in values})
            distributions[name], encode[name] = optuna.distributions.CategoricalDistribution(choices), True
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" is no news
    try:
        derived = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for t, params in zip(trials, shown):
        kept = {name: params[name] for name in distributions if name in params}
        derived.add_trial(optuna.trial.create_trial(
            params={name: (json.dumps(v, sort_keys=True, default=str) if encode[name]
                           else float(v) if isinstance(distributions[name], optuna.distributions.FloatDistribution)
                           else v) for name, v in kept.items()},
            distributions={name: distributions[name] for name in kept}, value=t.value))
    return derived


def _shown_params(trial: FrozenTrial) -> dict:
    """The params the leaderboard shows for a trial: those its job ran with (set when it was told)."""
    job_params = trial.user_attrs.get("job_params")
    return job_params if isinstance(job_params, dict) else dict(trial.params)


def _param_importance_figure(study: optuna.Study, objective: str = OBJECTIVE_NAME
                             ) -> tuple[go.Figure | None, str | None]:
    """The importance plot of the leaderboard's params, or None and the reason it would be empty or
    meaningless."""
    trials = _completed(study)
    if len(trials) < 2:
        return None, f"they need at least 2 complete trials, and this study has {len(trials)}"
    shown = leaderboard_params_study(study)
    if not any(t.params for t in shown.trials):
        return None, "every complete trial has the same params"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fig = optuna.visualization.plot_param_importances(shown, target_name=objective)
        except Exception as exc:  # the evaluators raise ValueError/RuntimeError on degenerate studies
            return None, f"{type(exc).__name__}: {exc}"
    # Optuna's default evaluator does not raise on too few trials: it warns and returns equal
    # importances, which would plot as a confident-looking but meaningless bar chart.
    degenerate = [str(w.message) for w in caught if "importances will be equal" in str(w.message).lower()]
    if degenerate:
        return None, degenerate[0].rstrip(".")
    return fig, None


def _completed(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials with a finite value, in trial-number order."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    finite = (t for t in trials if t.value is not None and math.isfinite(t.value))
    return sorted(finite, key=lambda t: t.number)


def _best(trials: Iterable[FrozenTrial]) -> FrozenTrial:
    """Highest value; on a tie the earliest trial, as the leaderboard picks it."""
    return max(trials, key=lambda t: (t.value, -t.number))


def _sample_dict(sample) -> dict:
    return asdict(sample) if is_dataclass(sample) and not isinstance(sample, type) else dict(sample)


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _fmt_score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_optional(value) -> str:
    return "-" if value is None else str(value)


def _fmt_seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so that a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its file is 0600, while open() honours the umask like every other output.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
table.leaderboard td:nth-child(n+3):nth-child(-n+6), table.leaderboard td:nth-child(8) {
  text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { background: #f4f4f4; }
p.note { color: #666; font-style: italic; }
p.interrupted { background: #fff3cd; border: 1px solid #e0c36a; padding: 0.5em 0.8em; }
section { margin-top: 2em; }
"""
