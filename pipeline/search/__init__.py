"""The weight search: look for the weights of one fusion that score best on the validation sets.

``optimizer.py`` is the CMA-ES part (any objective, a fixed budget and seed, the ``search:``
settings, weights <-> vector, the trace figure); ``run.py`` is the run that asks for each generation
of candidates, has them fused and scored, and writes ``best.json``, ``trace.json`` and ``trace.png``;
``workers.py`` is where they are fused and scored in memory: in this process or on Ray actors.
"""

from pipeline.search.optimizer import (OBJECTIVES, SETTINGS, SearchResult, search, settings, trace_figure,
                                       vector_weights, weights_vector)
from pipeline.search.run import run_search, setting_text, valid_split, write_disabled

__all__ = ["OBJECTIVES", "SETTINGS", "SearchResult", "run_search", "search", "setting_text", "settings",
           "trace_figure", "valid_split", "vector_weights", "weights_vector", "write_disabled"]
