"""The one child-process stack both executors' workers use (child_process.py), with tiny Python children:
messages checked against the protocol's schema and delivered in order, bad lines named for what is
wrong with them, stderr kept for a death's reason, pinning, and stops that are bounded."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import time

import pytest

from watcher_plugins import child_process
from watcher_plugins.child_process import BadLine, ChildProcess, protocol_schema
from watcher_plugins.errors import WorkerCrashed

TREE_REPLIES = protocol_schema("tree_worker_protocol.schema.json", "reply")
TREE_REQUESTS = protocol_schema("tree_worker_protocol.schema.json", "request")
NN_REPLIES = protocol_schema("worker_protocol.schema.json", "reply")


def _child(script: str, **kwargs) -> tuple[ChildProcess, queue.Queue]:
    received: queue.Queue = queue.Queue()
    child = ChildProcess([sys.executable, "-c", textwrap.dedent(script)], "test child", received.put, **kwargs)
    assert child.start()
    return child, received


def _until_end(received: queue.Queue) -> list:
    items = []
    while True:
        item = received.get(timeout=30)
        if item is None:
            return items
        items.append(item)


def test_lines_are_delivered_in_order_and_bad_ones_say_what_is_wrong():
    child, received = _child(r"""
        import sys
        sys.stdout.write('{"event": "done", "trial_number": 3, "retiring": false}\n')
        sys.stdout.write('this is no JSON\n')
        sys.stdout.write('{"event": "fold", "result": {"trial_number": 3, "fold_idx": "first"}}\n')
        sys.stdout.write('{"event": "error", "code": "malformed_json", "message": "not JSON"}\n')
    """, replies=TREE_REPLIES)
    done, not_json, invalid, error = _until_end(received)
    assert done == {"event": "done", "trial_number": 3, "retiring": False}
    assert isinstance(not_json, BadLine) and str(not_json) == "a line that is not JSON: b'this is no JSON\\n'"
    assert isinstance(invalid, BadLine)
    assert invalid.problem.startswith("its protocol does not allow: ")
    assert "$.result: 'model_type' is a required property" in invalid.problem
    assert "$.result.fold_idx: 'first' is not of type 'integer'" in invalid.problem
    assert error["code"] == "malformed_json"
    assert child.stdout_closed and child.exit_code() == 0


def test_an_nn_reply_the_schema_refuses_names_the_field_of_its_own_kind():
    # The NN reply schema is a oneOf over kinds of reply: the problem is the "result" branch's, not a
    # list of every branch the line is not.
    child, received = _child(r"""
        print('{"event": "result", "status": "ok", "trial_number": 1, "fold_idx": 0, "score": null}')
    """, replies=NN_REPLIES)
    [bad] = _until_end(received)
    assert bad.problem == "its protocol does not allow: $.score: None is not of type 'number'"


def test_a_bad_reply_ends_the_nn_worker_with_the_problem():
    from watcher_plugins.nn_batch.client import WorkerProcess

    worker = WorkerProcess(None)  # never started: the reply is put where its reader would put it
    worker._replies.put(BadLine(b'{"event": "pong"}\n', "its protocol does not allow: $: 'status' is a "
                                                          "required property"))
    with pytest.raises(WorkerCrashed) as raised:
        worker.next_reply(timeout=1)
    assert str(raised.value) == ("NN worker on CPU stopped: bad_reply: the worker wrote a line that its protocol "
                                 "does not allow: $: 'status' is a required property: b'{\"event\": \"pong\"}\\n'")


def test_requests_the_tree_schema_refuses_are_named_by_json_path():
    assert TREE_REQUESTS.problem({"command": "ping"}) is None
    assert TREE_REQUESTS.problem({"command": "train"}) == ("$: 'folds' is a required property; "
                                                         "$: 'job' is a required property")
    assert TREE_REQUESTS.problem({"command": "fit"}) == "$.command: 'fit' is not one of ['ping', 'train', 'shutdown', 'refit']"
    job = {"model_type": "lightgbm", "trial_number": 0, "params": {}, "data": {"embedded": "survivors"},
           "folds": 3, "seed": -1}
    assert TREE_REQUESTS.problem({"command": "train", "job": job, "folds": [0, "1"]}) == (
        "$.folds[1]: '1' is not of type 'integer'; $.job.seed: -1 is less than the minimum of 0")
    assert TREE_REQUESTS.problem({"command": "train", "job": {**job, "seed": 0}, "folds": [0],
                                  "catboost_gpu_ram_part": 0}) == "$.catboost_gpu_ram_part: 0 is less than or equal to the minimum of 0"


def test_stderr_is_drained_into_a_ring_and_a_marker_starts_a_new_section():
    child, received = _child(r"""
        import sys
        for i in range(30):
            sys.stderr.write(f"line {i}\n")
        sys.stderr.write("MARK trial 2\n")
        sys.stderr.flush()
        sys.stderr.buffer.write(b"caf\xe9\n\n")
        sys.stderr.buffer.write(b"x" * 200000 + b"\n")  # more than a pipe holds
        print('{"event": "done", "trial_number": 2, "retiring": false}')
    """, replies=TREE_REPLIES, stderr_lines=5, stderr_marker="MARK")
    assert len(_until_end(received)) == 1
    assert child.exit_code() == 0
    assert list(child.stderr_since_marker) == ["caf\\xe9", "x" * 200000]
    assert list(child.stderr_tail) == ["line 27", "line 28", "line 29", "caf\\xe9", "x" * 200000]
    assert child.last_stderr(1) == ["x" * 200000]


def test_stderr_to_a_log_quotes_only_what_this_child_wrote(tmp_path):
    log_path = tmp_path / "logs" / "worker.log"
    log_path.parent.mkdir()
    log_path.write_text("an earlier child's last words\n")
    child, received = _child("import sys; sys.stderr.write('mine\\n'); sys.exit(3)", stderr_log=log_path)
    assert _until_end(received) == []
    assert child.exit_code() == 3
    assert child.last_stderr(15) == ["mine"]
    assert log_path.read_text() == "an earlier child's last words\nmine\n"  # appended to


def test_the_child_is_pinned_to_its_gpu_or_to_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    script = "import json, os; print(json.dumps({k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'EXTRA')}))"
    for gpu, visible in ((1, "1"), (None, "")):
        child, received = _child(script, gpu=gpu, env={"EXTRA": "yes"})
        assert _until_end(received) == [{"CUDA_VISIBLE_DEVICES": visible, "EXTRA": "yes"}]
        child.exit_code()


def test_a_child_killed_before_it_starts_never_starts():
    child = ChildProcess([sys.executable, "-c", "pass"], "test child", lambda item: None)
    child.kill()
    assert child.start() is False and child.process is None and not child.alive
    assert child.send({"command": "ping"}) is False  # as to a dead child


def test_stop_waits_until_its_deadline_then_kills_and_send_to_the_dead_says_so():
    child, received = _child("import time; time.sleep(120)")  # ignores its stdin and any shutdown
    child.ask_to_stop({"command": "shutdown"})
    started = time.monotonic()
    assert child.stop(started + 0.5)
    assert 0.5 <= time.monotonic() - started < 10
    assert child.exit_code() == -9
    assert child.send({"command": "ping"}) is False
    assert _until_end(received) == []


def test_a_child_that_outlives_sigkill_is_left_behind_with_a_warning(monkeypatch, caplog):
    child, _ = _child("import time; time.sleep(120)")
    monkeypatch.setattr(child_process, "KILL_WAIT_S", 0.2)

    def never(timeout=None):  # as a process stuck in the kernel: SIGKILL does not end it
        raise subprocess.TimeoutExpired(child.argv, timeout)

    try:
        monkeypatch.setattr(child.process, "wait", never)
        assert child.kill_and_wait(consequence="its lease stays held") is False
        assert (f"test child (pid {child.pid}) did not exit within 0.2s of SIGKILL (stuck in the kernel, as in a "
                "hung GPU driver call); its lease stays held") in caplog.text
    finally:
        monkeypatch.undo()
        child.kill_and_wait()

