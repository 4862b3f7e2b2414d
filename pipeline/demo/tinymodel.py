"""Tiny llama-type models with a byte-level tokenizer, made locally so ``mlx_lm.load`` loads them.

Used by the demo (which then trains the model) and by tests. Nothing here downloads anything.
Chat format: a user turn renders as ``PROMPT=`` and an assistant turn as ``COMPLETION</s>``, so the
prompt rendered with the generation prompt is exactly the prefix of the full conversation (mlx-lm's
prompt masking relies on that) and every answer ends with EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

SPECIALS = ["<pad>", "<s>", "</s>"]
VOCAB_SIZE = 256 + len(SPECIALS)  # 259
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}</s>"
    "{% else %}{{ message['content'] }}={% endif %}"
    "{% endfor %}"
)


def write_byte_tokenizer(path: str | Path) -> None:
    """Write a byte-level tokenizer (256 bytes + <pad>, <s>, </s>) loadable by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for i, s in enumerate(SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes-to-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[char]


def llama_config(hidden: int = 128, layers: int = 2, heads: int = 4, ff: int = 512) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": ff,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 257,
        "eos_token_id": 258,
        "pad_token_id": 256,
        "torch_dtype": "float32",
    }


def new_llama(config: dict, seed: int = 0) -> nn.Module:
    """A freshly initialised mlx-lm llama model for ``config``."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict(config)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def save_model(model: nn.Module, config: dict, path: str | Path) -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_byte_tokenizer(path)


def write_tiny_llama(path: str | Path, seed: int = 0, **sizes) -> Path:
    """Build an untrained tiny llama (``sizes``: hidden, layers, heads, ff) at ``path``."""
    config = llama_config(**sizes)
    save_model(new_llama(config, seed), config, path)
    return Path(path)
