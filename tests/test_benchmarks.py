"""The GPU benchmarks' own code, run small on CPU so that it cannot rot between GPU runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Each runs a whole benchmark (engine processes included): tens of seconds on 2 cores.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_bench_times_every_stage_both_ways(tmp_path):
    out = tmp_path / "pipeline.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pipeline_bench.py"), "--small",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    stages = ("validate", "tokenize", "train", "evaluate", "merge")
    assert all(results["loraflow"][s]["seconds"] > 0 for s in stages)
    assert set(stages) <= results["guide"].keys()
    # the guide's training is scaled to the very tokens loraflow trained on
    assert results["guide"]["train"]["scaled_to_real_tokens"] == \
        results["loraflow"]["train"]["real_tokens"] > 0
    # the merge stage is the pipeline's: the merged model (fp32 on CPU) answers every test
    # prompt as base + adapter did
    assert results["loraflow"]["merge"]["answers_differing"] == "0/8"
    assert "| **whole loop** |" in done.stdout


def test_quality_bench_trains_and_scores_each_mode(tmp_path):
    out = tmp_path / "quality.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality_bench.py"), "--small",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"base", "fp32"}
    assert modes["fp32"]["steps"] >= 1 and 0.0 <= modes["fp32"]["exact_match"] <= 1.0
    assert "json_valid" in modes["base"]
    assert "| fp32 |" in done.stdout
