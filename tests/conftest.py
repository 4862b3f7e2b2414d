"""Shared test factories: real adapter directories with random factors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pipeline  # noqa: F401  (first: pins the OpenBLAS kernels before numpy loads them)
import numpy as np
import pytest

import pipeline  # noqa: F401  (fast BLAS before mlx)
from pipeline.safetensors_io import write_file

ROOT = Path(__file__).resolve().parents[1]

# A small llama-like module set: name -> (in, out)
TINY_MODULES = {
    "self_attn.q_proj": (32, 32),
    "self_attn.v_proj": (32, 32),
    "mlp.down_proj": (64, 32),
}


def module_shapes(layers=(0, 1), keys=TINY_MODULES):
    return {f"model.layers.{i}.{k}": shape for i in layers for k, shape in keys.items()}


def random_factors(shapes: dict, rank: int, seed: int, dtype=np.float32):
    """{module: (A (r, in), B (out, r))} with nonzero B (a trained-looking adapter)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (fin, fout) in sorted(shapes.items()):
        a = rng.normal(0, 1 / np.sqrt(fin), (rank, fin)).astype(dtype)
        b = rng.normal(0, 0.05, (fout, rank)).astype(dtype)
        out[name] = (a, b)
    return out


def make_mlx_adapter(path: Path, shapes=None, rank=4, scale=2.0, seed=0, num_layers=2,
                     model=None, dtype=None, fine_tune_type="lora", weights_name="adapters.safetensors"):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    factors = random_factors(shapes or module_shapes(), rank, seed)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{name}.lora_a"] = a.T.copy()
        tensors[f"{name}.lora_b"] = b.T.copy()
    dtypes = {k: dtype for k in tensors} if dtype else None
    write_file(path / weights_name, tensors, {"format": "mlx"}, dtypes)
    cfg = {"fine_tune_type": fine_tune_type, "num_layers": num_layers,
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0}}
    if model:
        cfg["model"] = model
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path, factors


def make_peft_adapter(path: Path, shapes=None, rank=4, alpha=8, seed=0, rslora=False, dtype=None,
                      base="tiny/base"):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    factors = random_factors(shapes or module_shapes(), rank, seed)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    dtypes = {k: dtype for k in tensors} if dtype else None
    write_file(path / "adapter_model.safetensors", tensors, {"format": "pt"}, dtypes)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
           "use_rslora": rslora, "target_modules": ["q_proj", "v_proj", "down_proj"],
           "base_model_name_or_path": base, "lora_dropout": 0.0}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path, factors


def write_q_proj_adapter(path, layers=2, hidden=32, rank=4, scale=2.0, seed=0):
    """An mlx-lm LoRA adapter on q_proj of every layer, with random (non-zero) factors."""
    import mlx.core as mx

    path.mkdir(parents=True)
    key = mx.random.key(seed)
    weights = {}
    for i in range(layers):
        ka, kb, key = mx.random.split(key, 3)
        weights[f"model.layers.{i}.self_attn.q_proj.lora_a"] = mx.random.normal((hidden, rank), key=ka)
        weights[f"model.layers.{i}.self_attn.q_proj.lora_b"] = mx.random.normal((rank, hidden), key=kb)
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
    }))
    return path


def make_source(rank, seed, shape=(32, 48), scale=1.0):
    """One module's LoRA factors with the scale folded into B: ``(A (rank, in), B (out, rank))``."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1 / np.sqrt(shape[1]), (rank, shape[1])).astype(np.float32)
    b = (scale * rng.normal(0, 0.5, (shape[0], rank))).astype(np.float32)
    return a, b


def run_cli(*args, cwd=None, timeout=300):
    """Run the real ``fusion`` command line in a subprocess."""
    exe = Path(sys.executable).parent / "fusion"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    env = dict(os.environ)
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_model(tmp_path_factory):
    """An untrained tiny llama (hidden 32, 2 layers, FF 64) loadable by mlx_lm.load."""
    from pipeline.demo.tinymodel import write_tiny_llama

    path = tmp_path_factory.mktemp("base")
    return write_tiny_llama(path, seed=0, hidden=32, layers=2, heads=4, ff=64)


# --- scratch copies of the whole project, for pipeline tests ---------------------------------

REDUCED_DEMO = {"seed": 0, "hidden": 32, "layers": 1, "heads": 2, "ff": 64, "pretrain_steps": 30,
                "pretrain_batch": 16, "examples_per_task": 64, "replay_per_task": 16,
                "valid_per_task": 16, "test_per_task": 16, "adapter_rank": 2, "adapter_iters": 10,
                "adapter_batch": 16}


def tool_env() -> dict:
    """The environment for dvc and stage commands: this virtualenv's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def sh(*cmd, cwd, check=True, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       env=tool_env(), timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


# The fusions a scratch copy keeps (the demo's first ones: every kind of rerun rule, two- and
# three-way); the committed params.yaml declares every method, which a test's rebuild does not need.
SCRATCH_FUSIONS = ("average", "up70", "sum", "slerp", "ties", "dare_ties", "all3")


def scratch_project(dest: Path, demo: dict | None = None, eval_examples: int = 16) -> Path:
    """Copy the demo project's files (as git sees them) to ``dest``, shrink the demo and keep the
    fusions in SCRATCH_FUSIONS, commit."""
    import yaml

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        src = ROOT / f
        # the demo's project alone: real/ is a second DVC project with its own model and lock
        if src.is_file() and not f.startswith(("reports/", "dvc.lock", "real/")):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes(src.read_bytes())
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["demo"] = demo or REDUCED_DEMO
    params["eval"]["max_examples"] = eval_examples
    params["fusions"] = {k: v for k, v in params["fusions"].items() if k in SCRATCH_FUSIONS}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "CI"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "scratch copy"]):
        sh(*cmd, cwd=dest)
    return dest


def ran_stages(output: str) -> set[str]:
    """Stage names that ``dvc repro`` / ``dvc exp run`` output says it ran."""
    import re

    return set(re.findall(r"Running stage '([^']+)'", output))
