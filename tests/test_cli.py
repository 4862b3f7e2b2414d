"""The real ``fusion`` command line: happy paths, every bad input, interrupted runs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_mlx_adapter, make_peft_adapter, module_shapes, run_cli, tree_bytes
from pipeline.safetensors_io import SafetensorsFile, write_file


@pytest.fixture
def adapters(tmp_path):
    a, _ = make_mlx_adapter(tmp_path / "adapters" / "finance", rank=4, seed=1, model="tiny/base")
    b, _ = make_mlx_adapter(tmp_path / "adapters" / "legal", rank=8, seed=2, model="tiny/base")
    return a, b


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("list", "validate", "fuse", "convert"):
        assert cmd in r.stdout
    r = run_cli("fuse", "--help")
    assert "--majority-sign-method" in r.stdout and "--space" in r.stdout and "--consensus" in r.stdout


def test_list_shows_every_adapter(tmp_path, adapters):
    make_peft_adapter(tmp_path / "adapters" / "peft_one", rank=2)
    r = run_cli("list", tmp_path / "adapters")
    assert r.returncode == 0, r.stderr
    for name in ("finance", "legal", "peft_one", "mlx", "peft"):
        assert name in r.stdout
    assert "3 adapter(s)" in r.stdout


def test_validate_ok_with_notes(adapters):
    r = run_cli("validate", *adapters, "--method", "ties", "--weights", "1,1", "--density", "0.5")
    assert r.returncode == 0, r.stderr
    assert "ranks differ" in r.stdout and "ok" in r.stdout


@pytest.mark.parametrize("method,extra", [
    ("linear", ["--weights", "0.7,0.3"]),
    ("concat", []),
    ("slerp", ["--t", "0.3"]),
    ("ties", ["--weights", "1,1", "--density", "0.5", "--majority-sign-method", "frequency"]),
    ("dare_linear", ["--density", "0.5", "--seed", "1"]),
    ("dare_ties", ["--density", "0.5"]),
    ("magnitude_prune", ["--density", "0.3", "--rank", "4"]),
])
def test_fuse_every_method(tmp_path, adapters, method, extra):
    out = tmp_path / "fused" / method
    r = run_cli("fuse", *adapters, "--method", method, *extra, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    info = json.loads((out / "fusion.json").read_text())
    assert info["method"] == method


def test_fuse_consensus_picks_the_ties_convention(tmp_path, adapters):
    """With weights other than 1, --consensus mergekit (weighted election, weighted mean) gives
    other deltas than the default (PEFT's); the choice is recorded in fusion.json."""
    from pipeline.formats import read_adapter

    deltas = {}
    for consensus in ("peft", "mergekit"):
        out = tmp_path / consensus
        r = run_cli("fuse", *adapters, "--method", "ties", "--weights", "0.7,-0.4", "--density", "0.5",
                    "--consensus", consensus, "--out", out)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "fusion.json").read_text())["params"]["consensus"] == consensus
        fused = read_adapter(out)
        deltas[consensus] = {m: (lambda a, b, s: s * b @ a)(*fused.factors(m)) for m in fused.modules}
    for m, d in deltas["peft"].items():
        other = deltas["mergekit"][m]
        assert np.linalg.norm(d - other) > 0.1 * np.linalg.norm(other), m


def test_fuse_with_rule_and_layer_list(tmp_path, adapters):
    out = tmp_path / "out"
    r = run_cli("fuse", *adapters, "--weights", "[[1, 0], [0, 1]]", "--rule", "mlp: {weights: [0.5, 0.5]}",
                "--out", out)
    assert r.returncode == 0, r.stderr
    params = json.loads((out / "fusion.json").read_text())["params"]
    assert params["rules"] == [{"match": "mlp", "weights": [0.5, 0.5]}]


def _corrupt(path: Path):
    f = path / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _nan(path: Path):
    f = SafetensorsFile(path / "adapters.safetensors")
    t = {n: f.get(n) for n in f.tensors}
    t["model.layers.1.self_attn.q_proj.lora_a"][3, 1] = np.nan
    write_file(path / "adapters.safetensors", t)


def _other_base(path: Path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["model"] = "other/model"
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _other_shape(path: Path):
    make_mlx_adapter(path, shapes=module_shapes(keys={"self_attn.q_proj": (48, 32)}), model="tiny/base")


def _dora(path: Path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["fine_tune_type"] = "dora"
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _no_config(path: Path):
    (path / "adapter_config.json").unlink()


@pytest.mark.parametrize("breakage,args,message", [
    (None, ["--method", "average"], "unknown method 'average' (known: linear, concat, slerp"),
    (None, ["--weights", "0.2,0.3,0.5"], "3 weights for 2 adapters"),
    (None, ["--method", "ties", "--density", "1.2"], "density"),
    (None, ["--method", "ties", "--density", "0"], "density"),
    (None, ["--method", "slerp", "--t", "1.5"], "t"),
    (None, ["--method", "ties", "--consensus", "average"], "consensus must be 'peft' or 'mergekit'"),
    (None, ["--space", "factors"], "equal ranks"),
    (_corrupt, [], "legal/adapters.safetensors: truncated"),
    (_nan, [], "NaN or Inf"),
    (_other_base, [], "base model 'other/model' differs"),
    (_other_shape, [], "self_attn.q_proj is 32x48 (out x in) but 32x32"),
    (_dora, [], "DoRA adapter"),
    (_no_config, [], "adapter_config.json: missing"),
])
def test_bad_input_one_line_no_traceback_no_output(tmp_path, adapters, breakage, args, message):
    if breakage:
        breakage(adapters[1])
    out = tmp_path / "out"
    r = run_cli("fuse", *adapters, *args, "--out", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr.replace("\n", " ") or message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error:")
    assert not out.exists()
    r2 = run_cli("validate", *adapters, *args)
    assert r2.returncode == 2 and "Traceback" not in r2.stderr


def test_missing_adapter_and_output_is_input(tmp_path, adapters):
    r = run_cli("fuse", adapters[0], tmp_path / "nope", "--out", tmp_path / "out")
    assert r.returncode == 2 and "nope: adapter directory does not exist" in r.stderr
    r = run_cli("fuse", *adapters, "--out", adapters[0])
    assert r.returncode == 2 and "output directory is one of the inputs" in r.stderr


def test_convert_round_trip_via_cli(tmp_path):
    src, _ = make_peft_adapter(tmp_path / "p", rank=4, alpha=8, rslora=True)
    assert run_cli("convert", src, "--to", "mlx", "--out", tmp_path / "m").returncode == 0
    assert run_cli("convert", tmp_path / "m", "--to", "peft", "--out", tmp_path / "p2").returncode == 0
    assert (tmp_path / "p2" / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "p2" / "adapter_config.json").read_text()) == json.loads(
        (src / "adapter_config.json").read_text())
    r = run_cli("convert", src, "--to", "gguf", "--out", tmp_path / "x")
    assert r.returncode == 2 and "unknown layout 'gguf'" in r.stderr


def big_pair(tmp_path, layers=24):
    """Two adapters whose TIES fusion takes a few seconds (time to interrupt it)."""
    big = {f"model.layers.{i}.mlp.down_proj": (1024, 1024) for i in range(layers)}
    a, _ = make_mlx_adapter(tmp_path / "a", shapes=big, rank=16, seed=1, num_layers=layers)
    b, _ = make_mlx_adapter(tmp_path / "b", shapes=big, rank=16, seed=2, num_layers=layers)
    return a, b, big


def start_fuse(a, b, out) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "fusion"
    return subprocess.Popen([str(exe), "fuse", str(a), str(b), "--method", "ties", "--weights", "1,1",
                             "--density", "0.5", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_fuse_leaves_no_partial_output(tmp_path):
    a, b, big = big_pair(tmp_path)
    before = tree_bytes(a), tree_bytes(b)
    for i, delay in enumerate((0.8, 1.6, 2.4, 3.2)):
        out = tmp_path / f"out{i}"
        p = start_fuse(a, b, out)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL if i % 2 else signal.SIGTERM)
        p.wait(timeout=60)
        if out.exists():  # it renamed its output into place before the signal: then it is complete
            assert {f.name for f in out.iterdir()} == {"adapters.safetensors", "adapter_config.json", "fusion.json"}
            assert len(SafetensorsFile(out / "adapters.safetensors").tensors) == 2 * len(big)
        leftovers = [f for f in tmp_path.iterdir() if f.name.startswith(f".out{i}.tmp") and i % 2 == 0]
        assert leftovers == []  # SIGTERM cleans up its temporary directory
    assert (tree_bytes(a), tree_bytes(b)) == before


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has installed its own SIGTERM handler yet (Linux: SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see the signal handler")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_fuse_says_interrupted(tmp_path, sig):
    """Ctrl-C or a kill in the middle of a fusion: one line 'interrupted', exit 128 + the signal,
    no output and no temporary directory left."""
    a, b, _ = big_pair(tmp_path, layers=128)   # several seconds of fusing even on an idle machine
    out = tmp_path / "out"
    p = start_fuse(a, b, out)
    deadline = time.time() + 60
    while not _handles_sigterm(p.pid) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the fusion (reading, validating, fusing modules)
    assert p.poll() is None, p.communicate()
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, (stdout, stderr)
    assert stderr.strip() == "interrupted", stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a", "b"]  # no output, no temporary directory
