"""Where a weight search's evaluations run: in this process, or on the actors of a Ray cluster.

A ``Scorer`` is one worker's state: the fusion's source adapters (validated once) and the base model
with the validation sets (``pipeline.live.Evaluator``, loaded once). It fuses each candidate in
memory and scores it; nothing is written. A pool runs scorers:

- ``LocalPool``: one scorer in this process (``search.backend: local``, the default).
- ``RayPool``: ``workers`` Ray actors, each holding its own scorer, on the cluster at ``address``
  (``None``: a Ray started for the run and stopped after it). ``map`` hands points to whichever
  actor is free and returns the results in the order of the points.

Both have ``map(method, items) -> [result, ...]`` (results in the order of ``items``) and ``close()``.

Same scores everywhere: a matrix product in OpenBLAS rounds differently with a different number of
threads (measured on the demo: a validation retention of 0.9131392963874854 with two threads and
0.9131392714486115 with one), and Ray starts its workers with one (``OMP_NUM_THREADS=1``). So every
scorer evaluates with the OpenBLAS thread count of the process that runs the search
(``evaluation_threads``), and the backends give the same trace and the same best weights.
Paths are made absolute before they are sent, so a Ray worker must see the project at the same
path (one machine, or the same checkout path / a shared filesystem on every node).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from pipeline.errors import FusionError


class Scorer:
    """Fuse and score candidates of one fusion; the base model and sets are loaded once."""

    def __init__(self, base_model: str, adapters: list[tuple[str, str]], valid: dict[str, str], spec,
                 score: dict, threads: int | None = None):
        from pipeline.live import Evaluator, Sources

        self.names = [n for n, _ in adapters]
        self.paths = dict(adapters)
        self.spec = spec
        self.threads = threads
        self.sources = Sources([p for _, p in adapters])
        self.evaluator = Evaluator(base_model, valid, **score)

    def _threads(self):
        from contextlib import nullcontext

        from pipeline.threads import blas_threads

        return nullcontext() if self.threads is None else blas_threads(self.threads)

    def node(self) -> str:
        """The id of the Ray node this scorer runs on (``None`` outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def source(self, name: str) -> dict:
        """The scores of source adapter ``name`` on its own validation set."""
        with self._threads():
            return self.evaluator.score(self.paths[name], tasks=[name])

    def candidate(self, weights: list) -> tuple[dict, dict]:
        """``(scores on every validation set, seconds {fuse, load, score})`` of the fusion with
        ``weights`` (its other settings unchanged)."""
        t0 = time.perf_counter()
        fused = self.sources.fuse(replace(self.spec, weights=weights))
        fuse_seconds = time.perf_counter() - t0
        with self._threads():
            scores = self.evaluator.score(fused)
        return scores, {"fuse": fuse_seconds, **self.evaluator.timings}


class LocalPool:
    """One scorer in this process."""

    workers = nodes = 1

    def __init__(self, *args):
        self.scorer = Scorer(*args)

    def map(self, method: str, items: list) -> list:
        return [getattr(self.scorer, method)(item) for item in items]

    def close(self) -> None:
        pass


class RayPool:
    """``workers`` Ray actors, each a ``Scorer`` (one CPU each)."""

    def __init__(self, address: str | None, workers: int | None, *args):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise FusionError("search.backend ray needs Ray: pip install 'lora-fusion[ray]'") from None
        self._ray = ray
        self._started = False
        env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "FUSION_NO_FAST_BLAS", "FUSION_THREADS",
                                           "FUSION_BLAS_THREADS") if k in os.environ}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports sent anywhere from a search
        options = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                       runtime_env={"env_vars": env} if env else None)
        try:
            if address is None:
                ray.init(num_cpus=workers or os.cpu_count() or 1, **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise FusionError(f"search.ray_address {address!r}: cannot connect to Ray: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        self._started = True
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.workers = workers
        actor = ray.remote(num_cpus=1)(Scorer)
        self.actors = [actor.remote(*args) for _ in range(workers)]
        try:
            nodes = ray.get([a.node.remote() for a in self.actors])  # waits until every scorer is loaded
        except Exception as e:
            self.close()
            raise _worker_error(e) from None
        self.nodes = len(set(nodes))
        self.pool = ActorPool(self.actors)

    def map(self, method: str, items: list) -> list:
        try:
            return list(self.pool.map(lambda a, item: getattr(a, method).remote(item), items))
        except Exception as e:
            raise _worker_error(e) from None

    def close(self) -> None:
        if self._started:
            for a in self.actors:
                self._ray.kill(a)
            self._ray.shutdown()
            self._started = False


def _worker_error(e: Exception) -> Exception:
    """A Ray worker's FusionError as that error (one line for the user), a dead worker as a
    FusionError saying so; anything else unchanged."""
    from ray.exceptions import RayActorError, RayTaskError

    cause = getattr(e, "cause", None)
    if isinstance(cause, FusionError):
        return FusionError(str(cause))
    if isinstance(e, RayActorError):
        inner = getattr(e, "error_msg", None) or str(e)
        if isinstance(cause, BaseException) or "FusionError" in inner:
            last = [line for line in inner.strip().splitlines() if "FusionError" in line]
            if last:
                return FusionError(last[-1].split("FusionError:", 1)[-1].strip())
        return FusionError(f"a Ray worker died: {str(e).strip().splitlines()[0]}")
    if isinstance(e, RayTaskError):
        return e
    return e


def open_pool(backend: str, address: str | None, workers: int | None, base_model: str,
              adapters: list[tuple[str, str]], valid: dict[str, Path], spec, score: dict):
    """The pool of ``search.backend`` (``local`` or ``ray``), its scorers loaded."""
    args = (_absolute(base_model), [(n, str(Path(p).resolve())) for n, p in adapters],
            {n: str(Path(p).resolve()) for n, p in valid.items()}, spec, score, evaluation_threads())
    if backend == "local":
        return LocalPool(*args)
    if backend == "ray":
        return RayPool(address, workers, *args)
    raise FusionError(f"search.backend: expected local or ray, got {backend!r}")


def evaluation_threads() -> int | None:
    """The OpenBLAS thread count this process evaluates with (``None`` without OpenBLAS)."""
    from pipeline import _blas
    from pipeline.threads import _openblas_libs

    _blas.enable()
    counts = [get() for _, get in _openblas_libs()]
    return max(counts) if counts else None


def _absolute(base_model: str) -> str:
    """A local model directory as an absolute path; a hub id (``org/name``) unchanged."""
    return str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
