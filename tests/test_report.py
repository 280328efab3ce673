"""report.html: one offline page with the leaderboard, the studies' plots and, when sampled, GPU usage.

The studies are real Optuna studies in a SQLite file, named and searched as compare_models does it, and
the summary is built from compare_models' own ModelTypeOutcome rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from watcher_plugins import report
from watcher_plugins.compare_models import ModelTypeOutcome
from watcher_plugins.gpu_monitor import GpuSample
from watcher_plugins.manager import get_plugin_manager
from watcher_plugins.report import REPORT_FILE, leaderboard_params_study, write_report

SECTIONS = ("Leaderboard", "Model comparison", "Optimisation history", "Parameter importances")
GPU_SECTION = "GPU utilisation and memory"


def fold_mean_r2(params: dict) -> float:
    """A deterministic stand-in for a trial's mean R^2 that depends on the params, so importances differ."""
    lr = params.get("lr", params.get("learning_rate", 0.1))
    return 0.8 - 0.05 * (math.log10(lr) + 2.0) ** 2


def make_study(storage: str, model_type: str, n_complete: int, n_failed: int) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=f"report-test-{model_type}", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=7))
    for i in range(n_complete + n_failed):
        trial = study.ask()
        trial.set_user_attr("job_params", get_plugin_manager().get_model_types()[model_type].search_space(trial))
        if i < n_failed:
            trial.set_user_attr("fail_reason", "fold 0: oom: does not fit")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, fold_mean_r2(trial.params))
    return study


def summary_of(studies: dict[str, optuna.Study], unavailable: dict[str, str]) -> dict:
    """The summary as run_compare_models builds it."""
    outcomes = []
    for model_type, study in studies.items():
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
        outcomes.append(ModelTypeOutcome(
            model_type, "test_executor", "done", best.value if best else None, best.number if best else None,
            best.user_attrs["job_params"] if best else {}, len(complete),
            sum(t.state == TrialState.FAIL for t in trials), 1.5))
    return {
        "leaderboard": [asdict(o) for o in sorted(outcomes,
                                                  key=lambda o: (o.best_score is None, -(o.best_score or 0.0)))],
        "unavailable": unavailable,
        "dataset": {"name": "survivors", "rows": 600, "features": 62},
        "devices": [],
        "storage": "sqlite:///optuna.db",
        "seconds": 12.34,
        "params": {"folds": 2, "seed": 7, "data": {"embedded": "survivors", "rows": 600}},
    }


@pytest.fixture
def storage(tmp_path: Path) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.fixture
def run(tmp_path: Path, storage: str):
    """nn: 5 complete trials and 1 failed; lightgbm: 1 complete; catboost unavailable."""
    studies = {"nn": make_study(storage, "nn", n_complete=5, n_failed=1),
               "lightgbm": make_study(storage, "lightgbm", n_complete=1, n_failed=0)}
    reasons = {"catboost": "catboost is not installed: pip install 'watcher_plugins[trees]'"}
    summary = summary_of(studies, reasons)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    return output_dir, studies, summary


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """The plotly figures the page draws, by their titles, as they are drawn."""
    drawn: dict[str, object] = {}
    figure = report._ReportPage.figure

    def recording(self, fig):
        drawn[fig.layout.title.text] = fig
        return figure(self, fig)

    monkeypatch.setattr(report._ReportPage, "figure", recording)
    return drawn


def section(page: str, title: str) -> str:
    """The HTML of one <section>, found by its <h2> title."""
    match = re.search(rf"<section>\s*<h2>{re.escape(title)}</h2>(.*?)</section>", page, re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_report_has_every_section_and_the_leaderboard_values(run):
    output_dir, studies, summary = run

    path = write_report(output_dir, studies, summary, gpu_samples=None)

    assert path == output_dir / REPORT_FILE and path.is_file()
    page = path.read_text(encoding="utf-8")
    for title in SECTIONS:
        section(page, title)
    leaderboard = section(page, "Leaderboard")
    nn_row = next(row for row in summary["leaderboard"] if row["model_type"] == "nn")
    assert f"<td>{nn_row['best_score']:.4f}</td>" in leaderboard
    assert f"<td>{nn_row['best_trial']}</td>" in leaderboard
    assert "<td>5</td><td>1</td>" in leaderboard  # 5 complete, 1 failed
    assert "catboost" in leaderboard and "catboost is not installed" in leaderboard
    assert "survivors (600 rows x 62 features)" in page
    # Every model type that ran gets its own optimisation history plot.
    history = section(page, "Optimisation history")
    assert history.count('class="plotly-graph-div"') == 2


def test_plotly_is_embedded_once_and_nothing_is_fetched(run):
    output_dir, studies, summary = run
    samples = [GpuSample(0.0, 0, 10.0, 100.0, 1000.0), GpuSample(0.5, 0, 90.0, 400.0, 1000.0)]

    page = write_report(output_dir, studies, summary, gpu_samples=samples).read_text(encoding="utf-8")

    assert page.count(get_plotlyjs()) == 1
    assert page.count("plotly.js v") == 1
    assert page.count('class="plotly-graph-div"') >= 4  # several figures share the one bundle
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.I)
    assert not re.search(r"<link[^>]*\shref\s*=", page, re.I)


def test_a_one_trial_study_gets_a_note_instead_of_importances(run):
    output_dir, studies, summary = run

    importances = section(write_report(output_dir, studies, summary, None).read_text(encoding="utf-8"),
                          "Parameter importances")

    nn_part, lightgbm_part = importances.split("<h3>lightgbm</h3>")
    assert 'class="plotly-graph-div"' in nn_part
    assert ("Importances not computed: they need at least 2 complete trials, and this study has 1."
            in lightgbm_part)
    assert 'class="plotly-graph-div"' not in lightgbm_part


def test_a_study_whose_params_never_vary_gets_a_note(run, storage):
    output_dir, _, _ = run
    study = make_study(storage, "xgboost", n_complete=0, n_failed=0)
    fixed = {"max_depth": 5, "learning_rate": 0.1, "subsample": 0.8, "colsample_bytree": 0.8,
             "min_child_weight": 2.0, "reg_lambda": 1.0}
    for value in (0.5, 0.6, 0.7):
        study.enqueue_trial(fixed)
        trial = study.ask()
        trial.set_user_attr("job_params", get_plugin_manager().get_model_types()["xgboost"].search_space(trial))
        study.tell(trial, value)

    page = write_report(output_dir, {"xgboost": study}, summary_of({"xgboost": study}, {}), None)

    note = "Importances not computed: every complete trial has the same params."
    assert note in page.read_text(encoding="utf-8")


def test_a_study_with_only_failed_trials_does_not_break_the_report(run, storage):
    output_dir, _, _ = run
    study = make_study(storage, "xgboost", n_complete=0, n_failed=2)
    summary = summary_of({"xgboost": study}, {})

    page = write_report(output_dir, {"xgboost": study}, summary, None).read_text(encoding="utf-8")

    assert "<td>xgboost</td><td>test_executor</td><td>-</td><td>-</td><td>0</td><td>2</td>" in page
    assert "No complete trials to compare." in section(page, "Model comparison")
    assert "No complete trials." in section(page, "Optimisation history")
    assert "this study has 0" in section(page, "Parameter importances")


def test_gpu_section_appears_only_with_samples(run):
    output_dir, studies, summary = run

    without = write_report(output_dir, studies, summary, gpu_samples=[]).read_text(encoding="utf-8")
    assert GPU_SECTION not in without

    # Dicts as GpuMonitor.to_json() writes them are accepted as well as the records.
    samples = [{"t_s": t / 2, "gpu": gpu, "utilization_pct": 20.0 * gpu + t, "memory_used_mib": 100.0 * t,
                "memory_total_mib": 81559.0} for t in range(4) for gpu in (0, 1)]
    with_samples = write_report(output_dir, studies, summary, gpu_samples=samples).read_text(encoding="utf-8")
    gpu = section(with_samples, GPU_SECTION)
    assert "<h3>GPU 0</h3>" in gpu and "<h3>GPU 1</h3>" in gpu
    assert "4 samples over 1.5 s; mean utilisation 22%; peak memory 300 of 81,559 MiB." in gpu
    assert gpu.count('class="plotly-graph-div"') == 2


def test_text_from_the_run_is_escaped(run):
    output_dir, studies, summary = run
    summary["unavailable"] = {"xgboost": "<script>alert('x')</script> & more"}

    page = write_report(output_dir, studies, summary, None).read_text(encoding="utf-8")

    assert "<script>alert(" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page


def test_the_same_run_gives_the_same_page(run):
    output_dir, studies, summary = run
    first = write_report(output_dir, studies, summary, None).read_bytes()
    second = write_report(output_dir, studies, summary, None).read_bytes()
    assert first == second
    assert [p.name for p in output_dir.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_an_interrupted_run_says_so_and_names_what_never_ran(run):
    output_dir, studies, summary = run
    summary.update(interrupted=True, not_run=["xgboost"], params={**summary["params"], "trials": 40})

    page = write_report(output_dir, studies, summary, None).read_text(encoding="utf-8")

    assert '<p class="interrupted">This run was interrupted' in page
    board = section(page, "Leaderboard")
    assert "Not run: the run was interrupted before they started" in board and "<b>xgboost</b>" in board
    assert "40 per model type" in page
    # A finished run has neither.
    summary.update(interrupted=False, not_run=[])
    page = write_report(output_dir, studies, summary, None).read_text(encoding="utf-8")
    assert 'class="interrupted"' not in page and "Not run" not in page


def test_the_leaderboard_shows_the_most_common_failure(run):
    output_dir, studies, summary = run
    nn = next(row for row in summary["leaderboard"] if row["model_type"] == "nn")
    nn["reason"] = "out of memory even when trained alone"

    board = section(write_report(output_dir, studies, summary, None).read_text(encoding="utf-8"), "Leaderboard")

    assert "<th>most common failure</th>" in board and "out of memory even when trained alone" in board


def test_trial_number_axes_have_whole_number_ticks_only(run, figures):
    output_dir, studies, summary = run

    write_report(output_dir, studies, summary, None)

    for model_type in studies:
        xaxis = figures[f"{model_type}: optimisation history"].layout.xaxis
        assert xaxis.title.text == "trial number"
        assert (xaxis.tickmode, xaxis.tick0, xaxis.dtick, xaxis.tickformat) == ("linear", 0, 1, "d")
        # half a trial of room at each end: trial 0's marker is drawn whole, and no trial -1 is ticked
        last = max(t.number for t in studies[model_type].get_trials(deepcopy=False))
        assert tuple(xaxis.range) == (-0.5, last + 0.5)


@pytest.mark.parametrize("last, step", [(0, 1), (5, 1), (10, 1), (11, 2), (20, 2), (21, 5), (50, 5),
                                        (51, 10), (100, 10), (199, 20), (1000, 100), (1001, 200)])
def test_a_long_study_gets_fewer_ticks_still_whole_numbers(last, step):
    ticks = report._trial_number_ticks(last)
    assert ticks["dtick"] == step and isinstance(ticks["dtick"], int) and ticks["tickformat"] == "d"
    assert last / step <= 10


def test_importances_are_named_as_the_leaderboard_names_the_params(run, figures):
    output_dir, studies, summary = run

    page = write_report(output_dir, studies, summary, None).read_text(encoding="utf-8")

    nn = next(row for row in summary["leaderboard"] if row["model_type"] == "nn")
    assert "hidden_layers" in nn["best_params"] and "n_layers" not in nn["best_params"]
    bars = figures["nn: parameter importances"].data[0]
    assert "hidden_layers" in bars.y and set(bars.y) <= set(nn["best_params"])  # not n_layers, first_width
    assert sum(bars.x) == pytest.approx(1.0)
    importances = section(page, "Parameter importances")
    assert '"hidden_layers"' in importances
    assert '"n_layers"' not in importances and '"first_width"' not in importances


def test_importances_are_measured_on_the_leaderboards_params(run):
    _, studies, _ = run
    study = studies["nn"]

    shown = leaderboard_params_study(study)

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert [t.value for t in shown.trials] == [t.value for t in complete]
    first = shown.trials[0]
    # hidden_layers, derived from n_layers and first_width, is one categorical: its importance is the shape's
    assert isinstance(first.distributions["hidden_layers"], optuna.distributions.CategoricalDistribution)
    assert first.params["hidden_layers"] == str(complete[0].user_attrs["job_params"]["hidden_layers"])
    # a param Optuna asked for and the job ran as it is keeps its distribution
    assert first.distributions["lr"] == complete[0].distributions["lr"] and first.distributions["lr"].log
    assert "n_layers" not in first.params and "first_width" not in first.params
    assert study.trials[0].params.keys() >= {"n_layers", "first_width"}  # the study itself is not changed


def test_the_header_names_the_target_and_the_metric(run):
    output_dir, studies, summary = run

    page = write_report(output_dir, studies, summary, None).read_text(encoding="utf-8")
    target = "y (the embedded survivors data&#x27;s target)"
    assert f"<h1>compare_models report: {target}, scored by mean R²</h1>" in page
    assert f"<title>compare_models report: {target}, scored by mean R²</title>" in page
    assert f"<tr><th>target</th><td>{target}</td></tr>" in page
    assert ("<tr><th>metric</th><td>R² (coefficient of determination, higher is better), each trial&#x27;s mean "
            "over the 2 folds</td></tr>") in page
    assert "<th>best mean R²</th>" in section(page, "Leaderboard")

    summary["params"]["data"] = {"path": "/data/survivors.csv", "target": "quality"}
    page = write_report(output_dir, studies, summary, None).read_text(encoding="utf-8")
    assert "<h1>compare_models report: quality, scored by mean R²</h1>" in page
    assert "<tr><th>target</th><td>quality</td></tr>" in page


@pytest.mark.parametrize("given, in_summary, in_params, shown", [
    ("rmse", None, None, "RMSE"), (None, "mae", None, "MAE"), ("logloss", "r2", None, "log loss"),
    (None, "auc", "r2", "ROC AUC"), (None, None, "accuracy", "accuracy"), (None, "pinball", None, "pinball")])
def test_another_metric_is_named_where_the_page_names_the_values(run, figures, given, in_summary, in_params,
                                                                  shown):
    """write_report's metric, else the summary's, else its params', else r2: a step scoring by other metrics
    gets them named."""
    output_dir, studies, summary = run
    if in_summary:
        summary["metric"] = in_summary
    summary["params"]["metric"] = in_params  # null: the param left to its default

    page = write_report(output_dir, studies, summary, None, metric=given).read_text(encoding="utf-8")

    assert f"scored by mean {shown}</h1>" in page and f"<tr><th>metric</th><td>{shown}" in page
    assert f"<th>best mean {shown}</th>" in section(page, "Leaderboard")
    assert figures["nn: optimisation history"].layout.yaxis.title.text == f"mean {shown}"
    assert "R²" not in page


def test_params_read_to_4_significant_digits_in_the_leaderboards():
    from watcher_plugins.report import params_text

    params = {"depth": 6, "learning_rate": 0.12597917800794736, "hidden_layers": [64, 32], "lr": 2.5824694e-05,
              "bootstrap": "Bayesian", "on": True}
    assert params_text(params) == ('{"depth": 6, "learning_rate": 0.126, "hidden_layers": [64, 32], '
                                   '"lr": 2.582e-05, "bootstrap": "Bayesian", "on": true}')
    assert params_text({"x": 1.0}, separators=(",", ":")) == '{"x":1.0}'
