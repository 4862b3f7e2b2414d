"""Collateral damage: how much an adapter moves the base model on prompts that belong to no task.

The off-task set is generated offline from a seed (:func:`offtask_prompts`: short general
requests, questions and strings that none of the demos' tasks use, or the user's own prompts) and
answered by the base model itself, greedily (:func:`base_answers`); it is written as an mlx-lm
prompt/completion jsonl file. :func:`drift` then scores a model (base + adapter) on it, teacher
forced on the base's answers, over the answer tokens and the EOS after them:

- ``kl``: the mean over those positions of ``KL(p_base || p_model)`` of the next-token
  distributions (nats per token; 0 for the base model itself);
- ``loss``: the model's mean negative log-likelihood of the base's answer (the base's own is the
  floor: a higher value means the model would say something else);
- ``agreement``: the fraction of those positions where the model's most likely token is the base's;
- ``n`` (prompts) and ``tokens`` (positions scored).
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.errors import FusionError

SUBJECTS = ("the sea", "a mountain", "winter", "a library", "the moon", "a bicycle", "coffee", "a city",
            "music", "a garden", "rain", "the forest", "a train", "friendship", "a kitchen", "the sky")
COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Kenya", "Norway", "Peru", "Spain")
ADJECTIVES = ("happy", "small", "bright", "quick", "calm", "old", "strong", "soft", "loud", "clean")
TEMPLATES = (
    "What is the capital of {country}?",
    "Write one sentence about {subject}.",
    "Give a synonym for {adjective}.",
    "What is {a} plus {b}?",
    "Name something you find in {subject}.",
    "Describe {subject} in three words.",
    "Is {subject} usually {adjective}?",
    "Tell me a fact about {country}.",
    "Complete the sentence: {subject} is",
    "hello, how are you today?",
    "{word}",
    "{word} {word2}",
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def offtask_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts from the templates above, drawn from ``seed`` (the same seed, the same
    list)."""
    if n < 1:
        raise FusionError(f"drift.examples must be at least 1, got {n}")
    rng = random.Random(f"offtask:{seed}")
    seen: dict[str, None] = {}
    misses = 0
    while len(seen) < n and misses < 10_000:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(5, 8)))
        word2 = "".join(rng.choice(LETTERS) for _ in range(rng.randint(5, 8)))
        p = rng.choice(TEMPLATES).format(
            country=rng.choice(COUNTRIES), subject=rng.choice(SUBJECTS), adjective=rng.choice(ADJECTIVES),
            a=rng.randint(2, 99), b=rng.randint(2, 99), word=word, word2=word2)
        misses = misses + 1 if p in seen else 0
        seen.setdefault(p, None)
    return list(seen)


def base_answers(base: str | Path, prompts: list[str], max_tokens: int, batch_size: int,
                 system_prompt: str | None = None) -> list[dict]:
    """The base model's greedy answers: ``[{"prompt", "completion"}]`` in the order of ``prompts``."""
    from pipeline.evaluate import generate_samples

    answers = generate_samples(base, None, prompts, max_tokens, batch_size, system_prompt)
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]


def drift(base: str | Path, adapter: str | Path | None, offtask: str | Path, *, batch_size: int,
          system_prompt: str | None = None, base_model=None) -> dict:
    """``{"kl", "loss", "agreement", "n", "tokens"}`` of base + ``adapter`` against the base on the
    off-task file (see the module docstring). ``base_model``: an already loaded ``(model, tokenizer)``
    of the base, to skip loading it again."""
    import mlx.core as mx

    from pipeline.evaluate import encode_example, load_examples, load_model

    examples = load_examples(offtask)
    if "completion" not in examples[0]:
        raise FusionError(f"{offtask}: the off-task set needs prompt/completion lines")
    ref, tokenizer = base_model or load_model(base)
    model = ref if adapter is None else load_model(base, adapter)[0]
    encoded = [encode_example(tokenizer, ex, system_prompt) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    kl = nll = agree = 0.0
    count = 0
    for lo in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[lo: lo + batch_size]]
        width = max(len(t) for t, _, _ in rows)
        batch = mx.array([t + [0] * (width - len(t)) for t, _, _ in rows])
        inputs, targets = batch[:, :-1], batch[:, 1:]
        pos = mx.arange(1, width)[None, :]
        mask = ((pos >= mx.array([r[1] for r in rows])[:, None])
                & (pos < mx.array([r[2] for r in rows])[:, None])).astype(mx.float32)
        logp = _log_softmax(ref(inputs).astype(mx.float32))
        logq = logp if model is ref else _log_softmax(model(inputs).astype(mx.float32))
        k = (mx.exp(logp) * (logp - logq)).sum(axis=-1)
        ce = -mx.take_along_axis(logq, targets[..., None], axis=-1)[..., 0]
        same = (mx.argmax(logq, axis=-1) == mx.argmax(logp, axis=-1)).astype(mx.float32)
        sums = mx.stack([(k * mask).sum(), (ce * mask).sum(), (same * mask).sum(), mask.sum()])
        mx.eval(sums)
        a, b, c, d = sums.tolist()
        kl, nll, agree, count = kl + a, nll + b, agree + c, count + int(d)
    if count == 0:
        raise FusionError(f"{offtask}: no answer tokens to score")
    return {"kl": max(kl / count, 0.0), "loss": nll / count, "agreement": agree / count,
            "n": len(examples), "tokens": count}


def _log_softmax(x):
    import mlx.core as mx

    return x - mx.logsumexp(x, axis=-1, keepdims=True)
