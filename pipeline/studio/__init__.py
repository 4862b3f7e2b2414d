"""``fusion studio``: a local web page to explore, compare and try the fusions of a project.

``project`` reads what the page shows (params, committed reports, ``dvc exp show``); ``live`` fuses
and scores candidate settings and builds the ``dvc exp run`` of them; ``generate`` streams answers of
the base model, the adapters and a fusion side by side; ``app`` is the Gradio page over them.
Only ``app`` imports Gradio (the ``studio`` extra).
"""

from pipeline.studio.live import LiveScorer, LiveSettings, checked, experiment_args, initial_settings, save_experiment
from pipeline.studio.project import (Project, baseline_rows, compare_figures, compare_rows, experiment_rows,
                                     fusion_rows)

__all__ = ["LiveScorer", "LiveSettings", "Project", "baseline_rows", "checked", "compare_figures",
           "compare_rows", "experiment_args", "experiment_rows", "fusion_rows", "initial_settings",
           "save_experiment"]
