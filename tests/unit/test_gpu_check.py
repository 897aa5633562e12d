"""benchmarks/gpu_check.py without a GPU: one line and exit 0; its code path
(training steps, layer against dense, the JSON report) at toy sizes on the
CPU with --cpu-smoke."""
import json
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks")


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import gpu_check as module
    return module


def test_without_cuda_one_line_and_exit_0(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: no CUDA device")


def test_cpu_smoke_runs_every_step(gpu_check, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["train"]["finite"] and report["train"]["tokens_per_s"] > 0
    assert [(r["E"], r["K"]) for r in report["layer"]] == [(8, 2), (64, 8)]
    assert all(r["moe_over_dense"] > 0 for r in report["layer"])
    assert "MoE layer vs dense" in capsys.readouterr().out
