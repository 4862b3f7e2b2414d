"""Answer one prompt with the base model, every declared adapter and a fusion, side by side, streaming.

Models load as the evaluation loads them (:func:`pipeline.evaluate.load_model`) and the prompt is
chat-templated the same way, after ``eval.system_prompt`` (:func:`pipeline.evaluate.prompt_tokens`),
so an answer here is what the report's generations show. Decoding is greedy (mlx-lm's
``stream_generate`` with its default sampler) and stops at EOS or after ``max_tokens``. The streams
advance one token each in turn, so the columns fill together.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

from pipeline.errors import FusionError
from pipeline.studio.project import Project

MAX_PROMPT_CHARS = 4000
MAX_TOKENS = 256

class ModelThread:
    """Every model computation of the page (loading, scoring, generating) runs on one thread, one at a
    time: MLX keeps per-thread streams, and two models computing at once would only share 2 cores.

    That thread is the process's main thread: MLX used from another thread can abort the process
    when it exits (``terminate called without an active exception``, mlx issue 3126). While
    :meth:`serve` runs (the server's main loop), jobs queue for it; otherwise (the library called
    from a script or a test) a job runs at once on the caller's thread."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._serving = threading.Event()

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        if self._serving.is_set():
            self._jobs.put((future, fn, args, kwargs))
        else:
            self._run(future, fn, args, kwargs)
        return future

    @staticmethod
    def _run(future: Future, fn, args, kwargs) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the waiting caller
                future.set_exception(e)

    def start(self) -> None:
        """From now on jobs wait for :meth:`serve` (call before the server takes requests)."""
        self._serving.set()

    def serve(self) -> None:
        """Run queued jobs on this (the main) thread until interrupted."""
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._run(*job)
        finally:
            self._serving.clear()


MLX = ModelThread()


def on_mlx_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on the model thread; its result (or its exception)."""
    return MLX.submit(fn, *args, **kwargs).result()


def labels(project: Project) -> list[str]:
    """The columns of a side-by-side answer: the base, each declared adapter, the fusion."""
    return ["base", *(f"adapter {a}" for a in project.adapters), "fusion"]


class Models:
    """Loaded models by name (``base``, ``adapter NAME``, ``fusion NAME``), loaded on first use."""

    def __init__(self, project: Project):
        self.project = project
        self._loaded: dict[str, tuple] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="fusion-studio-")

    def close(self) -> None:
        self._loaded.clear()
        self._tmp.cleanup()

    def adapter_of(self, label: str) -> Path | None:
        """The adapter directory a label stands for (a fusion not built yet is fused from its params
        into the studio's temporary directory)."""
        if label == "base":
            return None
        kind, _, name = label.partition(" ")
        if kind == "adapter":
            return self.project.adapter_path(name)
        if kind == "fusion":
            built = self.project.fused_path(name)
            if built is not None:
                return built
            from pipeline.fuse import fuse

            f = self.project.fusion(name)
            where = Path(self._tmp.name) / name
            if not (where / "adapter_config.json").is_file():
                fuse([self.project.adapter_path(a) for a in f.adapters], where, f.spec, names=f.adapters)
            return where
        raise FusionError(f"unknown model {label!r}")

    def get(self, label: str):
        from pipeline.evaluate import load_model

        if label not in self._loaded:
            self._loaded[label] = load_model(self.project.base_model(), self.adapter_of(label))
        return self._loaded[label]


def stream_answers(models: Models, prompt: str, fusion: str, max_tokens: int = 32) -> Iterator[list[str]]:
    """Yield the texts so far of every column of :func:`labels` (the last one: ``fusion``), one token
    of each unfinished stream per step; the last yield holds the full answers."""
    from mlx_lm import stream_generate

    from pipeline.evaluate import prompt_tokens

    project = models.project
    project.fusion(fusion)
    if not isinstance(prompt, str) or not prompt.strip():
        raise FusionError("write a prompt first")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise FusionError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise FusionError(f"max tokens must be an integer in [1, {MAX_TOKENS}], got {max_tokens!r}")
    names = [*labels(project)[:-1], f"fusion {fusion}"]
    system = project.params.eval["system_prompt"]
    steps: queue.Queue = queue.Queue()

    def run() -> None:
        streams = []
        for label in names:
            model, tokenizer = models.get(label)
            streams.append(stream_generate(model, tokenizer, prompt_tokens(tokenizer, prompt, system),
                                           max_tokens=max_tokens))
        texts = [""] * len(streams)
        live = list(range(len(streams)))
        while live:
            for i in list(live):
                r = next(streams[i], None)
                if r is None:
                    live.remove(i)
                    continue
                texts[i] += r.text
                if r.finish_reason is not None:
                    live.remove(i)
            steps.put(list(texts))

    done = MLX.submit(run)
    done.add_done_callback(lambda _: steps.put(None))
    while (texts := steps.get()) is not None:
        yield texts
    done.result()  # re-raise what failed on the model thread
