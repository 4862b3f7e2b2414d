"""Score fusions without writing them: one loaded base model, candidates applied in memory.

``evaluate(base, fused_dir, tasks)`` loads the base model and the evaluation sets for every call.
A weight search (or an interactive tool) scores many candidates of one fusion on the same sets, so
here both are loaded once:

    sources = Sources(["adapters/up", "adapters/inc"])      # validated once
    ev = Evaluator("models/base", {"up": "data/up/valid.jsonl", ...}, max_examples=100,
                   max_tokens=8, batch_size=50)
    fused = sources.fuse(FusionSpec(weights=[0.7, 0.3]))    # FusedFactors, nothing written
    ev.score(fused)          # {task: {"loss", "perplexity", "accuracy", "n"}}, as evaluate() returns
    ev.score("adapters/up")  # an mlx-lm adapter directory, read from disk
    ev.score(None)           # the base model alone

Applying a candidate is exactly what ``mlx_lm.load(base, adapter_path=DIR)`` does with the adapter
that ``pipeline.fuse.fuse`` would write to DIR: mlx-lm's own ``linear_to_lora_layers`` with the
adapter's config, then its ``lora_a`` / ``lora_b`` (the same float32 values the file holds) loaded
into those layers. After scoring the LoRA layers are removed again, so the model is the base model
between calls. The scores are therefore equal to the on-disk path's, to the last bit (tested).
Merging ``W + dW`` into a copy of the weights would be a different float computation, so it is not
used.

``Evaluator.timings`` holds the seconds of the last ``score``: ``load`` (applying the adapter) and
``score``. One ``Evaluator`` is not thread-safe (it changes its model while scoring).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.errors import FusionError
from pipeline.fuse import FusedFactors, fuse
from pipeline.spec import FusionSpec, check_spec


class Sources:
    """The source adapters of a fusion, validated once here; ``fuse(spec)`` gives the fused factors."""

    def __init__(self, paths: list[str | Path], *, ignore_base: bool = False, space: str = "delta"):
        from pipeline.validate import validate

        self.paths = [Path(p) for p in paths]
        self.ignore_base = ignore_base
        self.adapters = validate(self.paths, None, ignore_base=ignore_base, space=space).adapters

    def fuse(self, spec: FusionSpec) -> FusedFactors:
        """What ``fuse(paths, out, spec)`` writes, in memory (``pipeline.fuse.fuse`` with ``out=None``)."""
        check_spec(spec, len(self.paths))
        return fuse(self.paths, None, spec, ignore_base=self.ignore_base)


class Evaluator:
    """A base model and evaluation sets loaded once; ``score`` scores the base model, an adapter
    directory or in-memory fused factors on every set."""

    def __init__(self, base_model: str | Path, tasks: dict[str, str | Path], *, max_examples: int,
                 max_tokens: int, batch_size: int, system_prompt: str | None = None):
        from pipeline.evaluate import encode_sets, load_examples, load_model

        if batch_size < 1:
            raise FusionError(f"batch_size must be at least 1, got {batch_size}")
        if max_tokens < 1:
            raise FusionError(f"max_tokens must be at least 1, got {max_tokens}")
        self.base_model = str(base_model)
        self.tasks = {task: Path(path) for task, path in tasks.items()}
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.sets = {task: load_examples(path, max_examples) for task, path in self.tasks.items()}
        self.model, self.tokenizer = load_model(base_model)
        self.encoded = encode_sets(self.tokenizer, self.sets, self.tasks, system_prompt)
        self.timings: dict[str, float] = {}

    def score(self, adapter: FusedFactors | str | Path | None = None, *, tasks: list[str] | None = None,
              progress=None) -> dict[str, dict]:
        """Metrics per task (``pipeline.evaluate.evaluate``'s) of the base model with ``adapter``:
        in-memory fused factors, an mlx-lm adapter directory, or ``None`` (the base model); on
        every set, or on ``tasks`` only. ``progress``: as ``evaluate``'s."""
        from pipeline.evaluate import score_sets

        tasks = list(self.sets) if tasks is None else tasks
        unknown = [t for t in tasks if t not in self.sets]
        if unknown:
            raise FusionError(f"no evaluation set for task(s) {', '.join(unknown)} (loaded: {', '.join(self.sets)})")

        t0 = time.perf_counter()
        weights, config = (None, None) if adapter is None else _adapter_weights(adapter)
        if weights is not None:
            self._apply(weights, config, adapter)
        t1 = time.perf_counter()
        try:
            return score_sets(self.model, self.tokenizer, {t: self.sets[t] for t in tasks}, self.encoded,
                              max_tokens=self.max_tokens, batch_size=self.batch_size, progress=progress,
                              where=self.tasks)
        finally:
            if weights is not None:
                from mlx_lm.tuner.utils import remove_lora_layers

                remove_lora_layers(self.model)
            self.timings = {"load": t1 - t0, "score": time.perf_counter() - t1}

    def _apply(self, weights: dict, config: dict, where) -> None:
        """LoRA layers from ``config`` and their weights, as ``mlx_lm.tuner.utils.load_adapters``."""
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.tuner.utils import linear_to_lora_layers, remove_lora_layers

        if config.get("fine_tune_type", "lora") != "lora":
            raise FusionError(f"{where}: only LoRA adapters can be scored in memory "
                              f"(fine_tune_type {config.get('fine_tune_type')!r})")
        try:
            linear_to_lora_layers(self.model, config["num_layers"], config["lora_parameters"])
            params = {k: v.shape for k, v in tree_flatten(self.model.parameters())
                      if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
            bad = [k for k, w in weights.items() if params.get(k) != w.shape]
            if bad:
                raise FusionError(f"{where}: {len(bad)} tensor(s) do not fit the model's LoRA layers "
                                  f"(first: {bad[0]})")
            self.model.load_weights([(k, w if isinstance(w, mx.array) else mx.array(w))
                                     for k, w in weights.items()], strict=False)
        except (KeyError, ValueError) as e:  # a config mlx-lm refuses
            remove_lora_layers(self.model)
            raise FusionError(f"{where}: cannot apply the adapter: {e}") from None
        except BaseException:
            remove_lora_layers(self.model)
            raise
        self.model.eval()


def _adapter_weights(adapter) -> tuple[dict, dict]:
    """``(tensors by mlx-lm name, adapter config)`` of fused factors or an adapter directory."""
    if isinstance(adapter, FusedFactors):
        from pipeline.writers import mlx_tensors

        return mlx_tensors(adapter.factors), adapter.config
    import mlx.core as mx

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file() or not (path / "adapters.safetensors").is_file():
        raise FusionError(f"{path}: not an mlx-lm adapter directory (adapters.safetensors, adapter_config.json)")
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    return mx.load(str(path / "adapters.safetensors")), config
