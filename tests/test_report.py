"""The evaluation report: PNG figures and one self-contained HTML page, rendered in a real
headless browser (Chromium) when one is installed."""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from loraflow.evaluation.evaluate import EvalResult
from loraflow.evaluation.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TUNED_BLUE = (0x1F, 0x77, 0xB4)  # the tuned model's bars
CHAMPION_ORANGE = (0xFF, 0x7F, 0x0E)


def fake_result(label: str, exact: list[float], answers: list[str]) -> EvalResult:
    rows = [
        {
            "instruction": "Extract the order",
            "input": f"order <{i}> & more",  # markup in a prompt must be escaped
            "expected": '{"sku": "AB-1"}',
            "answer": answer,
            "scores": {"exact_match": e, "fuzzy": 0.5 + e / 2, "loss": 1.0},
        }
        for i, (e, answer) in enumerate(zip(exact, answers, strict=True))
    ]
    metrics = {
        "exact_match": sum(exact) / len(exact),
        "fuzzy": 0.7,
        "fuzzy_p50": 0.7,
        "loss": 2.0 - sum(exact) / len(exact),
        "perplexity": 3.0,
        "examples": float(len(exact)),
    }
    return EvalResult(label=label, metrics=metrics, sets={"test": metrics},
                      examples={"test": rows})


@pytest.fixture
def results() -> dict[str, EvalResult]:
    return {
        "base": fake_result("base", [0, 0, 0, 1], ["nope", "no", "?", '{"sku": "AB-1"}']),
        "tuned": fake_result("tuned", [1, 1, 0, 1], ['{"sku": "AB-1"}'] * 2 + ["x", "<b>"]),
        "champion": fake_result("champion", [1, 0, 0, 1], ["a", "b", "c", "d"]),
    }


CURVES = {"train.loss": [(1, 3.0), (2, 2.2), (3, 1.5)], "train.val_loss": [(3, 1.8)]}


def test_the_report_embeds_every_figure_and_the_side_by_side_table(results, tmp_path):
    page = build_report(results, CURVES, tmp_path / "report", side_by_side=3)
    out = page.parent
    for name in ("loss_curves.png", "metric_bars.png", "fuzzy_distribution.png"):
        with Image.open(out / name) as image:
            assert image.size[0] >= 600, name
    text = page.read_text()
    embedded = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(embedded) == 3  # no links to files beside it: the page is self-contained
    assert base64.b64decode(embedded[0]) == (out / "loss_curves.png").read_bytes()
    table = text[text.index("id='side-by-side'"):]
    assert table.count("<tr class='example'>") == 3
    assert "order &lt;0&gt; &amp; more" in table and "&lt;b&gt;" not in table  # escaped; row 4 cut
    assert "<th>base</th>\n<th>tuned</th>\n<th>champion</th>" in table


def test_the_merge_check_shows_how_many_answers_differ_and_which(results, tmp_path):
    from loraflow.evaluation.evaluate import compare_answers

    adapter = results["tuned"].model_copy(update={"label": "adapter", "dtype": "fp32"},
                                          deep=True)
    adapter.examples["test"][2] = adapter.examples["test"][2] | {"answer": "<before merge>"}
    parity = compare_answers(adapter, results["tuned"], max_differing=0.5)
    assert (parity.answers, parity.differing, parity.passed) == (4, 1, True)
    page = build_report(results, CURVES, tmp_path / "r", parity=parity).read_text()
    assert "1 of 4 test answers differ between base + adapter (fp32)" in page
    table = page[page.index("id='differing'"):]
    assert "&lt;before merge&gt;" in table and table.count("<tr><td>test</td><td>3</td>") == 1


def test_without_a_loss_curve_the_report_says_so(results, tmp_path):
    page = build_report(results, {"train.loss": []}, tmp_path / "r")
    assert "No training loss was recorded" in page.read_text()
    assert not (tmp_path / "r" / "loss_curves.png").exists()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs the `chromium` browser (Debian: apt-get install chromium; .ci/run installs it)",
)
def test_the_report_renders_in_headless_chromium(results, tmp_path):
    page = build_report(results, CURVES, tmp_path / "report", side_by_side=4)
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the browser parsed three images and the table with one row per example
    assert dom.stdout.count('<img class="figure"') == 3
    assert dom.stdout.count('<tr class="example">') == 4
    assert "side-by-side" in dom.stdout and "<th>champion</th>" in dom.stdout

    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1400,4000", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    # the figures were decoded and painted: the bar colours of tuned and champion are on screen
    assert any(near(c, TUNED_BLUE) for c in colours)
    assert any(near(c, CHAMPION_ORANGE) for c in colours)


def near(colour: tuple[int, int, int], target: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 6 for a, b in zip(colour, target, strict=True))


def test_screenshot_colour_check_can_fail(tmp_path):
    """The colour check above is not trivially true: a page without figures lacks the blue."""
    blank = Image.new("RGB", (50, 50), (255, 255, 255))
    colours = {c for _, c in blank.getcolors()}
    assert not any(near(c, TUNED_BLUE) for c in colours)
    assert Path(tmp_path).is_dir()
