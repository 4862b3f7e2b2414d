"""The registered methods, in the order the command line lists them. Adding a method: write its module
function (``(sources, shape, p, name) -> FusedModule``) and add one entry here (or call
:func:`pipeline.methods.registry.register` from your own code)."""

from __future__ import annotations

from pipeline.methods.registry import Method, lazy, register

TV, SLERP, GTA = "pipeline.methods.task_vectors", "pipeline.methods.slerp", "pipeline.methods.gta"

register(Method("linear", "weighted sum of the deltas (task arithmetic), exact", ("weights", "rank"),
                delta=lazy(TV, "linear"), factors=lazy(TV, "on_factors", None, False),
                core=lazy(TV, "on_cores", None, False), exact=True,
                default_weight="mean"))
register(Method("concat", "the stacked factors of the weighted deltas, exact, rank = sum of ranks",
                ("weights", "rank"), delta=lazy(TV, "concat"), exact=True, default_weight="mean"))
register(Method("slerp", "spherical interpolation of the deltas (barycentric for 3+), exact",
                ("weights", "t", "rank"), delta=lazy(SLERP, "slerp"), factors=lazy(SLERP, "slerp_factors"),
                exact=True, default_weight="mean", min_adapters=2, check=lazy(SLERP, "check"),
                weights_ignored_for=2))
for _name, _summary, _params, _sparsify, _elect in (
    ("ties", "trim by magnitude, elect a sign per entry, mean of the agreeing entries",
     ("weights", "density", "majority_sign_method", "consensus", "rank"), "magnitude", True),
    ("dare_linear", "random drop with rescaling, then the weighted sum",
     ("weights", "density", "seed", "rank"), "random", False),
    ("dare_ties", "random drop with rescaling, then the TIES election",
     ("weights", "density", "majority_sign_method", "consensus", "seed", "rank"), "random", True),
    ("magnitude_prune", "trim by magnitude, then the weighted sum",
     ("weights", "density", "rank"), "magnitude", False),
):
    register(Method(_name, _summary, _params, delta=lazy(TV, "masked", _sparsify, _elect),
                    factors=lazy(TV, "on_factors", _sparsify, _elect),
                    core=lazy(TV, "on_cores", _sparsify, _elect), exact=False))

# --- spectral methods and KnOTS (exact on the stacked factors; no dense matrix) -------------------
SPECTRAL, KNOTS = "pipeline.methods.spectral", "pipeline.methods.knots"

register(Method("tsv", "TSV-Merge: each task's top singular components, singular vectors orthogonalised "
                "(polar factors), exact", ("weights", "rank"), delta=lazy(SPECTRAL, "tsv"), exact=True))
register(Method("iso_c", "Iso-C: the weighted sum with its nonzero spectrum made flat (mean singular "
                "value), exact", ("weights", "rank"), delta=lazy(SPECTRAL, "iso_c"), exact=True))
register(Method("iso_cts", "Iso-CTS: common subspace of the sum plus task-specific residual directions, "
                "orthogonalised, flat spectrum, exact", ("weights", "common_fraction", "rank"),
                delta=lazy(SPECTRAL, "iso_cts"), exact=True))
register(Method("knots", "KnOTS: the deltas in the shared SVD basis of their concatenation, merged there "
                "with inner_method (linear, ties, dare_linear, dare_ties), exact low rank",
                ("weights", "inner_method", "density", "majority_sign_method", "consensus", "seed", "rank"),
                delta=lazy(KNOTS, "knots"), exact=True))

# DELLA and Model Breadcrumbs, as mergekit 0.1.5 defines them (pipeline/methods/gta.py)
for _name, _summary, _params in (
    ("della", "magnitude-ranked random drop per row, L1 rescale, mergekit's TIES election (weighted mean)",
     ("weights", "density", "epsilon", "majority_sign_method", "seed", "rank")),
    ("della_linear", "magnitude-ranked random drop per row, L1 rescale, then the weighted sum",
     ("weights", "density", "epsilon", "seed", "rank")),
    ("breadcrumbs", "drop the smallest entries and the largest outliers, then the weighted sum",
     ("weights", "density", "gamma", "rank")),
    ("breadcrumbs_ties", "breadcrumbs' mask, then mergekit's election; the agreeing entries summed",
     ("weights", "density", "gamma", "majority_sign_method", "rank")),
):
    register(Method(_name, _summary, _params, delta=lazy(GTA, "on_deltas", _name),
                    core=lazy(GTA, "on_cores", _name), exact=False,
                    check=lazy(GTA, "check") if _name.startswith("della") else None))
