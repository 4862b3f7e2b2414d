"""Unusual inputs, as a new user makes them: each ends in one line naming the file and the problem.

Malformed safetensors headers (refused like the reference library refuses them), config values of
the wrong type or out of range, tensors that no output would carry (refused by reading, so every
command gives the same reason), and the command line's own printing: text in square brackets,
`fusion list` over a mix of good and bad adapters, bf16 inputs.
"""

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import make_mlx_adapter, make_peft_adapter, module_shapes, run_cli, tree_bytes
from pipeline.errors import FusionError
from pipeline.formats import read_adapter
from pipeline.safetensors_io import SafetensorsFile, read_header, write_file

# --- malformed safetensors headers ----------------------------------------------------------

A0 = "model.layers.0.self_attn.q_proj.lora_a"  # (32, 4), the same size as V0
V0 = "model.layers.0.self_attn.v_proj.lora_a"


def split_file(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(f: Path, header: bytes, data: bytes) -> None:
    f.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _edit(change):
    """A breakage that edits the parsed header and writes it back with the same data."""
    def breakage(header: dict, data: bytes) -> tuple[bytes, bytes]:
        header = copy.deepcopy(header)
        change(header)
        return json.dumps(header).encode(), data
    return breakage


def _set(name, **fields):
    return _edit(lambda h: h[name].update(fields))


def _overlap(h):
    h[V0]["data_offsets"] = list(h[A0]["data_offsets"])


def _shift_past_end(h):
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    h[last]["data_offsets"] = [o + 64 for o in h[last]["data_offsets"]]


def _drop_first(h):
    first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    del h[first]


HEADER_CASES = {
    # name: (breakage, what the message says)
    "dtype a list": (_set(A0, dtype=["F32"]), f"tensor '{A0}' has dtype [\"F32\"], not a string"),
    "offsets strings": (_set(A0, data_offsets=["0", "512"]), f"tensor '{A0}' has data_offsets"),
    "offsets floats": (_set(A0, data_offsets=[0.0, 512.0]), "not two non-negative integers"),
    "offsets negative": (_set(A0, data_offsets=[-512, 0]), "not two non-negative integers"),
    "shape floats": (_set(A0, shape=[32.0, 4.0]), f"tensor '{A0}' has shape [32.0, 4.0]"),
    "shape bools": (_set(A0, shape=[True, 4]), "not a list of non-negative integers"),
    "shape nested": (_set(A0, shape=json.loads("[" * 50 + "]" * 50)), "not a list of non-negative integers"),
    "entry a list": (_edit(lambda h: h.__setitem__(A0, [1, 2])), f"tensor '{A0}' is list"),
    "entry without offsets": (_edit(lambda h: h[A0].pop("data_offsets")), f"tensor '{A0}' has no data_offsets"),
    "metadata not strings": (_edit(lambda h: h["__metadata__"].update(format=1)),
                             "__metadata__ must map strings to strings"),
    "header a list": (lambda h, d: (b"[1, 2, 3]", d), "not a JSON object"),
    "header not UTF-8": (lambda h, d: (b'{"\xff": 1}', d), "not valid JSON"),
    "shape contradicts offsets": (_set(A0, shape=[32, 4, 2]), f"tensor '{A0}' has inconsistent offsets"),
    "an integer of 5000 digits": (lambda h, d: (json.dumps(h).replace(
        '"shape": [32, 4]', '"shape": [' + "9" * 5000 + ', 4]', 1).encode(), d), "not valid JSON"),
    "nesting very deep": (lambda h, d: (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", b""),
                          "nested too deeply"),
    "offsets overlap": (_edit(_overlap), f"tensor '{V0}' overlaps tensor '{A0}'"),
    "offsets past the end": (_edit(_shift_past_end), "truncated: tensor"),
    "data not covered (gap)": (_edit(_drop_first), "of the data, before tensor"),
    "data not covered (trailing bytes)": (lambda h, d: (json.dumps(h).encode(), d + bytes(16)),
                                          "the last 16 bytes of the file belong to no tensor"),
}


def broken_header_adapter(path: Path, case: str) -> Path:
    make_mlx_adapter(path, model="tiny/base")
    f = path / "adapters.safetensors"
    breakage, _ = HEADER_CASES[case]
    write_raw(f, *breakage(*split_file(f)))
    return path


@pytest.mark.parametrize("case", HEADER_CASES)
def test_malformed_header_is_refused_like_the_reference_library(tmp_path, case):
    from safetensors import safe_open

    path = broken_header_adapter(tmp_path / "a", case)
    f = path / "adapters.safetensors"
    with pytest.raises(Exception):  # the reference library refuses every one of these files
        with safe_open(str(f), "np") as g:
            [g.get_tensor(k) for k in g.keys()]
    with pytest.raises(FusionError) as e:
        read_header(f)
    message = str(e.value)
    assert message.startswith(f"{f}: ") and "\n" not in message
    assert HEADER_CASES[case][1] in message


def test_every_valid_header_still_reads(tmp_path):
    """The checks accept what the reference library writes, empty tensors and all dtypes included."""
    from safetensors.numpy import save_file

    tensors = {"e": np.zeros((0, 3), np.float32), "h": np.ones((2, 3), np.float16),
               "i": np.arange(5, dtype=np.int64), "z": np.zeros((4,), np.float64)}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "np"})
    got, meta = read_header(tmp_path / "lib.safetensors")
    assert meta == {"format": "np"} and sorted(got) == sorted(tensors)
    f = SafetensorsFile(tmp_path / "lib.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(f.get(k, v.dtype), v)


def _slug(case: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in case)


def test_malformed_headers_via_the_cli(tmp_path):
    """`fusion validate` and `fusion fuse` end in one error line naming the file; `fusion list`
    lists the good adapter and names each broken one as skipped, with its reason."""
    root = tmp_path / "adapters"
    good, _ = make_mlx_adapter(root / "good", model="tiny/base")
    dirs = {case: broken_header_adapter(root / _slug(case), case) for case in HEADER_CASES}
    r = run_cli("list", root)
    assert r.returncode == 0, r.stderr
    assert "1 adapter(s)" in r.stdout and "good" in r.stdout and "Traceback" not in r.stderr
    skipped = r.stderr.splitlines()
    assert len(skipped) == len(dirs)
    for line, (case, d) in zip(skipped, sorted(dirs.items(), key=lambda kv: kv[1])):
        assert line.startswith(f"skipped: {d / 'adapters.safetensors'}: "), line
        assert HEADER_CASES[case][1] in line
    out = tmp_path / "out"
    for case in ("dtype a list", "offsets overlap"):
        d = dirs[case]
        for cmd in (["validate", good, d], ["fuse", good, d, "--out", out]):
            r = run_cli(*cmd)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert r.stderr.startswith(f"error: {d / 'adapters.safetensors'}: corrupted")
            assert len(r.stderr.splitlines()) == 1 and not out.exists()


# --- config values ---------------------------------------------------------------------------

def _cfg(**changes):
    def breakage(cfg: dict) -> None:
        for key, value in changes.items():
            target, key = (cfg["lora_parameters"], key[3:]) if key.startswith("lp_") else (cfg, key)
            target[key] = value
    return breakage


NAN, INF = float("nan"), float("inf")
MLX_CONFIG_CASES = {
    "lora_parameters a list": (_cfg(lora_parameters=[4, 2.0]), "lora_parameters must be an object"),
    "scale NaN": (_cfg(lp_scale=NAN), "lora_parameters.scale must be a finite number, got NaN"),
    "scale Infinity": (_cfg(lp_scale=INF), "lora_parameters.scale must be a finite number, got Infinity"),
    "scale a string": (_cfg(lp_scale="2"), "lora_parameters.scale must be a finite number, got \"2\""),
    "scale null": (_cfg(lp_scale=None), "lora_parameters.scale must be a finite number, got null"),
    "rank 0": (_cfg(lp_rank=0), "lora_parameters.rank must be a positive integer, got 0"),
    "rank a float": (_cfg(lp_rank=4.0), "lora_parameters.rank must be a positive integer, got 4.0"),
    "rank contradicts the tensors": (_cfg(lp_rank=8), "lora_parameters.rank is 8 but module"),
    "dropout a string": (_cfg(lp_dropout="none"), "lora_parameters.dropout must be a finite number"),
    "keys a string": (_cfg(lp_keys="self_attn.q_proj"), "lora_parameters.keys must be a list"),
    "keys miss a module": (_cfg(lp_keys=["self_attn.q_proj", "self_attn.v_proj"]),
                           "lora_parameters.keys does not list 'mlp.down_proj'"),
    "num_layers a string": (_cfg(num_layers="2"), "num_layers must be an integer"),
    "num_layers contradicts the tensors": (_cfg(num_layers=1), "num_layers is 1 (LoRA on the last 1 block) "
                                           "but adapters.safetensors adapts layers 0 to 1"),
    "fine_tune_type a list": (_cfg(fine_tune_type=["lora"]), "fine_tune_type must be a string"),
    "model a list": (_cfg(model=["tiny/base"]), "model must be a string"),
    "scale beyond float range": (_cfg(lp_scale=10 ** 400), "lora_parameters.scale must be a finite number"),
}
PEFT_CONFIG_CASES = {
    "lora_alpha null": (_cfg(lora_alpha=None), "lora_alpha must be a finite number, got null"),
    "lora_alpha a string": (_cfg(lora_alpha="8"), "lora_alpha must be a finite number, got \"8\""),
    "lora_alpha NaN": (_cfg(lora_alpha=NAN), "lora_alpha must be a finite number, got NaN"),
    "lora_alpha -Infinity": (_cfg(lora_alpha=-INF), "lora_alpha must be a finite number, got -Infinity"),
    "r 0": (_cfg(r=0), "r must be a positive integer, got 0"),
    "r contradicts the tensors": (_cfg(r=8), "gives module 'model.layers.0.mlp.down_proj' rank 8"),
    "alpha_pattern a bad regex": (_cfg(alpha_pattern={"q_proj[": 16}),
                                  "alpha_pattern key 'q_proj[' is not a valid regular expression"),
    "alpha_pattern a list": (_cfg(alpha_pattern=["q_proj", 16]), "alpha_pattern must be an object"),
    "alpha_pattern value NaN": (_cfg(alpha_pattern={"q_proj": NAN}),
                                "alpha_pattern['q_proj'] must be a finite number, got NaN"),
    "rank_pattern a bad regex": (_cfg(rank_pattern={"(": 4}), "rank_pattern key '(' is not a valid"),
    "rank_pattern 0": (_cfg(rank_pattern={"v_proj": 0}), "rank_pattern['v_proj'] must be a positive integer"),
    "use_rslora a string": (_cfg(use_rslora="false"), "use_rslora must be true or false, got \"false\""),
    "base model a number": (_cfg(base_model_name_or_path=7), "base_model_name_or_path must be a string"),
}


def broken_config_adapter(path: Path, layout: str, case: str) -> Path:
    if layout == "mlx":
        make_mlx_adapter(path, model="tiny/base")
        breakage = MLX_CONFIG_CASES[case][0]
    else:
        make_peft_adapter(path, base="tiny/base")
        breakage = PEFT_CONFIG_CASES[case][0]
    cfg = json.loads((path / "adapter_config.json").read_text())
    breakage(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))  # NaN and Infinity as Python writes them
    return path


CONFIG_CASES = [("mlx", c) for c in MLX_CONFIG_CASES] + [("peft", c) for c in PEFT_CONFIG_CASES]


@pytest.mark.parametrize("layout,case", CONFIG_CASES)
def test_wrong_config_value_names_the_file_and_the_key(tmp_path, layout, case):
    path = broken_config_adapter(tmp_path / "a", layout, case)
    want = (MLX_CONFIG_CASES if layout == "mlx" else PEFT_CONFIG_CASES)[case][1]
    with pytest.raises(FusionError) as e:
        read_adapter(path)
    assert str(e.value).startswith(f"{path / 'adapter_config.json'}: ")
    assert want in str(e.value) and "\n" not in str(e.value)


def test_wrong_config_values_via_the_cli(tmp_path):
    """Every case above through `fusion list` (skipped, with the reason), and the cases that used to
    write NaN weights or fail later through `fusion convert` / `fusion fuse`: nothing is written."""
    root = tmp_path / "adapters"
    good, _ = make_mlx_adapter(root / "good", model="tiny/base")
    dirs = {(layout, case): broken_config_adapter(root / f"{layout}{i:02d}", layout, case)
            for i, (layout, case) in enumerate(CONFIG_CASES)}
    r = run_cli("list", root)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == len(CONFIG_CASES)
    for line, (layout, case) in zip(lines, CONFIG_CASES):
        want = (MLX_CONFIG_CASES if layout == "mlx" else PEFT_CONFIG_CASES)[case][1]
        assert line.startswith(f"skipped: {dirs[layout, case] / 'adapter_config.json'}: ") and want in line
    nan_scale, short = dirs["mlx", "scale NaN"], dirs["mlx", "num_layers contradicts the tensors"]
    inf_alpha = dirs["peft", "lora_alpha -Infinity"]
    out = tmp_path / "out"
    for cmd in (["convert", nan_scale, "--to", "peft", "--out", out],
                ["convert", inf_alpha, "--to", "mlx", "--out", out],
                ["fuse", good, nan_scale, "--out", out],
                ["fuse", good, short, "--out", out]):
        r = run_cli(*cmd)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert "adapter_config.json: " in r.stderr and not out.exists()


@pytest.mark.parametrize("case", ["rank contradicts the tensors", "num_layers contradicts the tensors",
                                  "keys miss a module"])
def test_refused_configs_are_the_ones_mlx_lm_cannot_load(tmp_path, tiny_model, case):
    """The checks against the tensors are mlx-lm's own: mlx_lm.load refuses each of these adapters
    (late, after loading the model), and loads the same adapter with the config left alone."""
    from mlx_lm import load

    path = broken_config_adapter(tmp_path / "bad", "mlx", case)
    with pytest.raises(ValueError, match="incompatible tensors"):
        load(str(tiny_model), adapter_path=str(path))
    with pytest.raises(FusionError, match=MLX_CONFIG_CASES[case][1].replace("(", r"\(").replace(")", r"\)")):
        read_adapter(path)
    ok, _ = make_mlx_adapter(tmp_path / "ok", model="tiny/base")
    load(str(tiny_model), adapter_path=str(ok))
    read_adapter(ok)


def test_deeply_nested_config_is_one_line(tmp_path):
    path, _ = make_mlx_adapter(tmp_path / "a")
    (path / "adapter_config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(FusionError, match="adapter_config.json: not valid JSON"):
        read_adapter(path)


# --- tensors that no output would carry -------------------------------------------------------

P = "base_model.model."
EMBED = f"{P}model.embed_tokens"
PEFT_EXTRAS = {
    # kind: ({tensor: shape}, the words of the reason)
    "lone embedding factor": ({f"{EMBED}.lora_embedding_A": (4, 64)},
                              "1 tensor of lone lora_embedding_A/B factors (each needs its pair): "
                              f"{EMBED}.lora_embedding_A"),
    "modules_to_save (saved)": ({f"{P}lm_head.weight": (64, 32)}, f"1 tensor of full weights (whole trained "
                                f"modules such as PEFT's modules_to_save"),
    "modules_to_save (raw)": ({f"{P}lm_head.modules_to_save.default.weight": (64, 32)},
                              "1 tensor of modules_to_save weights"),
    "lora_B.bias without factors": ({f"{P}model.layers.0.mlp.up_proj.lora_B.bias": (64,)},
                                    "1 tensor of LoRA biases without their module's LoRA factors (PEFT's "
                                    f"lora_bias needs lora_A/lora_B; mlx-lm has no LoRA bias): "
                                    f"{P}model.layers.0.mlp.up_proj.lora_B.bias"),
    "trained bias": ({f"{P}model.layers.0.self_attn.q_proj.base_layer.bias": (32,)},
                     "1 tensor of trained biases (PEFT's bias='all' or 'lora_only'"),
    "DoRA magnitude": ({f"{P}model.layers.{i}.self_attn.q_proj.lora_magnitude_vector": (32,) for i in (0, 1)},
                       "2 tensors of DoRA magnitude vectors"),
    "lone lora_A": ({f"{P}model.layers.0.mlp.up_proj.lora_A.weight": (4, 32)}, "1 tensor of lone LoRA factors"),
}
MLX_EXTRAS = {
    "lone lora_a": ({"model.layers.0.mlp.up_proj.lora_a": (32, 4)},
                    "1 tensor of lone LoRA factors (each lora_a/lora_A needs its lora_b/lora_B): "
                    "model.layers.0.mlp.up_proj.lora_a"),
    "DoRA m": ({f"model.layers.{i}.self_attn.{k}.m": (32,) for i in (0, 1) for k in ("q_proj", "v_proj")},
               "4 tensors of DoRA magnitude vectors in an adapter whose config does not say DoRA "
               "(fine_tune_type dora / use_dora), or of a module without LoRA factors: "
               "model.layers.0.self_attn.q_proj.m, model.layers.0.self_attn.v_proj.m, "
               "model.layers.1.self_attn.q_proj.m and 1 more"),
    "embedding": ({"model.embed_tokens.weight": (64, 32)}, "1 tensor of full weights"),
    "bias": ({"model.layers.1.mlp.down_proj.bias": (32,)}, "1 tensor of trained biases"),
    "unknown": ({"model.layers.1.mlp.down_proj.lora_scale": (1,)},
                "1 tensor of tensors that are not LoRA factors: model.layers.1.mlp.down_proj.lora_scale"),
}


def with_extra_tensors(path: Path, layout: str, extras: dict) -> Path:
    """An adapter of ``layout`` with the tensors ``extras`` added to its weights file."""
    if layout == "mlx":
        make_mlx_adapter(path, model="tiny/base")
        f = path / "adapters.safetensors"
    else:
        make_peft_adapter(path, base="tiny/base")
        f = path / "adapter_model.safetensors"
    src = SafetensorsFile(f)
    tensors = {n: src.get(n) for n in src.tensors}
    rng = np.random.default_rng(0)
    tensors.update({n: rng.normal(size=shape).astype(np.float32) for n, shape in extras.items()})
    del src
    write_file(f, tensors, {"format": "mlx" if layout == "mlx" else "pt"})
    return path


EXTRA_CASES = [("peft", k) for k in PEFT_EXTRAS] + [("mlx", k) for k in MLX_EXTRAS]


@pytest.mark.parametrize("layout,kind", EXTRA_CASES)
def test_a_tensor_no_output_would_carry_refuses_the_adapter(tmp_path, layout, kind):
    extras, reason = (PEFT_EXTRAS if layout == "peft" else MLX_EXTRAS)[kind]
    path = with_extra_tensors(tmp_path / "a", layout, extras)
    with pytest.raises(FusionError) as e:
        read_adapter(path)
    weights = "adapters.safetensors" if layout == "mlx" else "adapter_model.safetensors"
    assert str(e.value).startswith(f"{path / weights}: cannot be used without losing data: ")
    assert reason in str(e.value)
    for name in list(extras)[:3]:
        assert name in str(e.value)


@pytest.mark.parametrize("layout", ["peft", "mlx"])
def test_every_command_gives_the_same_refusal(tmp_path, layout):
    """All the unusable kinds of one layout in one adapter: one line, grouped by kind, and the same
    line from validate, fuse, convert (both ways) and list; no output is written."""
    table = PEFT_EXTRAS if layout == "peft" else MLX_EXTRAS
    extras = {n: s for tensors, _ in table.values() for n, s in tensors.items()}
    bad = with_extra_tensors(tmp_path / "adapters" / "bad", layout, extras)
    good, _ = make_mlx_adapter(tmp_path / "adapters" / "good", model="tiny/base")
    before = tree_bytes(bad)
    out = tmp_path / "out"
    lines = set()
    for cmd in (["validate", good, bad], ["fuse", good, bad, "--out", out],
                ["convert", bad, "--to", "mlx", "--out", out], ["convert", bad, "--to", "peft", "--out", out]):
        r = run_cli(*cmd)
        assert r.returncode == 2 and not out.exists() and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1
        lines.add(r.stderr.removeprefix("error: ").strip())
    r = run_cli("list", tmp_path / "adapters")
    assert r.returncode == 0 and "1 adapter(s)" in r.stdout
    lines.add(r.stderr.removeprefix("skipped: ").strip())
    assert len(lines) == 1, lines
    (line,) = lines
    for _, reason in table.values():
        assert reason.split(":")[0] in line  # "N tensors of <kind> (<why>)"
    assert tree_bytes(bad) == before


def test_base_layer_copies_are_ignored_and_said_so(tmp_path):
    """PEFT's *.base_layer.weight entries are copies of the base model, not adapter tensors: the
    adapter fuses exactly as without them, and validate says they were ignored."""
    plain, _ = make_peft_adapter(tmp_path / "plain", base="tiny/base")  # the same factors as below
    copies = {f"{P}{n}.base_layer.weight": (o, i) for n, (i, o) in module_shapes().items()}
    with_copies = with_extra_tensors(tmp_path / "with_copies", "peft", copies)
    other, _ = make_mlx_adapter(tmp_path / "other", model="tiny/base")
    r = run_cli("validate", other, with_copies)
    assert r.returncode == 0, r.stderr
    assert ("note: with_copies: ignored 6 *.base_layer.weight tensors (base model weights saved with the "
            "adapter, not adapter tensors; not in the output)") in r.stdout
    for src, out in ((plain, tmp_path / "f_plain"), (with_copies, tmp_path / "f_copies")):
        assert run_cli("fuse", other, src, "--out", out).returncode == 0
    assert ((tmp_path / "f_plain" / "adapters.safetensors").read_bytes()
            == (tmp_path / "f_copies" / "adapters.safetensors").read_bytes())


# --- the command line's printing ---------------------------------------------------------------

def test_square_brackets_survive_in_error_lines(tmp_path):
    """rich markup would eat '[bold]' or '[x]' in a path or a value: the error line keeps them."""
    root = tmp_path / "[bold]runs" / "[x]"
    good, _ = make_mlx_adapter(root / "good", model="tiny/base")
    bad, _ = make_mlx_adapter(root / "bad[red]", model="tiny/base")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_parameters"]["keys"] = "[self_attn]"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_cli("validate", good, bad)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {bad / 'adapter_config.json'}: lora_parameters.keys must be a list "
                                'of module paths, got "[self_attn]"')
    r = run_cli("list", root)
    assert r.returncode == 0
    assert r.stderr.strip().startswith(f"skipped: {bad / 'adapter_config.json'}: ")
    assert f"under {root}" in r.stdout.replace("\n", "")


def test_list_exit_code_when_nothing_can_be_used(tmp_path):
    bad, _ = make_mlx_adapter(tmp_path / "adapters" / "bad")
    (bad / "adapter_config.json").write_text("[]")
    r = run_cli("list", tmp_path / "adapters")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"skipped: {bad / 'adapter_config.json'}: expected a JSON object"
    good, _ = make_mlx_adapter(tmp_path / "adapters" / "good")
    r = run_cli("list", tmp_path / "adapters")
    assert r.returncode == 0 and "good" in r.stdout and "skipped: " in r.stderr


@pytest.mark.parametrize("dtypes,note", [
    (("BF16", "BF16"), "note: inputs are bf16; the output will be float32"),
    (("F16", None), "note: inputs are float32 (b), fp16 (a); the output will be float32"),
])
def test_half_precision_inputs_are_noted(tmp_path, dtypes, note):
    a, _ = make_mlx_adapter(tmp_path / "a", dtype=dtypes[0], model="tiny/base")
    b, _ = make_mlx_adapter(tmp_path / "b", dtype=dtypes[1], model="tiny/base", seed=2)
    r = run_cli("validate", a, b)
    assert r.returncode == 0, r.stderr
    assert note in r.stdout
    r = run_cli("fuse", a, b, "--out", tmp_path / "out")
    assert r.returncode == 0 and note in r.stdout
    assert {t.dtype for t in SafetensorsFile(tmp_path / "out" / "adapters.safetensors").tensors.values()} == {"F32"}
