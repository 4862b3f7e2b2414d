"""pipeline.io: outputs appear whole or not at all, with stable bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from pipeline.io import append_text, atomic_dir, atomic_file, copy_file, json_text, write_file, write_json

# A child process that starts writing OUT (a directory or a file) and then waits to be killed.
KILLED_MID_WRITE = """
import sys, time
from pathlib import Path
from pipeline.io import atomic_dir, atomic_file
kind, out = sys.argv[1], Path(sys.argv[2])
if kind == "dir":
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new, half written")
        print("writing", flush=True)
        time.sleep(120)
else:
    with atomic_file(out) as tmp:
        tmp.write_text("new, half written")
        print("writing", flush=True)
        time.sleep(120)
"""


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_json_text_is_sorted_indented_and_ends_with_a_newline():
    assert json_text({"b": 1, "a": [1, {"d": None, "c": "x"}]}) == (
        '{\n  "a": [\n    1,\n    {\n      "c": "x",\n      "d": null\n    }\n  ],\n  "b": 1\n}\n')
    assert json_text({"b": "é", "a": 1}, sort_keys=False, ensure_ascii=False) == '{\n  "b": "é",\n  "a": 1\n}\n'
    with pytest.raises(ValueError):
        json_text({"x": float("nan")}, allow_nan=False)


def test_write_json_creates_the_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "deep" / "er" / "plan.json"
    write_json(path, {"x": 1})
    write_json(path, {"y": [1, 2]})
    assert json.loads(path.read_text()) == {"y": [1, 2]}
    assert path.read_text() == json_text({"y": [1, 2]})
    assert hidden(path.parent) == []


def test_write_file_gives_the_permissions_of_an_ordinary_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    ours = write_file(tmp_path / "ours.txt", "x")
    assert ours.stat().st_mode == plain.stat().st_mode
    assert write_file(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert hidden(tmp_path) == []


def test_a_failed_directory_write_leaves_the_old_directory(tmp_path):
    out = tmp_path / "fused"
    out.mkdir()
    (out / "adapters.safetensors").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "adapters.safetensors").write_bytes(b"new")
            raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["adapters.safetensors"]
    assert (out / "adapters.safetensors").read_bytes() == b"old"
    assert hidden(tmp_path) == []


def test_a_directory_write_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "fused"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    with atomic_dir(out) as tmp:
        write_json(tmp / "fusion.json", {"ok": True})
    assert sorted(p.name for p in out.iterdir()) == ["fusion.json"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_write_leaves_the_old_version(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "dir":
        out.mkdir()
        (out / "a.txt").write_text("old")
    else:
        out.write_text("old")
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, kind, str(out)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.kill()
        child.wait(timeout=60)
    assert (out / "a.txt" if kind == "dir" else out).read_text() == "old"


def test_a_reader_sees_the_old_file_or_the_new_one_never_half(tmp_path):
    path = tmp_path / "big.bin"
    versions = [bytes([k]) * (4 << 20) for k in (1, 2)]
    write_file(path, versions[0])
    seen, done = set(), threading.Event()

    def read() -> None:
        while not done.is_set():
            data = path.read_bytes()
            seen.add(data[:1] + data[-1:] + len(data).to_bytes(8, "little"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            write_file(path, versions[i % 2])
    finally:
        done.set()
        reader.join()
    whole = {v[:1] + v[-1:] + len(v).to_bytes(8, "little") for v in versions}
    assert seen and seen <= whole


def test_a_link_at_the_output_is_replaced_not_written_through(tmp_path):
    user_file = tmp_path / "users_own.json"
    user_file.write_text("keep me")
    link = tmp_path / "out.json"
    link.symlink_to(user_file)
    copy_file(user_file, tmp_path / "copy.json")
    write_json(link, {"new": 1})
    assert user_file.read_text() == "keep me"
    assert not link.is_symlink() and json.loads(link.read_text()) == {"new": 1}
    assert (tmp_path / "copy.json").read_text() == "keep me"


def test_append_text_adds_to_what_is_there(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("# CI\n")
    append_text(summary, "one\n")
    append_text(summary, "two\n")
    assert summary.read_text() == "# CI\none\ntwo\n"
