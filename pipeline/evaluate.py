"""Score a model (base, base + adapter, base + fused adapter) on evaluation sets, and retention.

Evaluation sets use mlx-lm's jsonl formats, one JSON object per line:
``{"prompt": ..., "completion": ...}`` (a task with an answer) or ``{"text": ...}`` (plain text).
Every line of a file must use the same format; blank lines are skipped. The first ``max_examples``
examples are used.

What is measured, per set:

- ``loss``: mean negative log-likelihood per scored token, over all scored tokens of the set
  (token-weighted, as mlx-lm's own evaluation). For prompt/completion pairs the scored tokens are the
  completion tokens: the conversation is rendered with the tokenizer's chat template, the prompt
  (rendered with ``add_generation_prompt=True``) is masked, and scoring stops at the first EOS token
  after it, EOS included. Template tokens after EOS (``"\\n"`` in some templates) and padding are not
  scored; mlx-lm's training loss scores the position after the end, so its numbers differ slightly.
  For ``{"text"}`` lines the text is tokenized (EOS appended when missing) and every token but the
  first is scored.
- ``perplexity``: ``exp(loss)`` (``None`` if that overflows a float).
- ``accuracy``: exact match of greedy generations with the completion, for prompt/completion sets
  (``None`` for text sets). Generation starts from the templated prompt token ids and stops at EOS or
  after ``max_tokens`` tokens. Normalisation: surrounding whitespace is stripped from both the
  generation and the completion; nothing else (case and inner spaces count).
- ``n``: number of examples used.

``retention`` turns those numbers into the key figure of a fusion; its docstring has the definition.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from pipeline.errors import FusionError

# progress(task, stage, done, total): stage is "loss" or "generate"; done counts examples.
Progress = Callable[[str, str, int, int], None]

# A fusion whose retention on some task is below 1 - ROUTING_TOLERANCE is worse than routing.
ROUTING_TOLERANCE = 0.02


# ---------------------------------------------------------------------------- data


def load_examples(path: str | Path, max_examples: int | None = None) -> list[dict]:
    """The first ``max_examples`` examples of a jsonl evaluation set, validated.

    Returns dicts with either ``prompt`` and ``completion`` or ``text``, and ``line`` (the line
    number in the file); other keys are dropped.
    Raises FusionError naming the file (and line) when it is missing, empty or malformed. Lines past
    ``max_examples`` are not read.
    """
    path = Path(path)
    if max_examples is not None and max_examples < 1:
        raise FusionError(f"max_examples must be at least 1, got {max_examples}")
    if not path.is_file():
        raise FusionError(f"{path}: evaluation set not found")
    examples: list[dict] = []
    kind = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_examples is not None and len(examples) >= max_examples:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FusionError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            example, this_kind = _example(record)
            if example is None:
                raise FusionError(
                    f"{path}: line {lineno}: expected an object with string fields "
                    '"prompt" and "completion", or "text"'
                )
            if kind is not None and this_kind != kind:
                raise FusionError(
                    f"{path}: line {lineno}: {this_kind} example in a {kind} set "
                    "(one format per file)"
                )
            kind = this_kind
            examples.append({**example, "line": lineno})
    if not examples:
        raise FusionError(f"{path}: evaluation set is empty")
    return examples


def _example(record) -> tuple[dict | None, str | None]:
    if not isinstance(record, dict):
        return None, None
    if "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if isinstance(p, str) and isinstance(c, str):
            return {"prompt": p, "completion": c}, "prompt/completion"
        return None, None
    if isinstance(record.get("text"), str) and record["text"]:
        return {"text": record["text"]}, "text"
    return None, None


def encode_example(tokenizer, example: dict, system: str | None = None) -> tuple[list[int], int, int]:
    """``(tokens, start, end)``: the full token ids and the scored span ``tokens[start:end]``.

    For a prompt/completion pair ``start`` is the length of the templated prompt (with the generation
    prompt) and ``end`` is one past the first EOS after it (or the end). For text, ``start`` is 1.
    ``system``: a system message put before the prompt (``None``: none, the template's default).
    """
    if "text" in example:
        tokens = list(tokenizer.encode(example["text"]))
        if not tokens or tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        return tokens, 1, len(tokens)
    prompt = prompt_tokens(tokenizer, example["prompt"], system)
    tokens = list(tokenizer.apply_chat_template(
        _system(system) + [{"role": "user", "content": example["prompt"]},
                           {"role": "assistant", "content": example["completion"]}],
        return_dict=False,
    ))
    if tokens[: len(prompt)] != prompt:
        raise FusionError(
            "the chat template does not render the prompt as a prefix of the conversation, "
            "so the completion cannot be located for prompt masking"
        )
    start = len(prompt)
    eos = set(tokenizer.eos_token_ids)
    end = next((i + 1 for i in range(start, len(tokens)) if tokens[i] in eos), len(tokens))
    return tokens, start, end


def prompt_tokens(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as the model sees it before answering (chat template, generation
    prompt), after the system message ``system`` when one is given."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise FusionError("the base model's tokenizer has no chat template; prompt/completion "
                          "sets and prompts need one")
    return list(tokenizer.apply_chat_template(
        _system(system) + [{"role": "user", "content": prompt}], add_generation_prompt=True,
        return_dict=False,
    ))


def _system(system: str | None) -> list[dict]:
    return [] if system is None else [{"role": "system", "content": system}]


# ---------------------------------------------------------------------------- model


def load_model(base: str | Path, adapter: str | Path | None = None):
    """``mlx_lm.load`` a local model directory or a hub id (``org/name``, downloaded by mlx-lm).

    A path-like ``base`` (absolute, ``./``, ``../``, or an existing directory) must be a model
    directory; anything else of the form ``org/name`` is passed to mlx-lm as a hub id.
    """
    import mlx_lm

    text = str(base)
    local = Path(text).exists() or text.startswith(("/", "./", "../", "~")) or text.count("/") != 1
    if local and not (Path(text) / "config.json").is_file():
        raise FusionError(f"{base}: not a model directory (no config.json)")
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FusionError(f"{adapter}: not an adapter directory (no adapter_config.json)")
    try:
        model, tokenizer = mlx_lm.load(text, adapter_path=None if adapter is None else str(adapter))
    except Exception as e:  # adapter tensors that do not fit, a hub id that cannot be fetched, ...
        where = base if adapter is None else f"{adapter} on {base}"
        raise FusionError(f"{where}: cannot load: {str(e).strip().splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------- loss


def masked_loss(model, batch: mx.array, starts: mx.array, ends: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the scored span of each row, and the number of scored tokens.

    batch: (B, T) token ids, padded on the right with anything. starts, ends: (B,) so that row b
    scores tokens ``batch[b, starts[b]:ends[b]]``, each predicted from the tokens before it.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs).astype(mx.float32)  # (B, T-1, V)
    pos = mx.arange(1, batch.shape[1])[None, :]  # position of each target in the row
    mask = (pos >= starts[:, None]) & (pos < ends[:, None])
    ce = nn.losses.cross_entropy(logits, targets, reduction="none") * mask
    return ce.sum(), mask.sum()


def set_loss(model, encoded: list[tuple[list[int], int, int]], batch_size: int,
             on_batch: Callable[[int], None] | None = None) -> float:
    """Token-weighted mean loss over ``encoded`` examples (see ``encode_example``), batched by length."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    total, count = 0.0, 0
    for lo in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[lo: lo + batch_size]]
        width = max(len(t) for t, _, _ in rows)
        batch = mx.array([t + [0] * (width - len(t)) for t, _, _ in rows])
        s, n = masked_loss(model, batch, mx.array([r[1] for r in rows]), mx.array([r[2] for r in rows]))
        mx.eval(s, n)
        total += s.item()
        count += int(n.item())
        if on_batch is not None:
            on_batch(len(rows))
    if count == 0:
        raise FusionError("no tokens to score (every completion is empty after the prompt)")
    return total / count


# ---------------------------------------------------------------------------- generation


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_tokens: int, batch_size: int,
                    on_done: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations of token-id ``prompts``, batched with a KV cache; stops at EOS.

    The EOS token is not part of the returned text. Prompts are run shortest first so a batch
    wastes little padding; results come back in the input order.
    """
    from mlx_lm.generate import BatchGenerator

    if max_tokens < 1:
        raise FusionError(f"max_tokens must be at least 1, got {max_tokens}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        uids = gen.insert([prompts[i] for i in order])
        index_of = dict(zip(uids, order))
        out: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    out[r.uid].append(r.token)
                if r.finish_reason is not None and on_done is not None:
                    on_done(1)
    finally:
        gen.close()
    texts = [""] * len(prompts)
    for uid, tokens in out.items():
        texts[index_of[uid]] = tokenizer.decode(tokens)
    return texts


def normalise(text: str) -> str:
    """The normalisation exact match compares after: surrounding whitespace stripped."""
    return text.strip()


# ---------------------------------------------------------------------------- public API


def evaluate(base: str | Path, adapter: str | Path | None, tasks: dict[str, Path], *,
             max_examples: int, max_tokens: int, batch_size: int,
             progress: Progress | None = None, system_prompt: str | None = None) -> dict[str, dict]:
    """Score base (+ adapter) on each task's evaluation set.

    Returns ``{task: {"loss": float, "perplexity": float, "accuracy": float | None, "n": int}}``
    (plain JSON-ready values, tasks in the given order). The model is loaded once. ``progress``, when
    given, is called as ``progress(task, stage, done, total)`` with stage ``"loss"`` or ``"generate"``.
    ``system_prompt``: a system message before every prompt (instruct templates such as SmolLM2's
    add a long default one when there is none).
    """
    if batch_size < 1:
        raise FusionError(f"batch_size must be at least 1, got {batch_size}")
    sets = {task: load_examples(path, max_examples) for task, path in tasks.items()}
    model, tokenizer = load_model(base, adapter)
    encoded = encode_sets(tokenizer, sets, tasks, system_prompt)
    return score_sets(model, tokenizer, sets, encoded, max_tokens=max_tokens, batch_size=batch_size,
                      progress=progress, where=tasks)


def encode_sets(tokenizer, sets: dict[str, list[dict]], where: dict[str, Path],
                system_prompt: str | None = None) -> dict[str, list[tuple[list[int], int, int]]]:
    """Each task's examples (``load_examples``) encoded for scoring (``encode_example``); errors name
    the file ``where[task]`` and the line."""
    encoded = {}
    for task, examples in sets.items():
        encoded[task] = []
        for ex in examples:
            try:
                encoded[task].append(encode_example(tokenizer, ex, system_prompt))
            except FusionError as e:
                raise FusionError(f"{where[task]}: line {ex['line']}: {e}") from None
    return encoded


def score_sets(model, tokenizer, sets: dict[str, list[dict]], encoded: dict[str, list], *, max_tokens: int,
               batch_size: int, progress: Progress | None = None, where: dict[str, Path]) -> dict[str, dict]:
    """Score a loaded model on encoded sets (``encode_sets``): the metrics ``evaluate`` returns."""
    results = {}
    for task, examples in sets.items():
        path = where[task]
        n = len(examples)
        try:
            loss = set_loss(model, encoded[task], batch_size, _counter(progress, task, "loss", n))
        except FusionError as e:
            raise FusionError(f"{path}: {e}") from None
        accuracy = None
        if "completion" in examples[0]:
            prompts = [t[:s] for t, s, _ in encoded[task]]
            texts = greedy_generate(model, tokenizer, prompts, max_tokens, batch_size,
                                    _counter(progress, task, "generate", n))
            hits = sum(normalise(t) == normalise(ex["completion"]) for t, ex in zip(texts, examples))
            accuracy = hits / n
        results[task] = {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else None,
            "accuracy": accuracy,
            "n": n,
        }
    return results


def generate_samples(base: str | Path, adapter: str | Path | None, prompts: list[str],
                     max_tokens: int, batch_size: int = 8, system_prompt: str | None = None) -> list[str]:
    """Greedy answers to free-form ``prompts`` (chat-templated, after ``system_prompt``), in order."""
    if not prompts:
        return []
    model, tokenizer = load_model(base, adapter)
    ids = [prompt_tokens(tokenizer, p, system_prompt) for p in prompts]
    return greedy_generate(model, tokenizer, ids, max_tokens, batch_size)


def _counter(progress: Progress | None, task: str, stage: str, total: int):
    if progress is None:
        return None
    done = 0
    progress(task, stage, 0, total)

    def step(k: int) -> None:
        nonlocal done
        done += k
        progress(task, stage, done, total)

    return step


# ---------------------------------------------------------------------------- retention


def retention(fusion: dict, sources: dict[str, dict], tasks_of: dict[str, str], base: dict,
              tolerance: float = ROUTING_TOLERANCE) -> dict:
    """How much of each source adapter's skill a fusion kept, on the source's own task.

    Inputs are ``evaluate`` results (``{task: metrics}``; other keys such as ``"generations"`` are
    ignored): ``fusion`` for the fused adapter, ``sources[name]`` for each source adapter on its own,
    ``base`` for the base model; ``tasks_of[name]`` is the task of source ``name``.

    For each task t of the fusion's sources, with S the source adapter of t (when several sources
    share t, the one that scores best on it: highest accuracy, then lowest loss), F the fusion and
    B the base:

    - ``accuracy_retention = acc_F(t) / acc_S(t)``; ``None`` when t has no accuracy (text set) or
      ``acc_S(t) == 0``.
    - ``loss_retention = loss_S(t) / loss_F(t)`` (above 1 when the fusion's loss is lower).
    - ``retention``: ``accuracy_retention`` when it exists, else ``loss_retention``; ``retention_kind``
      says which.
    - ``accuracy_gain = acc_F(t) - acc_B(t)`` and ``loss_gain = loss_B(t) - loss_F(t)``: gains over the
      base (positive = the fusion is better), ``None`` when a number is missing.

    Headline: ``mean_retention`` and ``worst_retention`` are the mean and minimum of ``retention`` over
    the tasks (``None`` when no task has one). Routing each task to its own adapter scores retention
    1 everywhere by definition, so a fusion is ``worse_than_routing`` when some task's retention is
    below ``1 - tolerance``; ``regressions`` lists those tasks.

    Returns::

        {"tasks": {t: {"adapter", "accuracy", "loss", "source_accuracy", "source_loss",
                       "base_accuracy", "base_loss", "accuracy_retention", "loss_retention",
                       "retention", "retention_kind", "accuracy_gain", "loss_gain"}},
         "mean_retention", "worst_retention", "worse_than_routing", "regressions", "tolerance"}
    """
    by_task: dict[str, list[str]] = {}
    for name in sources:
        if name not in tasks_of:
            raise FusionError(f"source adapter {name!r} has no task")
        by_task.setdefault(tasks_of[name], []).append(name)
    tasks = {}
    for task, names in by_task.items():
        for name in names:
            if task not in sources[name]:
                raise FusionError(f"no evaluation of adapter {name!r} on its task {task!r}")
        if task not in fusion:
            raise FusionError(f"no evaluation of the fusion on task {task!r}")
        best = max(names, key=lambda n: (_num(sources[n][task].get("accuracy"), -1.0),
                                         -_num(sources[n][task].get("loss"), math.inf)))
        tasks[task] = _task_retention(best, fusion[task], sources[best][task], base.get(task, {}))
    scores = [t["retention"] for t in tasks.values() if t["retention"] is not None]
    regressions = [name for name, t in tasks.items()
                   if t["retention"] is not None and t["retention"] < 1 - tolerance]
    return {
        "tasks": tasks,
        "mean_retention": sum(scores) / len(scores) if scores else None,
        "worst_retention": min(scores) if scores else None,
        "worse_than_routing": bool(regressions),
        "regressions": regressions,
        "tolerance": tolerance,
    }


def _task_retention(adapter: str, f: dict, s: dict, b: dict) -> dict:
    fa, sa, ba = f.get("accuracy"), s.get("accuracy"), b.get("accuracy")
    fl, sl, bl = f.get("loss"), s.get("loss"), b.get("loss")
    acc_ret = fa / sa if fa is not None and sa else None
    loss_ret = sl / fl if sl is not None and fl else None
    return {
        "adapter": adapter,
        "accuracy": fa,
        "loss": fl,
        "source_accuracy": sa,
        "source_loss": sl,
        "base_accuracy": ba,
        "base_loss": bl,
        "accuracy_retention": acc_ret,
        "loss_retention": loss_ret,
        "retention": acc_ret if acc_ret is not None else loss_ret,
        "retention_kind": "accuracy" if acc_ret is not None else ("loss" if loss_ret is not None else None),
        "accuracy_gain": fa - ba if fa is not None and ba is not None else None,
        "loss_gain": bl - fl if fl is not None and bl is not None else None,
    }


def _num(x, default: float) -> float:
    return default if x is None else float(x)
