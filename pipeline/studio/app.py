"""The studio page (Gradio): a thin layer over :mod:`pipeline.studio`'s library.

Three tabs: *Reports* (fusions, baselines and DVC experiments as sortable tables; pick fusions to
compare side by side with the report's figures), *Generate* (one prompt answered by the base, each
adapter and a fusion, streaming) and *Try settings* (weight sliders, method, density and t for a
fusion, fused and scored live; "save as experiment" runs the DVC experiment of those settings).
Every control sends names (of fusions, adapters, methods) or numbers; the library checks them.
"""

from __future__ import annotations

import io
import socket

from pipeline.errors import FusionError
from pipeline.methods.registry import METHODS
from pipeline.studio.generate import MAX_TOKENS, MLX, Models, labels, on_mlx_thread, stream_answers
from pipeline.studio.live import (WEIGHT_RANGE, LiveScorer, LiveSettings, initial_settings, save_experiment)
from pipeline.studio.project import (Project, baseline_rows, compare_figures, compare_rows, experiment_rows,
                                     fusion_rows)

CSS = ".studio-note {color: #666; font-size: 0.9em}"


def _import_gradio():
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # nothing leaves the machine
    try:
        import gradio as gr
    except ImportError:
        raise FusionError("fusion studio needs Gradio: pip install -e '.[studio]' (or make studio)") from None
    return gr


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows) if rows else pd.DataFrame({"": []})


def _image(png: bytes | None):
    if not png:
        return None
    from PIL import Image

    return Image.open(io.BytesIO(png))


def score_text(result: dict) -> str:
    """The live score as one Markdown line."""
    def f(x):
        return "-" if x is None else f"{x:.4f}"

    s = result["settings"]
    return (f"**{s.fusion}** ({s.method}, weights {list(s.weights)}): mean retention "
            f"**{f(result['mean_retention'])}**, worst **{f(result['worst_retention'])}** "
            f"on {result['examples']} validation examples per task, fused and scored in {result['seconds']:.2f} s")


def score_rows(result: dict) -> list[dict]:
    return [{"task": t, "retention": _r(x["retention"]), "accuracy": _r(x["accuracy"]), "loss": _r(x["loss"]),
             "source accuracy": _r(x["source_accuracy"])} for t, x in result["tasks"].items()]


def _r(x):
    return None if x is None else round(float(x), 4)


def build(project: Project, examples: int = 8):
    """The page (a ``gr.Blocks``) over ``project``; nothing is computed until a control asks."""
    gr = _import_gradio()
    scorer = LiveScorer(project, examples)
    models = Models(project)
    fusions = project.fusions
    most = max(len(project.fusion(n).adapters) for n in fusions)

    def guarded(fn):
        def run(*args):
            try:
                return fn(*args)
            except FusionError as e:
                raise gr.Error(str(e)) from None
        return run

    def experiments_frame():
        try:
            return _frame(project.experiments()), ""
        except FusionError as e:
            return _frame([]), f"experiments: {e}"

    report = project.report()

    with gr.Blocks(title="fusion studio", analytics_enabled=False) as page:
        gr.Markdown(f"# fusion studio\n`{project.root}`: base model `{project.params.base_model}`, "
                    f"{len(project.adapters)} adapters, {len(fusions)} fusions")
        with gr.Tab("Reports"):
            if not report:
                gr.Markdown("No committed reports yet: run `dvc repro` first.")
            gr.Markdown("## Fusions (from reports/)")
            gr.Dataframe(_frame(fusion_rows(report)), interactive=False, elem_id="fusions-table",
                         show_search="filter")
            gr.Markdown("## Baselines: the base model and each adapter alone")
            gr.Dataframe(_frame(baseline_rows(report)), interactive=False, elem_id="baselines-table")
            gr.Markdown("## Compare")
            chosen = gr.CheckboxGroup(list((report.get("fusions") or {})), label="fusions to compare",
                                      elem_id="compare-choice")
            compared = gr.Dataframe(_frame([]), interactive=False, elem_id="compare-table")
            retention_img = gr.Image(label="retention", type="pil", interactive=False, elem_id="compare-retention",
                                     buttons=["download", "fullscreen"])
            scores_img = gr.Image(label="scores", type="pil", interactive=False, elem_id="compare-scores",
                                  buttons=["download", "fullscreen"])
            gr.Markdown("## DVC experiments (`dvc exp show`)")
            exp_table = gr.Dataframe(_frame([]), interactive=False, elem_id="experiments-table")
            exp_note = gr.Markdown(elem_classes="studio-note")
            refresh = gr.Button("refresh experiments", size="sm")

        def compare(names):
            if not names:
                return _frame([]), None, None
            figs = compare_figures(report, names)
            return _frame(compare_rows(report, names)), _image(figs.get("retention")), _image(figs.get("scores"))

        chosen.change(guarded(compare), chosen, [compared, retention_img, scores_img], api_name="compare")
        refresh.click(experiments_frame, None, [exp_table, exp_note], api_name="experiments")
        page.load(experiments_frame, None, [exp_table, exp_note], api_visibility="private")

        with gr.Tab("Generate"):
            with gr.Row():
                prompt = gr.Textbox(label="prompt", value=(project.params.prompts or [""])[0], scale=4,
                                    elem_id="gen-prompt")
                gen_fusion = gr.Dropdown(fusions, value=fusions[0], label="fusion", elem_id="gen-fusion-choice")
                max_tokens = gr.Slider(1, MAX_TOKENS, value=max(32, project.params.eval["max_tokens"]), step=1,
                                       label="max tokens")
            go = gr.Button("generate", variant="primary", elem_id="gen-go")
            with gr.Row():
                boxes = [gr.Textbox(label=label if label != "fusion" else f"fusion {fusions[0]}", lines=4,
                                    interactive=False, elem_id="gen-" + label.replace(" ", "-"))
                         for label in labels(project)]
            gen_status = gr.Markdown(elem_id="gen-status", elem_classes="studio-note")

        def generate(text, fusion, n):
            import time

            start = time.perf_counter()
            texts = [""] * len(boxes)
            try:
                for texts in stream_answers(models, text, fusion, int(n)):
                    yield [*texts, "generating..."]
            except FusionError as e:
                raise gr.Error(str(e)) from None
            yield [*texts, f"done in {time.perf_counter() - start:.1f} s (greedy, stops at EOS or after "
                           f"{int(n)} tokens; an empty box: the model ended at once)"]

        go.click(generate, [prompt, gen_fusion, max_tokens], [*boxes, gen_status], api_name="generate")
        gen_fusion.change(lambda n: gr.update(label=f"fusion {n}"), gen_fusion, boxes[-1], api_visibility="private")

        with gr.Tab("Try settings"):
            with gr.Row():
                live_fusion = gr.Dropdown(fusions, value=fusions[0], label="fusion", elem_id="live-fusion")
                method = gr.Dropdown(list(METHODS), value=project.fusion(fusions[0]).spec.method, label="method",
                                     elem_id="live-method")
            start = initial_settings(project, fusions[0])
            sliders = []
            with gr.Row():
                for i in range(most):
                    names = project.fusion(fusions[0]).adapters
                    sliders.append(gr.Slider(*WEIGHT_RANGE, step=0.05, value=start.weights[i] if i < len(names) else 0,
                                             label=f"weight of {names[i]}" if i < len(names) else f"weight {i + 1}",
                                             visible=i < len(names), elem_id=f"live-weight-{i}"))
            with gr.Row():
                density = gr.Slider(0.05, 1.0, step=0.05, value=start.density, label="density (ties, dare, prune)",
                                    elem_id="live-density")
                t = gr.Slider(0.0, 1.0, step=0.05, value=start.t, label="t (slerp)", elem_id="live-t")
            live_score = gr.Markdown("move a slider to fuse and score", elem_id="live-score")
            live_table = gr.Dataframe(_frame([]), interactive=False, elem_id="live-table")
            with gr.Row():
                save = gr.Button("save as experiment", variant="primary", elem_id="save-exp")
                save_note = gr.Markdown(elem_id="save-status")

        def settings_of(fusion, m, *values):
            n = len(project.fusion(fusion).adapters)
            w, d, tt = values[:most], values[most], values[most + 1]
            return LiveSettings(fusion, m, tuple(float(x) for x in w[:n]), float(d), float(tt))

        def score(*values):
            result = on_mlx_thread(scorer.score, settings_of(*values))
            return score_text(result), _frame(score_rows(result))

        def pick(fusion):
            s = initial_settings(project, fusion)
            names = project.fusion(fusion).adapters
            ups = [gr.update(value=s.weights[i], label=f"weight of {names[i]}", visible=True) if i < len(names)
                   else gr.update(visible=False) for i in range(most)]
            return [gr.update(value=s.method), *ups, s.density, s.t]

        def save_as(*values):
            done = save_experiment(project, settings_of(*values))
            frame, note = experiments_frame()
            return f"saved: `dvc {' '.join(done['args'][1:])}`", frame, note

        controls = [live_fusion, method, *sliders, density, t]
        live_fusion.input(guarded(pick), live_fusion, [method, *sliders, density, t], api_visibility="private").then(
            guarded(score), controls, [live_score, live_table], api_visibility="private")
        method.input(guarded(score), controls, [live_score, live_table], api_name="score")
        for s in [*sliders, density, t]:
            s.release(guarded(score), controls, [live_score, live_table], api_visibility="private")
        save.click(guarded(save_as), controls, [save_note, exp_table, exp_note], api_name="save_experiment")
    page.studio_models = models
    return page


def free_port(host: str) -> int:
    """A port nobody listens on at ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(root=".", host: str = "127.0.0.1", port: int | None = None, examples: int = 8,
          on_ready=print) -> None:
    """Serve the studio of the project in ``root`` at ``http://HOST:PORT/`` until interrupted."""
    project = Project.open(root)
    page = build(project, examples)
    port = port or free_port(host)
    page.queue(default_concurrency_limit=1)
    MLX.start()
    page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                footer_links=[], css=CSS, show_error=True)
    shown = f"[{host}]" if ":" in host else host
    on_ready(f"fusion studio: http://{shown}:{port}/")
    try:
        MLX.serve()  # the page's model work, on this main thread, until interrupted
    finally:
        page.close()
        page.studio_models.close()
