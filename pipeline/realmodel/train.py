"""Train a LoRA adapter with mlx-lm's own trainer (``mlx_lm.tuner``), reproducibly from a seed.

The data are the project's prompt/completion jsonl files (``train.jsonl``, ``valid.jsonl``). Each
example is rendered as a chat (an optional system message, the user's prompt, the assistant's
completion) with the base model's chat template, and only the completion is trained (prompt
masking), exactly as ``pipeline.evaluate`` scores it. The seed fixes the LoRA initialisation
(``mx.random``) and the batch order.

Batches are padded to a multiple of ``PAD_TO`` = 8 tokens (mlx-lm's own iterator pads to one plus
a multiple of 32, which nearly doubles the cost of ~35-token examples on a CPU; padding to each
batch's own length would recompile the compiled training step for every new width); otherwise
this is mlx-lm's ``train``.
The output is an mlx-lm adapter directory (``adapters.safetensors`` + ``adapter_config.json``)
that ``mlx_lm.load(base, adapter_path=...)`` loads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from pipeline.errors import FusionError
from pipeline.evaluate import load_examples, load_model
from pipeline.io import atomic_dir

PAD_TO = 8


@dataclass
class TrainSpec:
    """What an adapter is trained with (the ``train.ADAPTER`` section of the real project's params)."""
    keys: list[str]                 # module paths inside a block, e.g. self_attn.q_proj
    num_layers: int = 16            # LoRA on the last N blocks (-1: all)
    rank: int = 8
    scale: float = 4.0
    dropout: float = 0.0
    iters: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    max_examples: int | None = None  # train examples used (None: all)
    val_batches: int = 4
    steps_per_report: int = 20
    steps_per_eval: int = 100
    extra: dict = field(default_factory=dict)


def chat_dataset(path: Path, tokenizer, system: str | None, max_examples: int | None = None):
    """mlx-lm's ``ChatDataset`` (prompt masked) over a prompt/completion file, tokenized once."""
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

    examples = load_examples(path, max_examples)
    if "prompt" not in examples[0]:
        raise FusionError(f"{path}: training needs prompt/completion examples")
    sys_msg = [] if system is None else [{"role": "system", "content": system}]
    rows = [{"messages": sys_msg + [{"role": "user", "content": e["prompt"]},
                                    {"role": "assistant", "content": e["completion"]}]}
            for e in examples]
    return CacheDataset(ChatDataset(rows, tokenizer, mask_prompt=True))


def batches(dataset, batch_size: int, max_seq_length: int, loop: bool = False, seed: int = 0,
            comm_group=None):
    """mlx-lm's ``iterate_batches`` contract, padded to a multiple of ``PAD_TO``, seeded locally.

    Yields ``(tokens (B, T), [[offset, length]] (B, 2))``; batches of similar lengths, in an order
    drawn from ``seed``.
    """
    order = sorted(range(len(dataset)), key=dataset.itemlen)
    if len(order) < batch_size:
        raise FusionError(f"{len(order)} training examples, fewer than batch_size={batch_size}")
    groups = [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for g in rng.permutation(len(groups)):
            rows = [dataset[j] for j in groups[g]]
            lengths = [min(len(t), max_seq_length) for t, _ in rows]
            width = PAD_TO * -(-max(lengths) // PAD_TO)
            arr = np.zeros((batch_size, width), np.int32)
            for r, ((tokens, _), n) in enumerate(zip(rows, lengths)):
                arr[r, :n] = tokens[:n]
            yield mx.array(arr), mx.array([[off, n] for (_, off), n in zip(rows, lengths)])
        if not loop:
            return


def train_adapter(base: str | Path, data: str | Path, out: str | Path, spec: TrainSpec,
                  system: str | None = None, log=print) -> dict:
    """Train one LoRA adapter of ``base`` on ``data/train.jsonl`` (validated on valid.jsonl).

    Writes ``out`` atomically and returns a summary (losses, seconds, tokens per second).
    """
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    data = Path(data)
    mx.random.seed(spec.seed)
    np.random.seed(spec.seed)
    model, tokenizer = load_model(base)
    train_set = chat_dataset(data / "train.jsonl", tokenizer, system, spec.max_examples)
    valid_set = chat_dataset(data / "valid.jsonl", tokenizer, system)
    lora = {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": list(spec.keys)}
    model.freeze()
    linear_to_lora_layers(model, spec.num_layers, lora)
    trained = sum(v.size for _, v in _flat(model.trainable_parameters()))
    log(f"training {trained} LoRA parameters on {len(train_set)} examples: {spec.iters} iterations, "
        f"batch {spec.batch_size}, seed {spec.seed}")

    history: dict[str, list] = {"train": [], "valid": []}

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            history["train"].append([info["iteration"], round(info["train_loss"], 4)])
            log(f"  iter {info['iteration']}: train loss {info['train_loss']:.3f}, "
                f"{info['tokens_per_second']:.0f} tokens/s")

        def on_val_loss_report(self, info):
            history["valid"].append([info["iteration"], round(info["val_loss"], 4)])
            log(f"  iter {info['iteration']}: valid loss {info['val_loss']:.3f}")

    def seeded(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        return batches(dataset, batch_size, max_seq_length, loop, spec.seed)

    with atomic_dir(out) as tmp:
        args = TrainingArgs(batch_size=spec.batch_size, iters=spec.iters, val_batches=spec.val_batches,
                            steps_per_report=spec.steps_per_report, steps_per_eval=spec.steps_per_eval,
                            steps_per_save=spec.iters + 1, max_seq_length=512,
                            adapter_file=str(tmp / "adapters.safetensors"))
        start = time.perf_counter()
        train(model, optim.Adam(learning_rate=spec.learning_rate), train_set, valid_set, args,
              iterate_batches=seeded, training_callback=Record())
        seconds = time.perf_counter() - start
        weights = dict(sorted(_flat(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / "adapters.safetensors"), weights, metadata={"format": "mlx"})
        config = {"fine_tune_type": "lora", "num_layers": spec.num_layers, "lora_parameters": lora,
                  "iters": spec.iters, "batch_size": spec.batch_size,
                  "learning_rate": spec.learning_rate, "seed": spec.seed, "mask_prompt": True,
                  "system_prompt": system}
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"seconds": round(seconds, 1), "iters": spec.iters, "parameters": trained,
            "final_train_loss": history["train"][-1][1] if history["train"] else None,
            "final_valid_loss": history["valid"][-1][1] if history["valid"] else None,
            "history": history}


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
