"""Evaluation on a tiny untrained model: loss against a by-hand computation, accuracy, retention."""

import json
import math

import pipeline  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx_lm
import pytest

from pipeline.errors import FusionError
from pipeline.evaluate import encode_example, evaluate, generate_samples, load_examples, retention
from pipeline.demo.tinymodel import write_tiny_llama

from conftest import write_q_proj_adapter as write_adapter

PROMPTS = ["up abcd", "inc 1234", "x", "a longer prompt here", "up zz", "q", "inc 99", "hello there"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("base") / "model", seed=3, hidden=32, layers=2,
                            heads=2, ff=64)


@pytest.fixture(scope="module")
def loaded(model_dir):
    model, tok = mlx_lm.load(str(model_dir))
    return model, tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_hand_loss(model, tok, examples):
    """Run each full sequence alone, log-softmax, sum -log p over the scored tokens, divide by count."""
    total, count = 0.0, 0
    for ex in examples:
        if "text" in ex:
            tokens = tok.encode(ex["text"]) + [tok.eos_token_id]
            start = 1
        else:
            prompt = tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}],
                                             add_generation_prompt=True, return_dict=False)
            tokens = tok.apply_chat_template([{"role": "user", "content": ex["prompt"]},
                                              {"role": "assistant", "content": ex["completion"]}],
                                             return_dict=False)
            assert tokens[-1] == tok.eos_token_id  # the template ends the answer with EOS
            start = len(prompt)
        logits = model(mx.array(tokens)[None])[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for t in range(start, len(tokens)):
            total -= logp[t - 1, tokens[t]].item()
            count += 1
    return total / count


def test_loss_matches_by_hand(tmp_path, model_dir, loaded):
    # different lengths, so the batch is padded; padding must not count
    examples = [{"prompt": "up abcd", "completion": "ABCD"},
                {"prompt": "inc 1234567", "completion": "2345678 and more"}]
    data = write_jsonl(tmp_path / "pc.jsonl", examples)
    expected = by_hand_loss(*loaded, examples)
    for batch_size in (1, 2):
        got = evaluate(model_dir, None, {"pc": data}, max_examples=10, max_tokens=4,
                       batch_size=batch_size)["pc"]
        assert got["loss"] == pytest.approx(expected, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert got["n"] == 2


def test_text_set_loss_and_no_accuracy(tmp_path, model_dir, loaded):
    examples = [{"text": "some plain text"}, {"text": "more"}]
    data = write_jsonl(tmp_path / "text.jsonl", examples)
    got = evaluate(model_dir, None, {"prose": data}, max_examples=10, max_tokens=4, batch_size=2)
    assert got["prose"]["accuracy"] is None
    assert got["prose"]["loss"] == pytest.approx(by_hand_loss(*loaded, examples), rel=1e-5)


def test_scored_span_stops_at_eos(loaded):
    _, tok = loaded
    tokens, start, end = encode_example(tok, {"prompt": "ab", "completion": "cd"})
    assert tokens[start:end] == tok.encode("cd") + [tok.eos_token_id]


def test_accuracy_known_answers(tmp_path, model_dir, loaded):
    model, tok = loaded
    max_tokens = 6
    answers = [mlx_lm.generate(model, tok, tok.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False),
        max_tokens=max_tokens) for p in PROMPTS]
    right = write_jsonl(tmp_path / "right.jsonl",
                        [{"prompt": p, "completion": f" {a}\n"} for p, a in zip(PROMPTS, answers)])
    wrong = write_jsonl(tmp_path / "wrong.jsonl",
                        [{"prompt": p, "completion": "no such answer"} for p in PROMPTS])
    events = []
    got = evaluate(model_dir, None, {"right": right, "wrong": wrong}, max_examples=100,
                   max_tokens=max_tokens, batch_size=3, progress=lambda *e: events.append(e))
    assert got["right"]["accuracy"] == 1.0
    assert got["wrong"]["accuracy"] == 0.0
    assert list(got) == ["right", "wrong"]
    assert ("right", "generate", len(PROMPTS), len(PROMPTS)) in events
    assert ("wrong", "loss", len(PROMPTS), len(PROMPTS)) in events
    # free-form prompts: the same greedy answers, in order
    assert generate_samples(model_dir, None, PROMPTS, max_tokens) == answers
    # max_examples takes the first lines
    assert evaluate(model_dir, None, {"right": right}, max_examples=3, max_tokens=max_tokens,
                    batch_size=8)["right"]["n"] == 3


def test_adapter_changes_loss(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "up abcd", "completion": "ABCD"},
                                               {"prompt": "inc 12", "completion": "23"}])
    adapter = write_adapter(tmp_path / "adapter")
    kw = dict(max_examples=10, max_tokens=4, batch_size=2)
    base = evaluate(model_dir, None, {"t": data}, **kw)["t"]["loss"]
    with_adapter = evaluate(model_dir, adapter, {"t": data}, **kw)["t"]["loss"]
    assert abs(with_adapter - base) > 1e-3


def test_adapter_that_does_not_fit(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    adapter = write_adapter(tmp_path / "adapter", hidden=48)
    with pytest.raises(FusionError, match="adapter"):
        evaluate(model_dir, adapter, {"t": data}, max_examples=1, max_tokens=2, batch_size=1)


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "empty"),
    ("\n\n", "empty"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', "line 2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n', "line 3: expected"),
    ('{"prompt": "a", "completion": "b"}\n{"text": "t"}\n', "line 2: text example in a prompt/completion set"),
    ('["a", "b"]\n', "line 1: expected"),
    ('{"text": 3}\n', "line 1: expected"),
])
def test_bad_data_file(tmp_path, content, message):
    path = tmp_path / "set.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FusionError, match=message) as err:
        # the data is checked before the model is loaded: the base path is never touched
        evaluate(tmp_path / "no-model", None, {"t": path}, max_examples=10, max_tokens=2, batch_size=1)
    assert str(path) in str(err.value)


def test_load_examples_reads_only_max_examples(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert [e["text"] for e in load_examples(path, 2)] == ["a", "b"]


def m(acc, loss):
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": acc, "n": 10}


def test_retention_is_one_when_fusion_equals_source():
    sources = {"up": {"up": m(0.9, 0.2), "inc": m(0.1, 2.0)}, "inc": {"up": m(0.0, 2.5), "inc": m(0.8, 0.3)}}
    fusion = {"up": m(0.9, 0.2), "inc": m(0.8, 0.3), "generations": {"p": "x"}}
    base = {"up": m(0.0, 3.0), "inc": m(0.1, 3.0)}
    r = retention(fusion, sources, {"up": "up", "inc": "inc"}, base)
    for task in ("up", "inc"):
        x = r["tasks"][task]
        assert x["accuracy_retention"] == 1.0 and x["loss_retention"] == 1.0 and x["retention"] == 1.0
        assert x["retention_kind"] == "accuracy" and x["adapter"] == task
    assert r["mean_retention"] == 1.0 and r["worst_retention"] == 1.0
    assert not r["worse_than_routing"] and r["regressions"] == []
    assert r["tasks"]["inc"]["accuracy_gain"] == pytest.approx(0.7)
    assert r["tasks"]["inc"]["loss_gain"] == pytest.approx(2.7)
    json.dumps(r)  # JSON-ready


def test_retention_fallbacks_and_routing_flag():
    sources = {"a": {"ta": m(0.0, 0.5)}, "b": {"tb": m(None, 1.0)}, "c": {"tc": m(1.0, 0.1)}}
    fusion = {"ta": m(0.5, 1.0), "tb": m(None, 0.8), "tc": m(0.97, 0.1)}
    r = retention(fusion, sources, {"a": "ta", "b": "tb", "c": "tc"}, base={})
    ta, tb, tc = (r["tasks"][t] for t in ("ta", "tb", "tc"))
    assert ta["accuracy_retention"] is None and ta["retention"] == 0.5 and ta["retention_kind"] == "loss"
    assert tb["accuracy_retention"] is None and tb["retention"] == pytest.approx(1.25)
    assert tc["retention"] == pytest.approx(0.97) and tc["accuracy_gain"] is None
    assert r["worst_retention"] == 0.5
    assert r["mean_retention"] == pytest.approx((0.5 + 1.25 + 0.97) / 3)
    assert r["worse_than_routing"] and r["regressions"] == ["ta", "tc"]
    # within the tolerance is not a regression
    assert retention(fusion, sources, {"a": "ta", "b": "tb", "c": "tc"}, {},
                     tolerance=0.6)["regressions"] == []


def test_retention_needs_the_fusion_on_every_source_task():
    with pytest.raises(FusionError, match="task 'tb'"):
        retention({"ta": m(1, 1)}, {"a": {"ta": m(1, 1)}, "b": {"tb": m(1, 1)}},
                  {"a": "ta", "b": "tb"}, {})
