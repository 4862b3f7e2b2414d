"""fusion studio: the library on a built demo project, and the page in a real headless Chromium.

One scratch copy of the project (a small demo whose base model already copies words, so every model
answers with text) is built with `dvc repro` and committed once per module. The browser tests start
`fusion studio` as a subprocess on a free port, drive the system Chromium with Playwright (never a
downloaded browser) and save screenshots under test-artifacts/studio/. They are skipped when Gradio,
Playwright or Chromium is missing (`pip install -e '.[studio,studio-test]'`, `apt-get install chromium`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REDUCED_DEMO, ROOT, scratch_project, sh, tool_env
from pipeline.errors import FusionError
from pipeline.studio import (LiveScorer, LiveSettings, Project, baseline_rows, checked, compare_figures,
                             compare_rows, experiment_args, experiment_rows, fusion_rows, initial_settings)
from pipeline.studio.project import dvc_json

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "studio"
# The reduced demo with a base model pretrained long enough to copy words (about 10 s more).
DEMO = {**REDUCED_DEMO, "pretrain_steps": 150}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = scratch_project(tmp_path_factory.mktemp("studio") / "project", demo=DEMO)
    sh("dvc", "repro", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "pipeline run", cwd=root)
    return root


@pytest.fixture(scope="module")
def project(built) -> Project:
    return Project.open(built)


# ---------------------------------------------------------------------------- without a browser


def test_the_tables_show_the_committed_report(project, built):
    metrics = json.loads((built / "reports" / "metrics.json").read_text())
    data = project.report()
    rows = {r["fusion"]: r for r in fusion_rows(data)}
    assert list(rows) == project.fusions
    for name, m in metrics["fusions"].items():
        assert rows[name]["mean retention"] == round(m["mean_retention"], 4)
        assert rows[name]["worst retention"] == round(m["worst_retention"], 4)
        for task, t in m["tasks"].items():
            assert rows[name][f"retention {task}"] == round(t["retention"], 4)
    base = {r["model"]: r for r in baseline_rows(data)}
    for task, s in metrics["base"].items():
        assert base["base"][f"loss {task}"] == round(s["loss"], 4)
    for adapter, ev in metrics["adapters"].items():
        for task, s in ev.items():
            assert base[f"adapter {adapter}"][f"loss {task}"] == round(s["loss"], 4)


def test_comparing_fusions_puts_their_figures_side_by_side(project):
    data = project.report()
    rows = {r["figure"]: r for r in compare_rows(data, ["sum", "ties"])}
    assert rows["method"]["sum"] == "linear" and rows["method"]["ties"] == "ties"
    assert rows["mean retention"]["ties"] == round(data["fusions"]["ties"]["retention"]["mean_retention"], 4)
    figures = compare_figures(data, ["sum", "ties"])
    assert set(figures) == {"retention", "scores"}
    assert all(png.startswith(b"\x89PNG") for png in figures.values())
    assert compare_figures(data, ["sum", "ties"]) == figures          # same data, same bytes
    assert compare_figures(data, ["sum"]) != figures                   # drawn for the chosen ones
    assert compare_figures(data, ["no-such-fusion"]) == {}


def test_the_live_score_is_the_retention_of_the_fused_settings(project):
    scorer = LiveScorer(project, examples=4)
    start = initial_settings(project, "average")
    assert start == LiveSettings("average", "linear", (0.5, 0.5), 0.5, 0.5)
    first = scorer.score(start)
    assert set(first["tasks"]) == {"up", "inc"} and first["examples"] == 4
    assert first["mean_retention"] == pytest.approx(sum(t["retention"] for t in first["tasks"].values()) / 2)
    # weights [1, 0] are adapter `up` alone: it keeps all of up's score on up
    alone = scorer.score(replace(start, weights=(1.0, 0.0)))
    assert alone["tasks"]["up"]["retention"] == pytest.approx(1.0, abs=1e-4)
    assert alone["tasks"]["inc"]["retention"] != pytest.approx(first["tasks"]["inc"]["retention"], abs=1e-6)
    assert first["seconds"] < 30


def test_settings_from_the_page_are_checked_before_anything_runs(project):
    good = LiveSettings("ties", "ties", (1.0, 0.5), 0.3, 0.5)
    clean, spec = checked(project, good)
    assert spec.method == "ties" and spec.weights == [1.0, 0.5] and spec.density == 0.3
    for bad, message in [
        (replace(good, fusion="../../etc"), "unknown fusion"),
        (replace(good, method="rm -rf"), "unknown method"),
        (replace(good, weights=(1.0,)), "give 2 weights"),
        (replace(good, weights=(1.0, float("nan"))), "must be a number"),
        (replace(good, weights=(1.0, 9.0)), "must be in"),
        (replace(good, density=0.0), "density"),
        (replace(good, t=1.5), "t must be in"),
        (replace(good, density=1.5), "density"),
    ]:
        with pytest.raises(FusionError, match=message):
            checked(project, bad)


def test_save_as_experiment_is_one_argument_list_of_validated_settings(project):
    args = experiment_args(project, LiveSettings("ties", "ties", (1.0, 0.5), 0.3, 0.9))
    assert Path(args[0]).name == "dvc" and args[1:4] == ["exp", "run", "--temp"]
    assert args[4::2] == ["-S"] * 3     # method, weights, density: t is not read by ties
    assert args[5::2] == ["++fusions.ties.method=ties", "++fusions.ties.weights=[1.0,0.5]",
                          "++fusions.ties.density=0.3"]
    slerp = experiment_args(project, LiveSettings("slerp", "slerp", (0.5, 0.5), 0.5, 0.25))
    assert slerp[5::2] == ["++fusions.slerp.method=slerp", "++fusions.slerp.t=0.25"]  # slerp of 2 reads t only
    with pytest.raises(FusionError):
        experiment_args(project, LiveSettings("ties; touch x", "ties", (1.0, 0.5), 0.3, 0.9))


def test_the_experiment_table_reads_dvc_exp_show(project):
    rows = experiment_rows(dvc_json(project.root, ["exp", "show", "--json"]))
    assert rows[0]["experiment"] == "workspace"
    head = sh("git", "rev-parse", "HEAD", cwd=project.root).stdout.strip()
    assert any(r["rev"] == head[:7] for r in rows)
    headline = json.loads((project.root / "reports" / "headline.json").read_text())
    for name, h in headline.items():
        assert rows[0][f"{name} mean"] == round(h["mean"], 4)


def test_streamed_answers_are_the_evaluation_generations(project):
    from pipeline.evaluate import generate_samples
    from pipeline.studio.generate import Models, labels, stream_answers

    models = Models(project)
    try:
        steps = list(stream_answers(models, "up abcd", "sum", 8))
    finally:
        models.close()
    final = steps[-1]
    assert len(final) == len(labels(project)) == 2 + len(project.adapters)
    for earlier in steps:                      # streaming: every column only grows
        assert all(f.startswith(e) for e, f in zip(earlier, final))
    assert len(steps) > 1
    base = project.base_model()
    assert final[0] == generate_samples(base, None, ["up abcd"], 8)[0] != ""
    assert final[1] == generate_samples(base, project.adapter_path("up"), ["up abcd"], 8)[0]
    assert final[-1] == generate_samples(base, project.fused_path("sum"), ["up abcd"], 8)[0] != ""


def test_the_command_needs_a_valid_port(built):
    r = subprocess.run([str(Path(sys.executable).parent / "fusion"), "studio", "--port", "70000"], cwd=built,
                       capture_output=True, text=True, env=tool_env(), timeout=60)
    assert r.returncode == 2 and "error: --port must be in 1..65535" in r.stderr


# ---------------------------------------------------------------------------- in a browser

_skip = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None or importlib.util.find_spec("playwright") is None
    or not Path(CHROMIUM).exists(),
    reason="needs gradio and playwright (pip install -e '.[studio,studio-test]') and Debian's chromium")


def needs_browser(test):
    """A test of the page in Chromium (`pytest -m browser` runs these alone)."""
    return pytest.mark.browser(_skip(test))


@pytest.fixture(scope="module")
def server(built):
    """`fusion studio` on a free port in the built project; stopped by its pid."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fusion"), "studio", "--examples", "4"], cwd=built,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env())
    try:
        deadline = time.time() + 120
        url = None
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"fusion studio: (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, f"the studio did not start (exit {proc.poll()})"
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    shots = tmp_path_factory.mktemp("screenshots")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        pg.goto(server)
        pg.wait_for_selector("#fusions-table")
        pg.shots = shots
        yield pg
        browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):
        shutil.copy(png, ARTIFACTS / png.name)


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(pg.shots / f"{name}.png"), full_page=True)


def tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()


def text_of(pg, selector: str) -> str:
    return pg.locator(selector).inner_text()


@needs_browser
def test_page_loads_with_the_fusions_and_their_scores(page, built):
    metrics = json.loads((built / "reports" / "metrics.json").read_text())
    table = text_of(page, "#fusions-table")
    for name, m in metrics["fusions"].items():
        assert name in table and f"{round(m['mean_retention'], 4)}" in table
    assert "adapter up" in text_of(page, "#baselines-table")
    page.wait_for_function("document.querySelector('#experiments-table').innerText.includes('workspace')")
    for name in ("sum", "ties"):
        page.get_by_role("checkbox", name=name, exact=True).check()
    page.wait_for_function("(t => t.includes('mean retention') && t.includes('ties') && !t.includes('processing'))"
                           "(document.querySelector('#compare-table').innerText)")
    page.wait_for_selector("#compare-retention img")
    compared = text_of(page, "#compare-table")
    assert "sh: retention" not in compared       # the tasks of the chosen fusions only
    shot(page, "1-reports")


@needs_browser
def test_a_generation_returns_text_for_base_and_a_fusion(page):
    tab(page, "Generate")
    page.fill("#gen-prompt textarea", "up abcd")
    page.click("#gen-go")
    page.wait_for_function("document.querySelector('#gen-status').innerText.includes('done')")
    base = page.input_value("#gen-base textarea")
    fusion = page.input_value("#gen-fusion textarea")
    assert base.strip() and fusion.strip()
    shot(page, "2-generate")


def live_score(pg) -> str:
    return text_of(pg, "#live-score")


def set_slider(pg, elem_id: str, fraction: float) -> None:
    """Click the slider's track at ``fraction`` of its width, as a person would."""
    track = pg.locator(f"#{elem_id} input[type=range]")
    box = track.bounding_box()
    pg.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)


@needs_browser
def test_moving_a_slider_changes_the_live_score(page):
    tab(page, "Try settings")
    set_slider(page, "live-weight-0", 0.8)
    page.wait_for_function("document.querySelector('#live-score').innerText.includes('mean retention')")
    first = live_score(page)
    weights = re.compile(r"weights (\[[^\]]*\])")
    set_slider(page, "live-weight-1", 0.2)
    page.wait_for_function("(t => /mean retention/.test(t) && (t.match(/weights (\\[[^\\]]*\\])/) || [])[1] !== "
                           f"{json.dumps(weights.search(first).group(1))})(document.querySelector('#live-score').innerText)")
    second = live_score(page)
    assert weights.search(second).group(1) != weights.search(first).group(1)
    number = re.compile(r"mean retention ([0-9.]+)")
    assert number.search(first).group(1) != number.search(second).group(1)
    shot(page, "3-live")


@needs_browser
def test_save_as_experiment_produces_a_dvc_experiment_with_those_params(page, built):
    tab(page, "Try settings")
    weights = [float(page.input_value(f"#live-weight-{i} input[type=number]")) for i in range(2)]
    page.click("#save-exp")
    page.wait_for_function("document.querySelector('#save-status').innerText.includes('saved')", timeout=900_000)
    shown = dvc_json(built, ["exp", "show", "--json"])
    exps = [rev for entry in shown for group in entry.get("experiments") or [] for rev in group["revs"]]
    assert exps, "no experiment was recorded"
    params = [r["data"]["params"]["params.yaml"]["data"]["fusions"]["average"] for r in exps]
    assert any(p["method"] == "linear" and p["weights"] == pytest.approx(weights) and set(p) ==
               {"adapters", "method", "weights"} for p in params), params
    assert sh("git", "status", "--porcelain", cwd=built).stdout == ""   # the workspace is left as it was
    tab(page, "Reports")
    page.wait_for_function("document.querySelector('#experiments-table').innerText.split('\\n').length > 3")
    shot(page, "4-experiment")


@needs_browser
def test_the_page_api_takes_only_declared_names_and_checked_values(server):
    """What a page event receives can be sent by anything that reaches the port: Gradio's own client
    shows that a score call is answered for declared names and refused for anything else."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    text, _ = client.predict("average", "linear", 1.0, 0.0, 0.0, 0.5, 0.5, api_name="/score")
    assert "mean retention" in text and "weights [1.0, 0.0]" in text
    for bad in [("../../etc", "linear", 1.0, 0.0, 0.0, 0.5, 0.5),      # not a declared fusion
                ("average", "rm -rf", 1.0, 0.0, 0.0, 0.5, 0.5),        # not a method
                ("average", "linear", 50.0, 0.0, 0.0, 0.5, 0.5)]:      # out of the sliders' range
        with pytest.raises(Exception):
            client.predict(*bad, api_name="/score")
    # nor does the server hand out the project's files or any other: only what the page made
    import urllib.error
    import urllib.request

    for path in ("params.yaml", "reports/metrics.json", "/etc/passwd", "../../../etc/passwd"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{server}gradio_api/file={path}", timeout=30)
