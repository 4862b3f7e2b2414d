"""Tiny random models of several architectures, built with mlx-lm's own model classes, and adapters
trained on them for a few steps with mlx-lm's own trainer (LoRA, DoRA, embedding and expert keys).

Nothing is downloaded: each model is a fresh ``mlx_lm.models.<type>.Model`` saved with the demo's
byte-level tokenizer, so ``mlx_lm.load`` loads it. ``reference_logits`` is the check of every
variant test: the base model with dense deltas added to its weights, computed by mlx-lm.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401  (fast BLAS before mlx)

VOCAB = 259
COMMON = {"vocab_size": VOCAB, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "rope_theta": 10000.0,
          "bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256, "torch_dtype": "float32"}

# model_type -> config (hidden 32, 2 layers); tied marks the models whose lm_head is the embedding
ARCHS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 32, "num_hidden_layers": 2,
                    "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
                    "query_pre_attn_scalar": 8, "sliding_window": 16, "sliding_window_pattern": 2},
    "phi3": {"model_type": "phi3", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
             "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "moe_intermediate_size": 16, "norm_topk_prob": True, "tie_word_embeddings": False},
}


def build_model(arch: str, path: Path, seed: int = 0) -> Path:
    """A freshly initialised tiny ``arch`` model at ``path``, loadable by ``mlx_lm.load``."""
    import mlx.core as mx

    from pipeline.demo.tinymodel import save_model

    config = {**COMMON, **ARCHS[arch]}
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(model, config, path)
    return Path(path)


def quantize(src: Path, dst: Path, bits: int = 8) -> Path:
    """``src`` quantized by mlx-lm (group size 32, ``bits`` bits) and saved at ``dst``."""
    from mlx_lm import load
    from mlx_lm.utils import quantize_model

    from pipeline.demo.tinymodel import save_model

    model, _ = load(str(src))
    config = json.loads((Path(src) / "config.json").read_text())
    model, config = quantize_model(model, config, group_size=32, bits=bits)
    save_model(model, config, dst)
    return Path(dst)


TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
         "how vexingly quick daft zebras jump", "sphinx of black quartz, judge my vow"]


def train_adapter(base: Path, out: Path, seed: int, *, keys: list[str] | None = None, rank: int = 4,
                  scale: float = 2.0, fine_tune_type: str = "lora", iters: int = 4, num_layers: int = 2,
                  lr: float = 3e-2) -> Path:
    """Train an mlx-lm adapter on ``base`` for ``iters`` steps with ``mlx_lm.tuner.trainer.train``.

    ``keys`` as mlx-lm's ``lora_parameters.keys`` (module paths inside a block, or full paths of
    top-level modules such as ``model.embed_tokens``); None adapts every linear layer of the blocks."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(str(base))
    rows = [{"text": TEXTS[(seed + i) % len(TEXTS)]} for i in range(8)]
    data = CacheDataset(TextDataset(rows, tokenizer))
    lora = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        lora["keys"] = list(keys)
    mx.random.seed(seed)
    np.random.seed(seed)
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora, use_dora=fine_tune_type == "dora")
    out.mkdir(parents=True, exist_ok=True)
    args = TrainingArgs(batch_size=4, iters=iters, val_batches=1, steps_per_report=iters,
                        steps_per_eval=iters + 1, steps_per_save=iters + 1,
                        adapter_file=str(out / "adapters.safetensors"), max_seq_length=64)
    from mlx_lm.cli_ui import make_console

    console = make_console()
    quiet, console.quiet = console.quiet, True
    try:
        train(model=model, optimizer=optim.Adam(learning_rate=lr), train_dataset=data, val_dataset=data,
              args=args)
    finally:
        console.quiet = quiet
    config = {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def load_dense(base: Path, adapter: Path | None = None):
    """``mlx_lm.load`` of ``base`` (and ``adapter``), with a quantized base's layers dequantized by
    mlx-lm (the weights a LoRA layer on the quantized base adds its delta to)."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, _ = load(str(base))
    model = dequantize_model(model)
    if adapter is not None:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, str(adapter))
    model.eval()
    return model


def base_weights(base: Path) -> dict[str, np.ndarray]:
    """The base model's parameters as mlx-lm holds them after loading (float64 numpy; dequantized)."""
    from mlx.utils import tree_flatten

    return {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(load_dense(base).parameters())}


def logits(model, tokens) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens])), dtype=np.float64)


TOKENS = [5, 77, 200, 13, 42, 99, 7, 258]


def adapter_logits(base: Path, adapter: Path | None) -> np.ndarray:
    """Logits of ``mlx_lm.load(base, adapter_path=adapter)`` on ``TOKENS``."""
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=str(adapter) if adapter else None)
    return logits(model, TOKENS)


def reference_logits(base: Path, deltas: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the base model with ``deltas`` (parameter name -> dense delta) added to its weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = load_dense(base)
    params = dict(tree_flatten(model.parameters()))
    updates = [(k, mx.array((np.array(params[k], np.float64) + d).astype(np.float32))) for k, d in deltas.items()]
    model.load_weights(updates, strict=False)
    return logits(model, TOKENS)


def fused_layers_logits(base: Path, adapter: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """mlx-lm's own fused weights of ``adapter`` (each layer's ``fuse()``): the dense delta per
    parameter, from the base, for adapters whose delta depends on the base (DoRA)."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=str(adapter))  # on a quantized base: fuse() dequantizes
    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)  # the layers without an adapter, on a quantized base
    base_p = base_weights(base)
    after = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}
    deltas = {k: after[k] - base_p[k] for k in base_p if k in after and not np.array_equal(after[k], base_p[k])}
    return logits(model, TOKENS), deltas

