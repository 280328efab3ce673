"""pack_kernels.py's kernels compile for an NVIDIA Hopper GPU, every variant, on this GPU-less machine
(tox -e kernels): Triton's interpreter accepts code that its compiler refuses (a bf16 variant once did),
and CI has no GPU to find out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels


def test_every_kernel_variant_compiles_for_sm_90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache of an earlier run
    script = Path(__file__).with_name("kernel_builds.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "kernel variants compiled for sm_90" in done.stdout
