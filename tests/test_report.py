"""Reports from hand-made evaluation results: content, determinism, DVC plot data, HTML rendering."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401
from pipeline.errors import FusionError
from pipeline.report import REPORT_FILES, dvc_plots, write_report

CHROMIUM = Path("/usr/bin/chromium")


def m(acc, loss, n=20):
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": acc, "n": n}


def inputs():
    """Two adapters (tasks up, inc), a text task, two fusions: one keeps everything, one does not."""
    prompts = ["up abcd", "inc 1234", "pipes | and `ticks`"]
    baselines = {
        "base": {"up": m(0.0, 3.1), "inc": m(0.0, 2.9), "prose": m(None, 2.5),
                 "generations": {p: "abcd" for p in prompts}},
        "adapters": {
            "up_adapter": {"up": m(1.0, 0.05), "inc": m(0.0, 2.0), "prose": m(None, 2.4),
                           "generations": dict(zip(prompts, ["ABCD", "1234", "x\x02y"]))},
            "inc_adapter": {"up": m(0.0, 2.2), "inc": m(0.9, 0.07), "prose": m(None, 2.6),
                            "generations": dict(zip(prompts, ["abcd", "2345", ""]))},
        },
    }
    params = {
        "same": {"adapters": ["up_adapter", "inc_adapter"], "method": "linear", "weights": [1.0, 1.0],
                 "seed": 0},
        "ties_half": {"adapters": ["up_adapter", "inc_adapter"], "method": "ties", "weights": [0.5, 0.5],
                      "density": 0.5, "majority_sign_method": "total", "rank": 8, "seed": 1},
    }
    evals = {
        # metrics equal to each source's on its own task: retention exactly 1
        "same": {"up": m(1.0, 0.05), "inc": m(0.9, 0.07), "prose": m(None, 2.45),
                 "generations": dict(zip(prompts, ["ABCD", "2345", "hi"]))},
        "ties_half": {"up": m(0.5, 0.9), "inc": m(0.9, 0.1), "prose": m(None, 2.45),
                      "generations": dict(zip(prompts, ["ABcd", "2345", "hi there"]))},
    }
    modules = {f"model.layers.{i}.self_attn.{p}_proj": {
        "rank": 8, "error": 0.01 * i, "cosine": [[1.0, 0.1 * i - 0.05], [0.1 * i - 0.05, 1.0]],
        "sign_conflict": 0.45, "norms": [1.0, 2.0], "fused_norm": 2.5} for i in range(2) for p in "qv"}
    infos = {name: {
        "method": params[name]["method"],
        "inputs": [{"name": "up_adapter", "path": "adapters/up", "sha256": "a" * 64},
                   {"name": "inc_adapter", "path": "adapters/inc", "sha256": "b" * 64}],
        "output": {"path": f"fused/{name}", "sha256": f"{i}" * 64},
        "modules": modules,
    } for i, name in enumerate(params)}
    tasks_of = {"up_adapter": "up", "inc_adapter": "inc"}
    return dict(params=params, baselines=baselines, evals=evals, infos=infos, tasks_of=tasks_of)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    return out, write_report(out, **inputs())


def test_files_written(report):
    out, written = report
    assert set(written) == set(REPORT_FILES)
    for role, path in written.items():
        assert path == out / REPORT_FILES[role] and path.stat().st_size > 0
    assert not list(out.rglob("*.tmp"))


def test_metrics_shape_and_retention(report):
    out, _ = report
    metrics = json.loads((out / "metrics.json").read_text())
    same = metrics["fusions"]["same"]
    assert same["mean_retention"] == 1.0 and same["worst_retention"] == 1.0
    assert same["tasks"]["up"] == {"accuracy": 1.0, "loss": 0.05, "retention": 1.0}
    assert same["tasks"]["prose"] == {"loss": 2.45}  # not a source task: no retention
    assert same["worse_than_routing"] is False
    half = metrics["fusions"]["ties_half"]
    assert half["worst_retention"] == 0.5 and half["worse_than_routing"] is True
    assert metrics["base"]["prose"] == {"loss": 2.5}
    assert set(metrics["adapters"]) == {"up_adapter", "inc_adapter"}
    assert json.loads((out / "headline.json").read_text()) == {"same": {"mean": 1.0, "worst": 1.0},
                                                               "ties_half": {"mean": 0.75, "worst": 0.5}}


def test_report_mentions_every_fusion_and_task(report):
    out, _ = report
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    data = inputs()
    for text in (md, page):
        for name in [*data["params"], "up_adapter", "inc_adapter", "up", "inc", "prose"]:
            assert name in text
        assert "ties_half</strong> is worse than routing" in text or \
            "**ties_half** is worse than routing" in text
        assert "is as good as routing" in text
        assert "a" * 64 in text and "1" * 64 in text  # input and output hashes
        assert "Best by mean retention" in text
    for role in ("scores_figure", "retention_figure", "geometry_figure", "weights_figure"):
        assert f"]({REPORT_FILES[role]})" in md
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page  # self-contained
    # model output is shown literally, table syntax escaped
    assert "x\\x02y" in md and "\\|" in md


def test_same_inputs_same_bytes(report, tmp_path):
    out, written = report
    again = write_report(tmp_path, **inputs())
    for role, path in written.items():
        assert again[role].read_bytes() == path.read_bytes(), role
    png = (out / REPORT_FILES["scores_figure"]).read_bytes()
    assert png.startswith(b"\x89PNG") and b"tIME" not in png and b"Software" not in png


def test_dvc_plots_entries_match_the_data(report):
    out, _ = report
    for entry in dvc_plots("reports"):
        (path, props), = entry.items()
        assert path.startswith("reports/")
        rows = json.loads((out / path[len("reports/"):]).read_text())
        assert rows and all(props["x"] in r and props["y"] in r for r in rows)
        assert props["template"] in ("bar_horizontal", "scatter")
    labels = {r["label"] for r in json.loads((out / REPORT_FILES["retention_plot"]).read_text())}
    assert labels == {"same | up", "same | inc", "ties_half | up", "ties_half | inc"}


def test_dvc_yaml_declares_every_plot():
    import yaml

    declared = yaml.safe_load((Path(__file__).parent.parent / "dvc.yaml").read_text())["plots"]
    for entry in dvc_plots("reports"):
        assert entry in declared


def test_retention_against_weight(report, tmp_path):
    out, _ = report
    rows = json.loads((out / REPORT_FILES["weights_plot"]).read_text())
    got = {(r["fusion"], r["task"]): (r["weight"], r["retention"]) for r in rows}
    assert got == {("same", "up"): (1.0, 1.0), ("same", "inc"): (1.0, 1.0),
                   ("ties_half", "up"): (0.5, 0.5), ("ties_half", "inc"): (0.5, 1.0)}
    # per-layer weights count by their mean; SLERP of two adapters has no weights to plot against
    data = inputs()
    data["params"]["same"]["weights"] = [[1.0, 0.5], [0.0, 0.5]]
    data["params"]["ties_half"] = {"adapters": ["up_adapter", "inc_adapter"], "method": "slerp", "t": 0.5,
                                   "weights": [0.5, 0.5]}
    written = write_report(tmp_path, **data)
    rows = json.loads(written["weights_plot"].read_text())
    assert {(r["fusion"], r["task"]): r["weight"] for r in rows} == {("same", "up"): 0.75, ("same", "inc"): 0.25}


def test_inconsistent_inputs(tmp_path):
    data = inputs()
    del data["evals"]["same"]
    with pytest.raises(FusionError, match="'same': no evaluation"):
        write_report(tmp_path, **data)
    data = inputs()
    data["params"]["same"]["adapters"].append("missing_adapter")
    with pytest.raises(FusionError, match="missing_adapter"):
        write_report(tmp_path, **data)


def test_without_fusion_info(tmp_path):
    data = inputs()
    data["infos"] = None
    written = write_report(tmp_path, **data)
    assert "geometry_figure" not in written
    assert "Geometry" not in (tmp_path / "report.md").read_text()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium to render the HTML report "
                    "(apt-get install chromium)")
def test_html_renders(report, tmp_path):
    import matplotlib.image

    out, _ = report
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         (out / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    pixels = np.asarray(matplotlib.image.imread(shot))
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels[..., :3].std() > 0.05  # not blank


def evidence_inputs():
    """inputs() plus what the evidence needs: validation scores, drift, random controls, the joint
    adapter and the fuse step's signals."""
    x = inputs()
    b = x["baselines"]
    b["base"]["drift"] = {"kl": 0.0, "loss": 1.0, "agreement": 1.0, "n": 8, "tokens": 30}
    for name, kl in (("up_adapter", 0.02), ("inc_adapter", 0.03)):
        b["adapters"][name]["drift"] = {"kl": kl, "loss": 1.1, "agreement": 0.9, "n": 8, "tokens": 30}
        b["adapters"][name]["valid"] = {"up": m(1.0, 0.05), "inc": m(0.0, 2.0)} if name == "up_adapter" \
            else {"up": m(0.0, 2.0), "inc": m(1.0, 0.05)}
    b["adapters"]["joint"] = {"up": m(0.8, 0.2), "inc": m(0.45, 0.3), "prose": m(None, 2.5),
                              "drift": {"kl": 0.05, "loss": 1.3, "agreement": 0.8, "n": 8, "tokens": 30}}
    x["params"]["linear_half"] = {"adapters": ["up_adapter", "inc_adapter"], "method": "linear",
                                  "weights": [0.5, 0.5], "seed": 0}
    x["evals"]["linear_half"] = {"up": m(0.95, 0.1), "inc": m(0.6, 0.2)}
    x["infos"]["linear_half"] = dict(x["infos"]["same"], method="linear")
    # valid: linear_half is better on validation, although `same` is better on test
    for name, acc in (("same", 0.5), ("ties_half", 0.4), ("linear_half", 0.9)):
        x["evals"][name]["valid"] = {"up": m(acc, 0.5), "inc": m(acc, 0.5)}
        x["evals"][name]["drift"] = {"kl": 0.04, "loss": 1.2, "agreement": 0.85, "n": 8, "tokens": 30}
    for i, name in enumerate(x["params"]):
        x["infos"][name]["signals"] = {
            "adapters": [{"name": "up_adapter", "kept": 0.3 + 0.3 * i, "alignment": 0.9},
                         {"name": "inc_adapter", "kept": 0.9, "alignment": 0.8}],
            "min_kept": 0.3 + 0.3 * i, "min_alignment": 0.8, "energy_kept": 1.0, "mean_overlap": 0.1,
            "interference": 0.2, "warnings": ["the fusion keeps 0.10 of adapter 'x'"] if i == 0 else []}
    controls = {name: {"seed": 0, "adapters": ["up_adapter", "inc_adapter"],
                       "scores": {"up": m(0.0, 3.0), "inc": m(0.1, 2.8)},
                       "drift": {"kl": 0.2, "loss": 2.0, "agreement": 0.5, "n": 8, "tokens": 30},
                       "signals": {"min_kept": 0.01, "min_alignment": 0.3, "mean_overlap": 0.0}}
                for name in x["params"]}
    return dict(x, controls=controls, joint="joint")


def test_evidence_sections(tmp_path):
    write_report(tmp_path, **evidence_inputs())
    md = (tmp_path / "report.md").read_text()
    assert md.index("## League table") < md.index("## Fusions") < md.index("## Off-task drift")
    league = md[md.index("## League table"):md.index("## Fusions")]
    # the linear row is the setting best on validation (linear_half), not the best on test (same)
    row = next(line for line in league.splitlines() if line.startswith("| **linear**"))
    assert "linear_half" in row and "valid (2)" in row
    assert "| **ties** | ties_half | only setting" in league
    assert "**joint training**" in league and "**routing**" in league
    assert "random control of same" in md and "## Quality signals that need no data" in md
    assert "keeps 0.10 of adapter" in md
    headline = json.loads((tmp_path / "headline.json").read_text())
    assert headline["same"]["random"] == pytest.approx(0.0 / 1.0 * 0.5 + 0.1 / 0.9 * 0.5)
    assert headline["same"]["joint"] == pytest.approx((0.8 + 0.5) / 2)
    assert headline["linear_half"]["kl"] == 0.04
    power = json.loads((tmp_path / "signals.json").read_text())
    assert power["signals"]["min_kept"]["n"] == 3  # three fusions
    assert power["signals"]["min_kept"]["with_controls"]["n"] == 6  # and their controls
    assert power["best"] is None and power["fit"] is None  # no fit on fewer than 4 fusions
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["drift"]["joint"]["kl"] == 0.05
    assert metrics["fusions"]["same"]["valid_mean_retention"] == pytest.approx(0.5)


def test_joint_must_be_declared(tmp_path):
    x = evidence_inputs()
    x["joint"] = "nope"
    with pytest.raises(FusionError, match="joint-training adapter 'nope'"):
        write_report(tmp_path, **x)
