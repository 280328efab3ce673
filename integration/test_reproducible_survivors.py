"""The survivors study's results do not move: the installed `watcher-agent` runs step 5 on the embedded
survivors data (nn, catboost, lightgbm and xgboost on the CPU, tests/golden/regenerate.py's PARAMS and
tox's env) and its trials.jsonl, without timings and sorted, equals tests/golden/survivors_trials.jsonl
byte for byte. That file was made at 592990d, before #22's renovation (tests/golden/README.md says how,
and on which machine class: the floats are this CPU's and these library versions'). A change that moves
any fold's R² to the last bit fails here; regenerate the file only for a change meant to move results.
"""

from __future__ import annotations

import difflib
import importlib.util
import shutil
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"
_spec = importlib.util.spec_from_file_location("survivors_golden", GOLDEN_DIR / "regenerate.py")
assert _spec is not None and _spec.loader is not None
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


def test_the_survivors_study_gives_the_golden_trials_jsonl(tmp_path):
    agent = shutil.which("watcher-agent")
    assert agent is not None, "watcher-agent is not on PATH: this scenario tests the installed package"
    got = golden.canonical_text(golden.run_step_5([agent], tmp_path))
    expected = golden.GOLDEN.read_text()
    if got != expected:
        got_lines, expected_lines = got.splitlines(), expected.splitlines()
        first = next((i for i, (g, e) in enumerate(zip(got_lines, expected_lines)) if g != e),
                     min(len(got_lines), len(expected_lines)))
        diff = list(difflib.unified_diff(expected_lines, got_lines, "golden", "this run", lineterm="", n=1))
        raise AssertionError(
            f"trials.jsonl differs from {golden.GOLDEN} ({len(got_lines)} lines, golden {len(expected_lines)}); "
            f"first difference at sorted line {first + 1}:\n  golden:   "
            f"{expected_lines[first] if first < len(expected_lines) else '(none)'}\n  this run: "
            f"{got_lines[first] if first < len(got_lines) else '(none)'}\n"
            + "\n".join(diff[:60]) + ("\n..." if len(diff) > 60 else "")
            + f"\n(the golden floats are for the machine class and versions in {GOLDEN_DIR / 'README.md'})")
