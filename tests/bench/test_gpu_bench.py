"""`python -m bench.gpu` says why it measured nothing where there is no GPU (CI), and measures where there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--json", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the measuring test runs instead")
def test_without_a_gpu_it_says_why_and_measures_nothing():
    result = _bench("--quick")
    assert result["bench"] == "gpu" and "no CUDA device" in result["skipped"]
    assert "clip" not in result


def test_a_bad_device_index_is_refused_naming_it():
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--device-index", "-1"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "--device-index must be >= 0, got -1" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_on_a_gpu_it_measures_moves_against_the_copy_limit_and_the_vram_returned():
    result = _bench("--quick")
    assert result["copy_limit"]["pinned_gb_s"] > 0 and result["clip"]["to_gpu_s"] > 0
    assert result["to_gpu_vs_pinned_limit"] >= 0.5  # a move cannot beat the link by much (timer granularity)
    assert result["returned_share"] >= 0.75  # invariant 4's threshold: the weights' VRAM really came back
    assert result["nvml"]["p50_us"] > 0
