"""Request parsing against the worker protocol's JSON Schema: what the schema accepts the worker
accepts, what it refuses the worker refuses, with a code and the JSON path."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from watcher_plugins.errors import ProtocolError
from watcher_plugins.nn_batch.protocol import parse_request

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "worker_protocol.schema.json").read_text())
REQUEST = jsonschema.Draft202012Validator({**SCHEMA, "oneOf": [{"$ref": "#/$defs/request"}]})
JOB = {"trial_number": 3, "fold_idx": 1, "folds": 5, "seed": 42, "data": {"embedded": "survivors", "rows": 1000},
       "params": {"hidden_layers": [256, 128, 64], "lr": 1e-3, "weight_decay": 1e-5, "dropout": 0.1}}


TRIAL = {"model_type": "nn", "trial_number": 3, "params": JOB["params"], "data": JOB["data"], "folds": 2, "seed": 42,
         "metric": "r2"}
REFIT = {"trial": TRIAL, "model_dir": "/out/models/.nn.partial-1", "fold_info": []}


def with_params(**changes):
    return {**JOB, "params": {**JOB["params"], **changes}}


VALID = [
    {"command": "ping"},
    {"command": "shutdown"},
    {"command": "train", "job": JOB},
    {"command": "train_batch", "jobs": [JOB, {**JOB, "fold_idx": 2}], "n_concurrent": 3},
    {"command": "train_batch", "jobs": [JOB], "n_concurrent": "auto", "strategy": "fused", "precision": "bf16",
     "max_epochs": 50, "patience": 5, "vram_budget_fraction": 0.5},
    {"command": "train", "job": {**JOB, "data": {"path": "/data/x.csv", "target": "y", "format": "csv"}}},
    # #20: the job's metric, the data options, a refit
    {"command": "train", "job": {**JOB, "metric": "logloss"}},
    {"command": "train", "job": {**JOB, "data": {"path": "/data/x.csv", "target": "y", "categorical": ["a", "b"],
                                                 "drop_missing_target": True, "task": "binary", "max_categories": 8}}},
    {"command": "train", "job": {**JOB, "data": {"embedded": "survivors", "rows": 1000, "task": "regression"}}},
    {"command": "refit", "job": REFIT},
    {"command": "refit", "job": {**REFIT, "fold_info": [{"best_epoch": 3}, {"best_epoch": 5}]}, "strategy": "serial"},
    # JSON Schema's "integer" takes a number with a zero fraction; so does the worker.
    {"command": "train_batch", "jobs": [{**JOB, "fold_idx": 1.0, "trial_number": 3.0,
                                         "params": {**JOB["params"], "hidden_layers": [64.0, 32]},
                                         "data": {"embedded": "survivors", "rows": 1000.0}}],
     "n_concurrent": 2.0, "max_epochs": 50.0},
]
INVALID = [
    ({"command": "fly"}, "unknown_command", "$.command"),
    ({"cmd": "ping"}, "invalid_request", "$.command"),
    ({"command": "train_batch", "jobs": []}, "invalid_job", "$.jobs"),
    ({"command": "train_batch", "jobs": [JOB], "n_concurrent": 0}, "invalid_request", "$.n_concurrent"),
    ({"command": "train_batch", "jobs": [JOB], "strategy": "warp"}, "invalid_request", "$.strategy"),
    ({"command": "train_batch", "jobs": [JOB], "precision": "fp16"}, "invalid_request", "$.precision"),
    ({"command": "train", "job": with_params(hidden_layers=[])}, "invalid_job", "$.job.params.hidden_layers"),
    ({"command": "train", "job": with_params(hidden_layers=[64, 0])}, "invalid_job", "$.job.params.hidden_layers"),
    ({"command": "train", "job": with_params(hidden_layers=[8] * 17)}, "invalid_job", "$.job.params.hidden_layers"),
    ({"command": "train", "job": with_params(lr=0)}, "invalid_job", "$.job.params.lr"),
    ({"command": "train", "job": with_params(dropout=1.0)}, "invalid_job", "$.job.params.dropout"),
    ({"command": "train", "job": with_params(weight_decay=-1)}, "invalid_job", "$.job.params.weight_decay"),
    ({"command": "train", "job": {**JOB, "folds": 1}}, "invalid_job", "$.job.folds"),
    ({"command": "train", "job": {**JOB, "data": {"embedded": "survivors", "bogus": 1}}}, "invalid_job",
     "$.job.data"),
    ({"command": "train_batch", "jobs": [JOB, {**JOB, "trial_number": True}]}, "invalid_job",
     "$.jobs[1].trial_number"),
    # A file named next to the embedded data would be silently ignored; a bad target or format would
    # fail later, without the field's name.
    ({"command": "train", "job": {**JOB, "data": {"embedded": "survivors", "path": "/data/x.csv"}}}, "invalid_job",
     "$.job.data"),
    ({"command": "train", "job": {**JOB, "data": {"path": "/data/x.csv", "target": ["y"]}}}, "invalid_job",
     "$.job.data.target"),
    ({"command": "train", "job": {**JOB, "data": {"path": "/data/x.csv", "target": ""}}}, "invalid_job",
     "$.job.data.target"),
    ({"command": "train", "job": {**JOB, "data": {"path": "/data/x.dat", "target": "y", "format": "xyz"}}},
     "invalid_job", "$.job.data.format"),
    # A key of the other data form would be ignored: refused, as the schema refuses it.
    ({"command": "train", "job": {**JOB, "data": {"path": "/data/x.csv", "rows": 100}}}, "invalid_job", "$.job.data"),
    ({"command": "train", "job": {**JOB, "data": {"embedded": "survivors", "target": "y"}}}, "invalid_job",
     "$.job.data"),
    ({"command": "train", "job": {**JOB, "data": {"embedded": "survivors", "rows": None}}}, "invalid_job",
     "$.job.data.rows"),
    ({"command": "train", "job": {**JOB, "data": {"embedded": "iris"}}}, "invalid_job", "$.job.data.embedded"),
    ({"command": "train", "job": {**JOB, "fold_idx": 1.5}}, "invalid_job", "$.job.fold_idx"),
    ({"command": "train", "job": with_params(hidden_layers=[64, 32.5])}, "invalid_job", "$.job.params.hidden_layers"),
    ({"command": "train_batch", "jobs": [JOB], "n_concurrent": 2.5}, "invalid_request", "$.n_concurrent"),
    ({"command": "train", "job": {**JOB, "metric": "f1"}}, "invalid_job", "$.job.metric"),
    ({"command": "train", "job": {**JOB, "data": {"path": "/x.csv", "categorical": "a"}}}, "invalid_job",
     "$.job.data.categorical"),
    ({"command": "train", "job": {**JOB, "data": {"path": "/x.csv", "max_categories": 1}}}, "invalid_job", "$.job.data"),
    ({"command": "train", "job": {**JOB, "data": {"path": "/x.csv", "task": "ranking"}}}, "invalid_job",
     "$.job.data.task"),
    ({"command": "train", "job": {**JOB, "data": {"path": "/x.csv", "drop_missing_target": "yes"}}}, "invalid_job",
     "$.job.data.drop_missing_target"),
    ({"command": "train", "job": {**JOB, "data": {"embedded": "survivors", "categorical": ["a"]}}}, "invalid_job",
     "$.job.data"),
    ({"command": "refit"}, "invalid_job", "$.job"),
    ({"command": "refit", "job": {**REFIT, "model_dir": ""}}, "invalid_job", "$.job.model_dir"),
    ({"command": "refit", "job": {**REFIT, "trial": {**TRIAL, "model_type": "catboost"}}}, "invalid_job",
     "$.job.trial.model_type"),
    ({"command": "refit", "job": {**REFIT, "trial": {**TRIAL, "params": {"lr": 1e-3}}}}, "invalid_job",
     "$.job.trial.params.hidden_layers"),
    ({"command": "refit", "job": {**REFIT, "fold_info": {"best_epoch": 3}}}, "invalid_job", "$.job.fold_info"),
]


@pytest.mark.parametrize("request_obj", VALID)
def test_valid_requests_are_accepted_by_schema_and_worker(request_obj):
    REQUEST.validate(request_obj)
    assert parse_request(json.dumps(request_obj).encode()).command == request_obj["command"]


@pytest.mark.parametrize("request_obj,code,path", INVALID)
def test_invalid_requests_are_refused_by_schema_and_worker_with_code_and_path(request_obj, code, path):
    assert not REQUEST.is_valid(request_obj)
    with pytest.raises(ProtocolError) as caught:
        parse_request(json.dumps(request_obj).encode())
    assert caught.value.code == code
    assert str(caught.value).startswith(path), str(caught.value)


def test_parsed_integers_are_ints():
    request = parse_request(json.dumps(VALID[-1]).encode())
    job = request.jobs[0]
    assert (job.trial_number, job.fold_idx, job.hidden_layers, job.data.rows) == (3, 1, (64, 32), 1000)
    assert all(type(v) is int for v in (job.trial_number, job.fold_idx, *job.hidden_layers, job.data.rows,
                                        request.settings.n_concurrent, request.settings.max_epochs))


@pytest.mark.parametrize("raw", [b"", b"   ", b"\t"])
def test_a_blank_line_is_refused_as_no_json(raw):
    with pytest.raises(ProtocolError, match="request line is empty") as caught:
        parse_request(raw)
    assert caught.value.code == "malformed_json"


def test_fold_index_beyond_folds_is_refused():
    # A cross-field rule that JSON Schema cannot state; the schema's job description says it.
    with pytest.raises(ProtocolError, match=r"^\$\.job\.fold_idx: expected an integer below folds \(5\)"):
        parse_request(json.dumps({"command": "train", "job": {**JOB, "fold_idx": 5}}).encode())


def test_duplicate_fold_in_a_batch_is_refused():
    with pytest.raises(ProtocolError, match="trial 3 fold 1 appears more than once"):
        parse_request(json.dumps({"command": "train_batch", "jobs": [JOB, JOB]}).encode())


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
