"""The tree worker over its real pipes: every request is checked against
schemas/tree_worker_protocol.schema.json; one it refuses gets an error line with a code and a message
naming the JSON path, and the worker keeps serving. Every reply matches the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schemas" / "tree_worker_protocol.schema.json").read_text())
REPLY = jsonschema.Draft202012Validator({**SCHEMA, "oneOf": [{"$ref": "#/$defs/reply"}]})
CONFIG = {"placement": {"slot": 0, "gpu": None, "cores": []}, "rounds": 5, "early_stopping_rounds": 2}


@pytest.fixture
def worker():
    process = subprocess.Popen([sys.executable, "-m", "watcher_plugins.tree_parallel.worker", "--config",
                                json.dumps(CONFIG)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    yield process
    process.kill()
    process.wait()


def _reply(worker) -> dict:
    line = worker.stdout.readline()
    assert line, "the worker closed its stdout"
    reply = json.loads(line)
    REPLY.validate(reply)
    return reply


def _ask(worker, raw: str) -> dict:
    worker.stdin.write(raw + "\n")
    worker.stdin.flush()
    return _reply(worker)


JOB = {"model_type": "lightgbm", "trial_number": 0, "params": {}, "data": {"embedded": "survivors", "rows": 200},
       "folds": 2, "seed": 1}


@pytest.mark.parametrize("raw, code, message", [
    ("{not json", "malformed_json", "not a request: not JSON: '{not json'"),
    ('["ping"]', "invalid_request", "not a request the protocol allows: $: ['ping'] is not of type 'object'"),
    ('{"command": "fit"}', "invalid_request",
     "not a request the protocol allows: $.command: 'fit' is not one of ['ping', 'train', 'shutdown', 'refit']"),
    (json.dumps({"command": "train", "job": JOB}), "invalid_request",
     "not a request the protocol allows: $: 'folds' is a required property"),
    (json.dumps({"command": "train", "job": {**JOB, "folds": "two", "extra": 1}, "folds": [0]}), "invalid_request",
     "not a request the protocol allows: $.job: Additional properties are not allowed ('extra' was unexpected); "
     "$.job.folds: 'two' is not of type 'integer'"),
    (json.dumps({"command": "train", "job": {**JOB, "data": {"rows": 200}}, "folds": [0]}), "invalid_request",
     'not a request the protocol allows: $.job.data: {"rows": 200} is not valid: expected the embedded data '
     '({"embedded": "survivors", "rows": N}) or a file ({"path": FILE, ...})'),
], ids=["not-json", "not-an-object", "unknown-command", "no-folds", "bad-job", "no-data-source"])
def test_a_request_the_schema_refuses_gets_an_error_naming_the_path_and_the_worker_serves_on(worker, raw, code,
                                                                                             message):
    assert _reply(worker)["event"] == "ready"
    error = _ask(worker, raw)
    assert error["event"] == "error" and error["code"] == code
    assert error["message"] == message
    assert _ask(worker, '{"command": "ping"}')["event"] == "pong"  # still serving


def test_the_pools_requests_are_what_the_schema_allows():
    from watcher_plugins.records import DataRef, RefitJob, TrialJob

    validator = jsonschema.Draft202012Validator({**SCHEMA, "oneOf": [{"$ref": "#/$defs/request"}]})
    job = TrialJob("catboost", 4, {"depth": 4}, DataRef(path="d.csv", target="y"), 5, 3)
    refit = RefitJob(job, "/out/models/.catboost.partial-1", [{"best_iteration": 12, "device": "cpu"}] * 5)
    for request in ({"command": "ping"}, {"command": "shutdown"},
                    {"command": "train", "job": job.to_json(), "folds": [0, 1, 2, 3, 4], "catboost_gpu_ram_part": None},
                    {"command": "train", "job": job.to_json(), "folds": [2], "catboost_gpu_ram_part": 0.95},
                    {"command": "refit", "job": refit.to_json(), "catboost_gpu_ram_part": None}):
        validator.validate(request)
