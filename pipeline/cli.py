"""The ``fusion`` command line: a thin typer layer over the library.

User mistakes (:class:`pipeline.errors.FusionError`) end as ``error: ...`` lines on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import FusionError, os_error_line
from pipeline.methods.registry import method_help, method_list

# Imports that only some commands need (yaml, rich's progress and tables, the library) sit inside
# the functions that use them, so `fusion --help` and `fusion validate` start quickly.

app = typer.Typer(
    name="fusion",
    help="Fuse LoRA adapters exactly, check them, convert between mlx-lm and PEFT layouts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _Console:
    """A rich Console made on first use: rich costs a twentieth of a second to import, and
    ``fusion fuse`` in a pipe (a pipeline stage, a benchmark) prints two plain lines."""

    def __init__(self, stderr: bool = False):
        self._stderr, self._console = stderr, None

    def rich(self):
        """The rich Console itself."""
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # pipes and CI logs get wide tables instead of rich's 80-column default
            self._console = Console(stderr=self._stderr, width=None if stream.isatty() else 200)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.rich(), name)


out = _Console()
err = _Console(stderr=True)


def escape(text: str) -> str:
    """``text`` with rich markup escaped (square brackets in paths are not markup)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def say(line: str) -> None:
    """One plain line on stdout, without rich (nothing in it is markup)."""
    print(line, flush=True)


# rich's own switches that make a pipe count as a terminal
_FORCE_TERMINAL = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds like KeyboardInterrupt (temporary outputs are removed on the way
    out) but is not caught by typer, which would turn it into a silent exit."""


def _interrupted(signum, frame):
    raise Interrupted(signum)


def print_error(message: str, label: str = "[bold red]error:[/]") -> None:
    """Each line of ``message`` as one ``error:`` line; the text is printed as it is (square
    brackets in paths and values are not markup)."""
    for line in message.splitlines() or ["(no message)"]:
        err.print(f"{label} {escape(line)}", highlight=False, soft_wrap=True)


def main() -> None:
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # clean up temporary outputs on Ctrl-C, kill, timeout
        signal.signal(sig, _interrupted)
    try:
        app()
    except FusionError as e:
        print_error(str(e))
        sys.exit(2)
    except OSError as e:  # a disk that fills up, a file system that goes away, ... while writing
        print_error(os_error_line(e))
        sys.exit(2)
    except Interrupted as e:
        err.print("interrupted", highlight=False)
        sys.exit(128 + e.args[0])


def progress_bar(description: str):
    """A rich progress bar on stderr; returns (Progress, callback(done, total)). Where stderr is not
    a terminal there is no bar to draw: a context that does nothing and no callback."""
    if not sys.stderr.isatty() and not any(os.environ.get(v) for v in _FORCE_TERMINAL):
        from contextlib import nullcontext

        return nullcontext(), None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err.rich(), transient=False, disable=not err.is_terminal)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


# --- option parsing --------------------------------------------------------------------------

def parse_list(text: str | None, what: str):
    """``0.7,0.3`` or ``[0.7, 0.3]`` or ``[[1, 0.5], [0, 0.5]]`` (per-layer lists) or ``0.5``."""
    if text is None:
        return None
    import yaml  # a twentieth of a second: only when there is something to read

    from pipeline.params import yaml_load

    s = text.strip()
    if not s:
        raise FusionError(f"--{what}: empty value (leave the option out for the default)")
    try:
        value = yaml_load(s if s.startswith("[") or "," not in s else f"[{s}]")
    except yaml.YAMLError:
        raise FusionError(f"--{what}: cannot read {text!r} (use 0.7,0.3 or [0.7, 0.3])") from None
    return value


def parse_rules(rules: list[str] | None) -> list[dict]:
    """``--rule 'self_attn: {weights: [0.9, 0.1], density: 0.5}'`` -> [{match, ...}]."""
    if not rules:
        return []
    import yaml

    from pipeline.params import yaml_load

    parsed = []
    for text in rules or []:
        try:
            value = yaml_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, dict) or len(value) != 1 or not isinstance(next(iter(value.values())), dict):
            raise FusionError(f"--rule {text!r}: expected 'MATCH: {{weights: [...], density: ..., t: ...}}'")
        (match, values), = value.items()
        parsed.append({"match": str(match), **values})
    return parsed


def make_spec(n: int, method: str, weights: str | None, density: str | None, majority_sign_method: str,
              t: str | None, rank: int | None, space: str, seed: int, rules: list[str] | None,
              consensus: str = "peft", **scalars):
    """The FusionSpec of the command line's options, checked for ``n`` adapters; ``scalars`` are the
    single-valued method parameters (``common_fraction``, ``inner_method``, ``epsilon``, ``gamma``)."""
    from pipeline.spec import FusionSpec, check_spec

    spec = FusionSpec(method=method, weights=parse_list(weights, "weights"),
                      density=parse_list(density, "density") if density is not None else 1.0,
                      majority_sign_method=majority_sign_method, consensus=consensus,
                      t=parse_list(t, "t") if t is not None else 0.5,
                      rank=rank, space=space, seed=seed, rules=parse_rules(rules), **scalars)
    if isinstance(spec.weights, (int, float)):
        spec.weights = [spec.weights]
    check_spec(spec, n)
    return spec


ADAPTERS = typer.Argument(..., help="Adapter directories (mlx-lm or PEFT layout).", show_default=False)
o_method = typer.Option("linear", "--method", "-m", help=f"Fusion method: {method_list()}.")
o_weights = typer.Option(None, "--weights", "-w", help="One weight per adapter: 0.7,0.3 (negative subtracts); "
                         "a list per adapter interpolates across layers: [[1,0.5],[0,0.5]]. Default: "
                         "1/N for linear, concat, slerp; 1 for the others.")
o_density = typer.Option(None, "--density", "-d", help="Fraction of entries kept by ties, dare_*, "
                         "magnitude_prune, della*, breadcrumbs* (in core space: of a core's entries), in "
                         "(0, 1]; a list interpolates across layers. Default 1.")
o_msm = typer.Option("total", "--majority-sign-method", help="TIES sign election: total or frequency.")
o_consensus = typer.Option("peft", "--consensus", help="TIES convention: peft (elect on the unweighted values, "
                           "divide by the number agreeing) or mergekit (elect on the weighted values, divide "
                           "by the sum of the agreeing weights).")
o_t = typer.Option(None, "--t", help="SLERP position in [0, 1] between two adapters (0 = first). Default 0.5.")
o_rank = typer.Option(None, "--rank", "-r", help="Output rank. Default: exact for linear, concat, slerp, "
                      "tsv, iso_c, iso_cts, knots and in core space; the largest input rank for the masking "
                      "methods in delta space.")
o_space = typer.Option("delta", "--space", help="delta (exact, default), factors (per-tensor average "
                       "of lora_a/lora_b, as simple scripts do; equal ranks only) or core (the element-wise "
                       "methods on R x R cores in the SVD bases of the stacked factors).")
o_common_fraction = typer.Option(0.8, "--common-fraction", help="iso_cts: fraction of the spectrum given to "
                                 "the common subspace, in (0, 1].")
o_inner_method = typer.Option("ties", "--inner-method", help="knots: the merge in the shared basis: linear, "
                              "ties, dare_linear or dare_ties.")
o_epsilon = typer.Option(0.15, "--epsilon", help="della: spread of the keep probabilities around the density.")
o_gamma = typer.Option(0.01, "--gamma", help="breadcrumbs: fraction of the largest entries dropped as outliers.")
o_seed = typer.Option(0, "--seed", help="Seed of DARE's random masks and the randomized SVD.")
o_rule = typer.Option(None, "--rule", help="Per-module override, first match wins: "
                      "'self_attn: {weights: [0.9, 0.1], density: 0.5}'. Repeatable.")
o_ignore_base = typer.Option(False, "--ignore-base", help="Fuse even if the configs name different base models.")
o_base = typer.Option(None, "--base", help="The base model's directory: needed (and read) only for adapters "
                      "whose delta depends on it (DoRA, PEFT modules_to_save).")


# --- commands --------------------------------------------------------------------------------

def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def adapter_table(adapters, title: str, root: Path | None = None):
    from rich.table import Table

    from pipeline.validate import _span, variant_words

    table = Table(title=escape(title))
    variants = [variant_words(a) for a in adapters]
    cols = ("adapter", "layout", "rank", "scale", "layers", "modules", "size", "tensors")
    for col in cols + (("variants",) if any(variants) else ()):  # experts, embeddings, biases
        table.add_column(col, justify="right" if col in ("rank", "scale", "size", "tensors") else "left",
                         overflow="fold")
    for a, v in zip(adapters, variants):
        shown = a.path.relative_to(root) if root is not None and a.path != root else a.path
        table.add_row(escape(str(shown)), a.layout, ",".join(map(str, sorted(a.ranks))),
                      ",".join(f"{s:g}" for s in sorted(a.scales)), _span(a.layers),
                      escape(", ".join(sorted(a.keys))), _human(a.size_bytes), str(a.tensor_count),
                      *((escape(v or "-"),) if any(variants) else ()))
    return table


@app.command("list")
def list_adapters(root: Path = typer.Argument(Path("adapters"), help="A directory of adapters (or one adapter).")):
    """List every adapter under ROOT with its rank, scale, layers, target modules, size and tensor count.

    An adapter that cannot be used is reported as 'skipped: PATH: REASON' on stderr. Exit 0 when at
    least one adapter can be used, 2 when none can.
    """
    from pipeline.formats import is_adapter_dir, read_adapter

    if not root.is_dir():
        raise FusionError(f"{root}: not a directory")
    dirs = [root] if is_adapter_dir(root) else sorted(p for p in root.rglob("*") if is_adapter_dir(p))
    if not dirs:
        raise FusionError(f"{root}: no adapters found (looked for adapters.safetensors, "
                          "best_adapters.safetensors, adapter_model.safetensors)")
    adapters, skipped = [], []
    for d in dirs:
        try:
            adapters.append(read_adapter(d))
        except FusionError as e:
            reason = " ".join(str(e).splitlines())
            skipped.append(reason if reason.startswith(f"{d}{os.sep}") or reason.startswith(f"{d}:")
                           else f"{d}: {reason}")
    if adapters:
        out.print(adapter_table(adapters, f"{len(adapters)} adapter(s) under {root}", root))
    for line in skipped:
        print_error(line, "[yellow]skipped:[/]")
    if not adapters:
        raise typer.Exit(2)


@app.command()
def validate(
    adapters: List[Path] = ADAPTERS,
    method: str = o_method, weights: Optional[str] = o_weights, density: Optional[str] = o_density,
    majority_sign_method: str = o_msm, consensus: str = o_consensus, t: Optional[str] = o_t,
    rank: Optional[int] = o_rank, space: str = o_space, seed: int = o_seed, rule: Optional[List[str]] = o_rule,
    common_fraction: float = o_common_fraction, inner_method: str = o_inner_method, epsilon: float = o_epsilon,
    gamma: float = o_gamma,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="The planned output directory (checked not to be an input)."),
    ignore_base: bool = o_ignore_base, base: Optional[Path] = o_base,
    signals: Optional[Path] = typer.Option(None, "--signals",
                                           help="A report's signals.json (e.g. reports/signals.json): predict "
                                                "this fusion's retention from it."),
):
    """Check that ADAPTERS can be fused (with these settings); print what was found.

    Exit 0 when they can; otherwise one line per problem and exit 2. Reads configs and headers, plus
    one streaming pass for NaN/Inf. With --signals naming a report's signals.json, the fusion is also
    computed (in a temporary directory, nothing kept) and the data-free signal that best predicted
    retention there gives a predicted retention, with the signals' warnings.
    """
    from pipeline.validate import validate as run

    spec = make_spec(len(adapters), method, weights, density, majority_sign_method, t, rank, space, seed, rule,
                     consensus, common_fraction=common_fraction, inner_method=inner_method, epsilon=epsilon,
                     gamma=gamma)
    result = run(adapters, out_dir, ignore_base=ignore_base, space=spec.space, base=base)
    out.print(adapter_table(result.adapters, f"{len(adapters)} adapters can be fused with {spec.method}"))
    for note in result.notes:
        out.print(f"note: {escape(note)}", highlight=False)
    if signals is not None and signals.is_file():
        _predict(adapters, spec, signals, ignore_base)
    out.print("[green]ok[/]")


def _predict(adapters: list[Path], spec, signals: Path, ignore_base: bool) -> None:
    """Fuse in a temporary directory and print the predicted retention and the signals' warnings."""
    import json
    import tempfile

    from pipeline.fuse import fuse as run
    from pipeline.report.evidence import predict, signal_values

    try:
        power = json.loads(signals.read_text())
    except (OSError, ValueError) as e:
        raise FusionError(f"{signals}: not a readable signals.json ({e})") from None
    with tempfile.TemporaryDirectory(prefix="lora-fusion-validate-") as tmp:
        record = run(adapters, Path(tmp) / "fused", spec, ignore_base=ignore_base)
    fit = power.get("fit")
    values = signal_values(record["signals"], record["geometry"])
    if fit and values.get(fit["signal"]) is not None:
        stats = (power.get("signals") or {}).get(fit["signal"], {})
        within = (stats.get("within") or {}).get("spearman")
        rho = (f"Spearman {within:.2f} within source sets" if within is not None
               else f"Spearman {stats.get('spearman', float('nan')):.2f}")
        out.print(f"predicted mean retention {predict(fit, record['signals'], record['geometry']):.3f} "
                  f"(not evaluated: from {fit['signal']} = {values[fit['signal']]:.3f}, the best signal in "
                  f"{signals}, {rho}, fitted over {fit['n']} fusions)", highlight=False)
    else:
        out.print(f"no prediction: {signals} has no fitted signal", highlight=False)
    for w in record["signals"].get("warnings") or []:
        out.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


@app.command(epilog=method_help())
def fuse(
    adapters: List[Path] = ADAPTERS,
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output adapter directory (mlx-lm layout).", show_default=False),
    method: str = o_method, weights: Optional[str] = o_weights, density: Optional[str] = o_density,
    majority_sign_method: str = o_msm, consensus: str = o_consensus, t: Optional[str] = o_t,
    rank: Optional[int] = o_rank, space: str = o_space, seed: int = o_seed, rule: Optional[List[str]] = o_rule,
    common_fraction: float = o_common_fraction, inner_method: str = o_inner_method, epsilon: float = o_epsilon,
    gamma: float = o_gamma,
    ignore_base: bool = o_ignore_base, base: Optional[Path] = o_base,
):
    """Fuse ADAPTERS into one mlx-lm adapter at --out, plus fusion.json (what was done, hashes, errors).

    Load it with: mlx_lm.generate --model BASE --adapter-path OUT
    """
    from pipeline.fuse import fuse as run

    spec = make_spec(len(adapters), method, weights, density, majority_sign_method, t, rank, space, seed, rule,
                     consensus, common_fraction=common_fraction, inner_method=inner_method, epsilon=epsilon,
                     gamma=gamma)
    bar, update = progress_bar(f"fusing {len(adapters)} adapters ({spec.method})")
    with bar:
        record = run(adapters, out_dir, spec, progress=update, ignore_base=ignore_base, base=base)
    o = record["output"]
    for note in record["notes"]:
        say(f"note: {note}")
    say(f"wrote {out_dir}: {o['modules']} modules, rank {o['rank']}, max re-factoring error {o['max_error']:.2e}")


@app.command()
def convert(
    adapter: Path = typer.Argument(..., help="Adapter directory to convert.", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output directory.", show_default=False),
    to: str = typer.Option(..., "--to", help="Target layout: mlx (mlx-lm) or peft.", show_default=False),
):
    """Convert an adapter between the PEFT and mlx-lm layouts (exact; rsLoRA honoured)."""
    from pipeline.writers import convert as run

    result = run(adapter, out_dir, to)
    out.print(f"wrote {out_dir} ({result.layout} layout, {len(result.modules)} modules)", highlight=False)


# --- the regression gate and the weight search -------------------------------------------------

@app.command()
def check(
    baseline: str = typer.Option(..., "--baseline", "-b", show_default=False,
                                 help="Git revision whose committed metrics are the baseline: origin/main, HEAD, a tag."),
    metrics: Path = typer.Option(Path("reports/metrics.json"), "--metrics", help="The workspace metrics file."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="Tolerances and floors: its 'check:' section."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Append a Markdown summary to this file "
                                           "(for example $GITHUB_STEP_SUMMARY)."),
    status: bool = typer.Option(True, "--status/--no-status", help="Require `dvc status` to be clean."),
):
    """Fail when any fusion's scores or retention dropped against BASELINE beyond the tolerances.

    Exit 0 when every fusion is within the tolerances and above the floors of params.yaml's
    'check:' section; 1 with one 'regression:' line per figure that got worse; 2 when the check
    cannot be made: stale pipeline (`dvc status` not clean), baseline without metrics, bad tolerances.
    """
    from rich.table import Table

    from pipeline.check import could_not_run_markdown, gate, to_markdown
    from pipeline.io import append_text
    from pipeline.params import load_params

    try:
        result = gate(baseline, metrics, load_params(params).get("check"), f"{params}: check", status)
    except FusionError as e:
        if summary is not None:
            append_text(summary, could_not_run_markdown(e, baseline))
        raise

    table = Table(title=f"fusion check against {baseline}")
    for col in ("fusion", "mean retention", "worst retention", "status"):
        table.add_column(col, justify="left" if col in ("fusion", "status") else "right")

    def pair(b, c) -> str:
        return f"{'-' if b is None else f'{b:.4f}'} -> {'-' if c is None else f'{c:.4f}'}"

    for r in result.rows:
        state = (f"[red]{r['regressions']} regression(s)[/]" if r["regressions"]
                 else "[yellow]new[/]" if r["new"] else "[green]ok[/]")
        table.add_row(r["fusion"], pair(r["baseline_mean_retention"], r["current_mean_retention"]),
                      pair(r["baseline_worst_retention"], r["current_worst_retention"]), state)
    out.print(table)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)
    if summary is not None:
        append_text(summary, to_markdown(result, baseline))
    if not result.ok:
        for r in result.regressions:
            err.print(f"[bold red]regression:[/] {r}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"[green]ok[/]: {len(result.rows)} fusion(s) within the tolerances of {baseline}", highlight=False)


@app.command()
def search(
    fusion: Optional[str] = typer.Option(None, "--fusion", "-f", help="The fusion to tune (default: search.fusion)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The params file (its 'search:' section)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Evaluations, the start included (default: search.budget)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the search (default: search.seed)."),
    layer_groups: Optional[int] = typer.Option(None, "--layer-groups", help="Weights per adapter across the "
                                               "layers (default: search.layer_groups)."),
    out_dir: Path = typer.Option(Path("reports/search"), "--out", "-o", help="Where best.json, trace.json, "
                                 "trace.png go."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Where evaluations run: local or ray "
                                          "(default: search.backend)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The Ray cluster, host:port "
                                              "(default: search.ray_address; none = a local Ray for the run)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: search.workers; "
                                          "none = the cluster's CPUs)."),
):
    """Search one fusion's weights for the best retention on the validation sets (CMA-ES).

    Each evaluation fuses with candidate weights in memory and scores the sources' valid.jsonl on a
    base model loaded once (per Ray worker with --backend ray); the budget and seed are fixed, so a
    search is repeatable, and gives the same weights on either backend. Prints the
    `dvc exp run -S` setting that uses the best weights. In a DVC project, prefer
    `dvc exp run -S search.enabled=true` (the search stage writes the same files).
    """
    from pipeline.destination import check_destination
    from pipeline.params import load_params, resolve
    from pipeline.plan import EvalSettings
    from pipeline.search import run_search, settings

    raw = load_params(params)
    overrides = {k: v for k, v in (("fusion", fusion), ("budget", budget), ("seed", seed),
                                   ("layer_groups", layer_groups), ("backend", backend),
                                   ("ray_address", ray_address), ("workers", workers)) if v is not None}
    s = settings({**(raw.get("search") or {}), **overrides}, f"{params}: search")
    p = resolve(raw, str(params))
    name = s["fusion"]
    if name is None:
        raise FusionError(f"which fusion? give --fusion NAME or search.fusion in {params}")
    if name not in p.fusions:
        raise FusionError(f"unknown fusion {name!r} (declared: {', '.join(p.fusions)})")
    f = p.fusions[name]
    check_destination(out_dir, [p.adapters[a].path for a in f.adapters], record="best.json", what="search")
    run_search(name, p.base_model, [(a, str(p.adapters[a].path)) for a in f.adapters],
               {a: p.adapters[a].data for a in f.adapters}, f.spec, EvalSettings.of(p.eval, str(params)), s,
               out_dir, log=lambda line: out.print(line, highlight=False))


# --- the studio ------------------------------------------------------------------------------

@app.command()
def studio(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (localhost unless told otherwise)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: a free one)."),
    examples: int = typer.Option(8, "--examples", help="Validation examples per task in the live score."),
):
    """Serve a local web page over the project in the current directory: its fusions, scores and
    experiments, side-by-side generations, and weight sliders that fuse and score live.

    Needs the studio extra: pip install -e '.[studio]'. Prints the URL; stop it with Ctrl-C.
    """
    from pipeline.studio.app import serve

    if port is not None and not 0 < port < 65536:
        raise FusionError(f"--port must be in 1..65535, got {port}")
    serve(".", host, port, examples, on_ready=lambda line: print(line, flush=True))


@app.command()
def signals(files: List[Path] = typer.Argument(..., help="signals.json files of reports (e.g. both demos').",
                                               show_default=False)):
    """How well each data-free signal predicts measured retention, pooled over several reports.

    Every fusion in FILES is one point; prints the Spearman rank correlation of each signal with mean
    retention and the number of fusions that have it, the same inside each set of sources (each
    report's fusions of the same adapters, pooled by size; what picks the best signal), then with
    the random controls added.
    """
    import json

    from rich.table import Table

    from pipeline.report.evidence import MIN_RHO, predictive_power

    points = []
    for i, f in enumerate(files):
        try:
            points += [{**p, "report": i} for p in json.loads(f.read_text())["points"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FusionError(f"{f}: not a report's signals.json ({e})") from None
    power = predictive_power(points)
    table = Table(title=f"{len(points)} fusions and random controls from {len(files)} report(s)")
    for col in ("signal", "Spearman", "n", "within source sets", "n (sets)", "with controls", "n", "what it is"):
        table.add_column(col)

    def rho(x):
        return "–" if x is None else f"{x:.3f}"

    for name, s in power["signals"].items():
        c, w = s["with_controls"], s["within"]
        table.add_row(name, rho(s["spearman"]), str(s["n"]), rho(w["spearman"]), f"{w['n']} ({w['groups']})",
                      rho(c["spearman"]), str(c["n"]), s["description"])
    out.print(table)
    if power["best"]:
        out.print(f"best: {power['best']}", highlight=False)
    else:
        out.print(f"best: none (no signal reaches a rank correlation of {MIN_RHO} with retention within the "
                  "sets of sources: no prediction)", highlight=False)


if __name__ == "__main__":
    main()
