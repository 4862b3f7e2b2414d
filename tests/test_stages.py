"""Every stage script that a dvc.yaml names imports and answers --help (a stage only the slow
real-model project runs would otherwise break unnoticed until someone retrains)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stage_modules() -> list[str]:
    names = set()
    for dvc_yaml in (ROOT / "dvc.yaml", ROOT / "real" / "dvc.yaml"):
        names |= set(re.findall(r"python -m (pipeline\.stages\.\w+)", dvc_yaml.read_text()))
    return sorted(names)


def test_every_stage_script_is_named():
    on_disk = {f"pipeline.stages.{p.stem}" for p in (ROOT / "pipeline" / "stages").glob("*.py")
               if p.stem != "__init__"}
    assert set(stage_modules()) == on_disk


@pytest.mark.parametrize("module", stage_modules())
def test_stage_script_answers_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout
