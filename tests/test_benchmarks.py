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


def test_gate_bench_judges_each_scenario_with_both_gates(tmp_path):
    out = tmp_path / "gate.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gate_bench.py"), "--small", "--seeds", "2",
         "--real-seeds", "11", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    summary = results["summary"]
    scenarios = " ".join(summary)
    assert "true nulls" in scenarios and "recipe nulls" in scenarios and "planted" in scenarios
    # a true null is the same weights: the new gate never promotes one
    nulls = [row for name, row in summary.items() if name.startswith("true nulls")]
    assert nulls and all(row["new"] == 0 for row in nulls)
    # every trial was judged by both gates on the same two evaluations
    for trial in results["trials"]:
        assert {"promote", "delta"} <= trial["old"].keys()
        assert {"promote", "lower", "p_value", "wins", "losses"} <= trial["new"].keys()
    assert "| scenario | trials | old gate promoted | new gate promoted |" in done.stdout
