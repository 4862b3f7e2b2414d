"""The demo's base model: a freshly initialised tiny llama pretrained here to copy words.

It copies words of every alphabet, half of them under the task names and half under random 2-3
letter prefixes, so it follows the chat format and stops with EOS but scores 0% exact match on every
task (copying is never the right answer). Own training loop: AdamW, linear warmup over the first
tenth of the steps, then cosine decay; the loss scores the completion and EOS only.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from pipeline.demo.config import DemoConfig, Progress
from pipeline.demo.tasks import ALPHABETS, random_prefix, random_word

EOS_ID = 258  # pipeline.demo.tinymodel: "</s>"
SEPARATOR = "="  # what the chat template puts after the prompt


def encode_pair(prompt: str, completion: str) -> tuple[list[int], int]:
    """Token ids of a templated prompt/completion pair and the prompt length.

    Equal to the tokenizer of ``pipeline.demo.tinymodel`` applying its chat template (bytes, ``=``,
    bytes, EOS); written out here so pretraining needs no tokenizer object.
    """
    p = list(prompt.encode("utf-8")) + list(SEPARATOR.encode())
    return p + list(completion.encode("utf-8")) + [EOS_ID], len(p)


def _pretrain_batch(rng: np.random.Generator, cfg: DemoConfig, width: int):
    """One batch of copying examples: (inputs, targets, mask) as numpy arrays, right-padded."""
    names = list(cfg.tasks)
    alphabets = list(ALPHABETS.values())
    tokens = np.zeros((cfg.pretrain_batch, width + 1), np.int32)
    mask = np.zeros((cfg.pretrain_batch, width), np.float32)
    for i in range(cfg.pretrain_batch):
        word = random_word(rng, alphabets[int(rng.integers(len(alphabets)))], cfg.word_length)
        prefix = names[int(rng.integers(len(names)))] if rng.random() < 0.5 else random_prefix(rng)
        ids, n_prompt = encode_pair(f"{prefix} {word}", word)
        tokens[i, :len(ids)] = ids
        mask[i, n_prompt - 1:len(ids) - 1] = 1.0  # predict the completion and EOS
    return tokens[:, :-1], tokens[:, 1:], mask


def pretrain_base(cfg: DemoConfig, progress: Progress | None = None):
    """A freshly initialised tiny llama trained to copy words; returns (model, config, losses)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from pipeline.demo.tinymodel import llama_config, new_llama

    config = llama_config(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, ff=cfg.ff)
    model = new_llama(config, seed=cfg.seed_for("base"))
    rng = np.random.default_rng(cfg.seed_for("pretrain data"))
    steps = cfg.pretrain_steps
    warmup = max(1, steps // 10)
    schedule = optim.join_schedules(
        [optim.linear_schedule(cfg.pretrain_lr / warmup, cfg.pretrain_lr, warmup),
         optim.cosine_decay(cfg.pretrain_lr, max(1, steps - warmup), cfg.pretrain_lr * 0.05)],
        [warmup])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, inputs, targets, mask):
        ce = nn.losses.cross_entropy(model(inputs), targets) * mask
        return ce.sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        opt.update(model, grads)
        return loss

    # longest prompt: 3-letter prefix (or longest task name), space, word, "="; then word + EOS
    width = max(3, *map(len, cfg.tasks)) + 2 + 2 * cfg.word_length + 1
    losses = []
    report = max(1, steps // 50)
    model.train()
    for it in range(1, steps + 1):
        inputs, targets, mask = _pretrain_batch(rng, cfg, width)
        loss = step(mx.array(inputs), mx.array(targets), mx.array(mask))
        mx.eval(state, loss)
        losses.append(loss.item())
        if progress and (it % report == 0 or it == steps):
            progress("pretrain", it, steps)
    model.eval()
    return model, config, losses
