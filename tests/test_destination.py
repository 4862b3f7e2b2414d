"""The tool never writes to, above or inside an input, and only replaces a directory it wrote itself:
every rule with real adapters and the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import make_mlx_adapter, make_peft_adapter, run_cli, tree_bytes
from pipeline.destination import check_destination, clean_leftovers, start_partial
from pipeline.errors import FusionError


@pytest.fixture
def ws(tmp_path):
    """A workspace with two adapters and an unrelated sibling."""
    root = tmp_path / "ws"
    make_mlx_adapter(root / "A", seed=1)
    make_mlx_adapter(root / "B", seed=2)
    make_peft_adapter(root / "sibling", seed=3)
    return root


def snapshot(root):
    return tree_bytes(root)


@pytest.mark.parametrize("out,message", [
    ("{ws}", "contains the input"),
    ("{ws}/A", "is one of the inputs"),
    ("{ws}/A/adapters.safetensors", "is inside the input"),
    ("{ws}/A/sub", "is inside the input"),
    ("{ws}/sibling", "a non-empty directory this tool did not write"),
    ("{ws}/A/adapter_config.json/x", "is inside the input"),
])
@pytest.mark.parametrize("command", ["fuse", "validate", "convert"])
def test_outputs_that_would_touch_an_input_or_foreign_data_are_refused(ws, out, message, command):
    before = snapshot(ws)
    target = out.format(ws=ws)
    if command == "convert":
        r = run_cli("convert", ws / "A", "--to", "peft", "--out", target)
    else:
        r = run_cli(command, ws / "A", ws / "B", "--out", target)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
    assert snapshot(ws) == before


def test_a_folder_of_documents_or_a_file_is_never_replaced(ws, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "letter.txt").write_text("dear ...")
    r = run_cli("fuse", ws / "A", ws / "B", "--out", docs)
    assert r.returncode == 2 and "did not write" in r.stderr
    assert (docs / "letter.txt").read_text() == "dear ..."
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    r = run_cli("fuse", ws / "A", ws / "B", "--out", f)
    assert r.returncode == 2 and "is not a directory" in r.stderr and f.read_text() == "keep me"
    r = run_cli("fuse", ws / "A", ws / "B", "--out", f / "sub")
    assert r.returncode == 2 and "is a file, not a directory" in r.stderr


def test_the_current_directory_and_its_parents_are_refused(ws, tmp_path):
    inner = tmp_path / "work" / "inner"
    inner.mkdir(parents=True)
    for out in (".", ".."):
        r = run_cli("fuse", ws / "A", ws / "B", "--out", out, cwd=inner)
        assert r.returncode == 2 and "current directory" in r.stderr, r.stderr
    assert list(inner.iterdir()) == []


def test_a_previous_output_of_the_tool_is_replaced_and_an_empty_directory_used(ws, tmp_path):
    out = tmp_path / "fused"
    out.mkdir()
    assert run_cli("fuse", ws / "A", ws / "B", "--out", out).returncode == 0
    first = json.loads((out / "fusion.json").read_text())
    r = run_cli("fuse", ws / "A", ws / "B", "--weights", "0.9,0.1", "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "fusion.json").read_text())["params"]["weights"] != first["params"]["weights"]
    conv = tmp_path / "conv"
    assert run_cli("convert", ws / "A", "--to", "peft", "--out", conv).returncode == 0
    assert json.loads((conv / "conversion.json").read_text())["layout"] == "peft"
    assert run_cli("convert", ws / "A", "--to", "peft", "--out", conv).returncode == 0
    # a converted adapter is not a fused one: fuse does not take it over, and vice versa
    r = run_cli("fuse", ws / "A", ws / "B", "--out", conv)
    assert r.returncode == 2 and "no fusion.json" in r.stderr


def _read_only(path):
    """Make the directory ``path`` unwritable, for root too (the immutable attribute); return the undo."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"root writes into read-only directories, and chattr +i fails here ({r.stderr.strip()})")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_parent_is_found_before_any_work(ws, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _read_only(ro)
    try:
        r = run_cli("fuse", ws / "A", ws / "B", "--out", ro / "out")
        assert r.returncode == 2 and "cannot write in" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        undo()
    assert list(ro.iterdir()) == []


def _full_disk():
    """In the child: writes beyond 4 KiB fail (EFBIG) as they would on a full disk (the signal the
    kernel sends with it ignored, so the write call returns the error)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("command", ["fuse", "convert"])
def test_a_disk_that_fills_up_while_writing_is_one_error_line_and_no_leftovers(ws, tmp_path, command):
    before = snapshot(ws)
    out = tmp_path / "out"
    args = ["fuse", ws / "A", ws / "B"] if command == "fuse" else ["convert", ws / "A", "--to", "peft"]
    exe = os.path.join(os.path.dirname(sys.executable), "fusion")
    r = subprocess.run([exe, *map(str, args), "--out", str(out)], capture_output=True, text=True,
                       preexec_fn=_full_disk, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: {out}: File too large (nothing was written)"], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]   # no output, no temporary directory
    assert snapshot(ws) == before


def test_a_killed_runs_temporary_directory_is_removed_by_the_next_run(ws, tmp_path):
    out = tmp_path / "fused"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    leftover = tmp_path / ".fused.tmp-abc123"
    leftover.mkdir()
    (leftover / "adapters.safetensors").write_bytes(b"half")
    (leftover / ".partial").write_text(dead + "\n")
    foreign = tmp_path / ".fused.tmp-notours"
    foreign.mkdir()                                     # no .partial: not ours, left alone
    live = tmp_path / ".fused.tmp-live"
    live.mkdir()
    start_partial(live)                                 # this (living) process: left alone
    check_destination(out, [ws / "A"], record="fusion.json")
    assert not leftover.exists() and foreign.exists() and live.exists()
    assert clean_leftovers(out) == []
