"""The ``bench`` command line (typer)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import Interrupted, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compare adaptive vision transformers (ATS, A-ViT, AdaViT) with the dense ViT: accuracy, "
    "per-sample GMACs, latency, throughput and memory.",
)
console = Console()
err = Console(stderr=True)

def _print_version(value: bool) -> None:
    if value:
        console.print(f"bench {_bench_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print bench's version and exit."),
) -> None:
    # a callback only so that `bench --version` exists; every command is a subcommand
    pass


METHODS_HELP = "Methods: 'all' or a comma list of ids (`bench list methods`); the dense 'deit' is always included."
# What chooses the models and data, shared by `bench run` and `bench flops`.
METHODS_OPTION = typer.Option(None, "--methods", "-m", help=METHODS_HELP)
PROFILE_OPTION = typer.Option(None, "--profile", "-p", help="Profile in bench.toml (`bench list profiles`; default: default).")
DATASET_OPTION = typer.Option(None, "--dataset", help="Data set id (`bench list datasets`).")
DATA_OPTION = typer.Option(None, "--data", help="Path to the data set on disk (not for the embedded 'digits').")
BACKBONE_OPTION = typer.Option(None, "--backbone", "--model", help="timm VisionTransformer name, or digits_vit (--model: timm's spelling).")
CHECKPOINT_OPTION = typer.Option(None, "--checkpoint", help="Backbone weights (.pth/.safetensors), or 'random'.")
BUDGETS_OPTION = typer.Option(None, "--budgets", help="Per-method budgets, e.g. 'ats=0.5,0.75;avit=20,30'.")


def _reporter(quiet: bool):
    from .progress import Reporter

    return Reporter(console=err, quiet=quiet)


@app.command()
def run(
    methods_: Optional[str] = METHODS_OPTION,
    profile: Optional[str] = PROFILE_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    data: Optional[str] = DATA_OPTION,
    backbone: Optional[str] = BACKBONE_OPTION,
    checkpoint: Optional[str] = CHECKPOINT_OPTION,
    budgets: Optional[str] = BUDGETS_OPTION,
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (comma list for several)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", "--batch-size", "-b", help="Comma list of batch sizes to time, e.g. 1,32 (--batch-size, -b: timm's spelling)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (autocast); comma list for several."),
    amp: bool = typer.Option(False, "--amp", help="timm's spelling of --precision fp16 (float16 autocast)."),
    channels_last: bool = typer.Option(False, "--channels-last", hidden=True),
    out: Optional[str] = typer.Option(None, "--out", help="Results root folder (a run goes to OUT/<run-id>)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Finish an interrupted run: its id, path, or nothing for the latest."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed (timing sample choice, anything random at evaluation)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the backbone (and fine-tuned methods) even if cached or shipped."),
    config: Optional[Path] = typer.Option(None, "--config", help="bench.toml to read (default: ./bench.toml, then the project's)."),
    reports: str = typer.Option("reports", "--reports", help="Folder for the report written at the end."),
    write_report: bool = typer.Option(True, "--report/--no-report", help="Write the report at the end (`bench report RUN` writes it later)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="Count and report unreadable images or videos (listed in the manifest) instead of stopping."),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="Eval transform: centre-crop share (default: the backbone's timm config)."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="Eval transform: resize interpolation (bicubic, bilinear, ...)."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Spread cells over devices, one process each, e.g. cuda:0,cuda:1."),
    compile_: bool = typer.Option(False, "--compile", "--torchcompile", help="torch.compile the models before measuring (--torchcompile: timm's spelling)."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Attention kernel: default, unfused, fused, flash, efficient, cudnn, math."),
) -> None:
    """Benchmark methods x budgets x devices x precisions x batch sizes and write results and a report."""
    from . import budgets as budgets_mod
    from . import config as config_mod
    from . import runner
    from .store import ensure_writable

    precision = _amp_precision(amp, precision)
    if channels_last:
        raise UsageError("--channels-last has no bench equivalent: a ViT's tokens have no channels-last layout, and the "
                         "digits backbone's conv stem is channels-last already; drop the flag")
    flags = dict(methods=methods_, dataset=dataset, data=data, backbone=backbone, checkpoint=checkpoint,
                 device=device, batch_sizes=batch_sizes, precision=precision, out=out, seed=seed, threads=threads,
                 retrain=retrain or None, skip_corrupt=skip_corrupt or None, devices=devices, compile=compile_ or None,
                 attention=attention)
    transform = {k: v for k, v in (("crop_pct", crop_pct), ("interpolation", interpolation)) if v is not None}
    if transform:
        flags["transform"] = transform
    if budgets is not None:
        flags["budgets"] = budgets_mod.parse_cli(budgets)
    if batch_sizes:
        flags["batch_sizes"] = _batch_sizes(batch_sizes)
    if resume:
        _refuse_settings_on_resume({**flags, "profile": profile, "config": config})
    cfg = config_mod.resolve(profile or "default", config, **flags)
    if write_report:
        ensure_writable(Path(reports), "--reports", "reports folder")  # before the run, not after it
    reporter = _reporter(quiet)
    if cfg.variants and not resume:
        return _study(cfg, reporter, Path(reports))
    try:
        result = runner.execute(cfg, reporter, resume=resume, argv=sys.argv)
    except KeyboardInterrupt:
        raise Interrupted("cells finished so far are saved; finish with `bench run --resume`") from None
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return
    try:
        _finish(result, Path(reports), write_report)
    except KeyboardInterrupt:
        raise Interrupted(f"run {result.path} is complete; its report was not finished: "
                          f"`bench report {result.id} --results {result.path.parent}` writes it") from None


def _study(cfg, reporter, reports: Path) -> None:
    """A profile with ``variants``: one run per variant, one study report (bench/study.py)."""
    from . import study

    try:
        folder, runs = study.run_study(cfg, reporter, reports)
    except KeyboardInterrupt:
        raise Interrupted("finished variants are saved and their weights cached; rerun the study to finish it") from None
    console.print(study.study_rows(runs).to_markdown(index=False, floatfmt=".4g"), markup=False)
    for run in runs:
        console.print(f"results: {run.path}", markup=False)
    console.print(f"study:   {folder / 'study.md'}", markup=False)


def _finish(result, reports: Path, write_report: bool = True) -> None:
    """The tables of a finished run, and its report."""
    from . import report as report_mod

    records = result.records()
    _verdict(result)
    _summary(records, result)
    _paper_table(records, result)
    skipped = result.manifest().get("dataset", {}).get("skipped_corrupt")
    if skipped:
        err.print(f"[yellow]skipped {skipped} unreadable image(s) (--skip-corrupt); listed in {escape(str(result.path / 'manifest.json'))}")
    console.print(f"results: {result.path}", markup=False)
    if write_report:
        report_folder = report_mod.write([result], Path(reports), flag="--reports")
        console.print(f"report:  {report_folder / 'leaderboard.md'}", markup=False)


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes '{text}' must be a comma list of integers, e.g. 1,32") from None


def _refuse_settings_on_resume(settings: dict) -> None:
    """A resumed run keeps the configuration in its manifest: a setting given now would be ignored."""
    given = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v is not None and k not in ("retrain", "out", "skip_corrupt")]
    if given:
        raise UsageError(f"--resume finishes a run with its own configuration; drop {', '.join(given)}")


def _amp_precision(amp: bool, precision: str | None) -> str | None:
    """timm's ``--amp`` is float16 autocast, which is bench's ``--precision fp16``."""
    if not amp:
        return precision
    if precision not in (None, "fp16"):
        raise UsageError(f"--amp means --precision fp16 but --precision {precision} was also given; pass one of them")
    return "fp16"


def _summary(records: list[dict], run) -> None:
    """One line per model configuration; batch sizes side by side as img/s and speedup over dense."""
    if not records:
        return
    import pandas as pd

    df = pd.DataFrame(records)
    batch_sizes = sorted(df["batch_size"].unique())
    varying = [k for k in ("mode", "device", "precision") if df[k].nunique() > 1]
    fixed = ", ".join(f"{df[k].iloc[0]}" for k in ("device", "precision") if k not in varying)
    table = Table(title=f"run {run.id} ({fixed})" if fixed else f"run {run.id}")
    for col in ["method", "budget", *varying]:
        table.add_column(col, overflow="fold")  # a long budget wraps, never cut to `blocks:…`
    for col in ("top-1 % [95% CI]", "GMACs", "ratio"):
        table.add_column(col, justify="right")
    for bs in batch_sizes:
        table.add_column(f"bs{bs} img/s (speedup)", justify="right")
    if 1 in batch_sizes:
        table.add_column("bs1 p90 ms", justify="right")
    for _, g in df.groupby(["method", "budget", "mode", "device", "precision"], sort=False):
        r = g.iloc[0]
        row = [r["method"], str(r["budget"]), *[str(r[k]) for k in varying],
               f"{r['top1']:.1f} [{r['top1_ci_low']:.1f}, {r['top1_ci_high']:.1f}]", f"{r['gmacs']:.4f}", f"{r['gmacs_ratio']:.2f}"]
        for bs in batch_sizes:
            hit = g[g["batch_size"] == bs]
            row.append(f"{hit['img_per_s'].iloc[0]:.4g} ({hit['speedup'].iloc[0]:.2f}x)" if len(hit) else "-")
        if 1 in batch_sizes:
            hit = g[g["batch_size"] == 1]
            row.append(f"{hit['latency_ms_p90'].iloc[0]:.2f}" if len(hit) else "-")
        table.add_row(*row)
    _print_table(table)


def _print_table(table: Table) -> None:
    """A rich table on a terminal; in a log one plain line per row (no wrapping at 80 columns)."""
    if console.is_terminal:
        console.print(table)
        return
    console.print(str(table.title), markup=False, highlight=False, soft_wrap=True)
    for cells in [[c.header for c in table.columns], *zip(*(c.cells for c in table.columns))]:
        console.print(" | ".join(str(c) for c in cells), markup=False, highlight=False, soft_wrap=True)


def _verdict(run) -> None:
    """The answer first: each method at each matched compute point (bench/verdict.py)."""
    from . import verdict

    table, records = verdict.of_run(run)
    if table.empty:
        return
    out = Table(title=f"verdict at matched compute: {verdict.header(records)}")
    for col in verdict.columns(table):
        out.add_column(col, justify="left" if col in ("method", "budget", "") else "right")
    for row in verdict.cells(table):
        out.add_row(*row)
    console.print(out)


def _paper_table(records: list[dict], run) -> None:
    """ImageNet runs: the paper's number (docs/methods/README.md#papers-numbers) beside ours, per method and budget."""
    from .paper import beside

    rows = beside(records)
    if not rows:
        return
    table = Table(title="paper (docs/methods/README.md#papers-numbers) vs this run")
    for col in ("method", "budget", "top-1 ours", "top-1 paper", "GMACs ours", "GMACs paper", "paper setting"):
        table.add_column(col, justify="right" if col.startswith(("top", "GMACs")) else "left")
    for r in rows:
        table.add_row(r["method"], r["budget"], f"{r['top1']:.2f}", f"{r['paper_top1']:.2f}", f"{r['gmacs']:.3f}",
                      f"{r['paper_gmacs']:.1f}", r["paper_setting"])
    console.print(table)


@app.command()
def report(
    runs: Optional[list[str]] = typer.Argument(None, help="Run ids or paths (default: the latest run)."),
    results: str = typer.Option("results", "--results", help="Results root to look runs up in."),
    out: str = typer.Option("reports", "--out", help="Reports root folder."),
) -> None:
    """Write the leaderboard (Markdown, CSV, a self-contained HTML page) and plots of one or more runs under reports/."""
    from . import report as report_mod
    from .store import Run

    chosen = [Run.find(Path(results), r) for r in (runs or ["latest"])]
    folder = report_mod.write(chosen, Path(out))
    console.print(f"report: {folder / 'leaderboard.md'}", markup=False)
    console.print(f"csv:    {folder / 'leaderboard.csv'}", markup=False)
    console.print(f"html:   {folder / 'report.html'}", markup=False)


@app.command()
def compare(
    baseline: str = typer.Argument(..., help="Baseline: run id or path, a baseline folder, or a profile name under RESULTS/baselines/."),
    current: str = typer.Argument("latest", help="Current run: id, path or 'latest'."),
    results: str = typer.Option("results", "--results", help="Results root to look runs (and baselines/) up in."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Gates that fail: comma list of accuracy, gmacs, speed, missing, stale (improvements: the baseline is out of date), or all / none. Default: \\[compare] in bench.toml."),
    tolerance: Optional[list[str]] = typer.Option(None, "--tolerance", help="Override thresholds: accuracy=POINTS, gmacs=REL, speed=REL (e.g. 'speed=40%,gmacs=0.01'); repeatable."),
    show_all: bool = typer.Option(False, "--all", help="List every matched cell, not only the changed ones."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the comparison as Markdown (e.g. a PR summary)."),
    config: Optional[Path] = typer.Option(None, "--config", help="bench.toml with the \\[compare] thresholds."),
) -> None:
    """Match cells of two runs and gate regressions: accuracy (points, CI-aware), gmacs (relative), speedup over dense. Exit 1 on a regression."""
    from . import compare as compare_mod
    from . import config as config_mod

    data, _ = config_mod.load_file(config)
    th = compare_mod.thresholds(data.get("compare", {}), tolerance, fail_on)
    base, cur = compare_mod.find(baseline, Path(results)), compare_mod.find(current, Path(results))
    cmp = compare_mod.compare(base, cur, th)
    table = Table(title=f"bench compare {base.path} -> {cur.path}")
    for h in compare_mod.HEADERS:
        table.add_column(h)
    for row in compare_mod.table_rows(cmp, show_all):
        table.add_row(*row)
    if table.row_count:
        console.print(table)
    for note in cmp.notes:
        console.print(f"note: {note}", markup=False)
    console.print(compare_mod.summary(cmp), markup=False)
    if markdown:
        _write_markdown(markdown, compare_mod.markdown(cmp, show_all))
    failures = cmp.failures()
    if failures:
        err.print(f"[bold red]regression:[/] {', '.join(f'{g}: {n} cell(s)' for g, n in failures.items())} "
                  f"(gates failing: {', '.join(th.fail_on)}; thresholds: --tolerance, \\[compare] in bench.toml)", soft_wrap=True)
        raise typer.Exit(1)
    console.print("no regression")


def _write_markdown(path: Path, text: str) -> None:
    from .store import atomic_write

    try:
        atomic_write(path, text.encode())
    except OSError as e:
        raise UsageError(f"--markdown {path} cannot be written ({e.strerror or e}); pass a writable path") from None


@app.command()
def flops(
    methods_: Optional[str] = METHODS_OPTION,
    profile: Optional[str] = PROFILE_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    data: Optional[str] = DATA_OPTION,
    backbone: Optional[str] = BACKBONE_OPTION,
    checkpoint: Optional[str] = CHECKPOINT_OPTION,
    budgets: Optional[str] = BUDGETS_OPTION,
    samples: Optional[str] = typer.Option("4", "--samples", help="Test samples each counter counts alone; 'all': the papers' conventions averaged over the whole test list (with --counters paper)."),
    counters: Optional[str] = typer.Option("all", "--counters", help="Comma list of fvcore, ptflops, paper (the papers' own conventions), or all; the closed form is always shown."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the test samples chosen."),
    out: str = typer.Option("reports/flops", "--out", help="Folder for flops.md and flops.csv."),
    run_ref: Optional[str] = typer.Option(None, "--run", help="Count a finished run's own configuration and add the table to its report (`bench report RUN`)."),
    results_root: str = typer.Option("results", "--results", help="Results root to look --run up in."),
    config: Optional[Path] = typer.Option(None, "--config", help="bench.toml to read."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """GMACs per sample as every counter counts them: closed form, fvcore, ptflops, the papers' conventions (docs/counting.md#every-counter)."""
    from . import budgets as budgets_mod
    from . import config as config_mod
    from . import flops as flops_mod
    from .store import Run, atomic_write, ensure_writable

    chosen = flops_mod.parse_counters(counters)
    flops_mod.check_counters_installed(chosen)
    count = _sample_count(samples, chosen)
    flags = dict(methods=methods_, dataset=dataset, data=data, backbone=backbone, checkpoint=checkpoint, seed=seed)
    if budgets is not None:
        flags["budgets"] = budgets_mod.parse_cli(budgets)
    run_ = Run.find(Path(results_root), run_ref) if run_ref else None
    if run_ is not None:
        _refuse_settings_with_run({**flags, "profile": profile, "config": config})
        cfg = config_mod.RunConfig.from_dict(run_.manifest()["config"])
    else:
        cfg = config_mod.resolve(profile or "default", config, **flags)
    cfg.devices = ["cpu"]  # the counters trace on the CPU
    ensure_writable(Path(out), "--out", "flops folder")
    results, about = flops_mod.measure(cfg, count, chosen, _reporter(quiet))
    if run_ is not None:
        flops_mod.save_section(run_.path, results, {**about, "run": run_.id})
    table = Table(title=f"GMACs per sample, {about['backbone']} on {about['dataset']} ({about['samples']} samples alone; conventions on {about['convention_samples']})")
    for h in flops_mod.HEADERS:  # the counts never wrap or shorten: their last digits are the point
        text = h in ("method", "budget", "papers' conventions")
        table.add_column(h, justify="left" if text else "right", no_wrap=not text, overflow="fold")
    for row in flops_mod.table_rows(results):
        table.add_row(*row)
    console.print(table)
    import pandas as pd

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "flops.md", flops_mod.markdown(results, about).encode())
    atomic_write(folder / "flops.csv", pd.DataFrame(flops_mod.csv_rows(results)).to_csv(index=False).encode())
    console.print(f"flops: {folder / 'flops.md'}", markup=False)
    if run_ is not None:
        console.print(f"run {run_.id}: its report shows this table from the next `bench report {run_.id}`", markup=False)


def _refuse_settings_with_run(settings: dict) -> None:
    """--run counts the run's own configuration: a model or data setting given too would be ignored."""
    given = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v is not None]
    if given:
        raise UsageError(f"--run counts the run's own configuration; drop {', '.join(given)}")


def _sample_count(text: str | None, counters: tuple[str, ...]) -> int | None:
    """--samples: a positive count, or 'all' (None) for the conventions alone."""
    if text == "all":
        if counters != ("paper",):
            raise UsageError("--samples all averages the papers' conventions over the whole test list; pass --counters paper with it "
                             "(fvcore and ptflops count a handful of samples, each alone)")
        return None
    try:
        value = int(text or "")
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--samples '{text}' must be a positive integer or 'all'")
    return value


baseline_app = typer.Typer(no_args_is_help=True, help="Baselines that `bench compare` gates against (RESULTS/baselines/<profile>/).")
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("update")
def baseline_update(
    run_ref: str = typer.Argument("latest", metavar="RUN", help="Complete run to make the baseline of its profile: id, path or 'latest'."),
    results: str = typer.Option("results", "--results", help="Results root to look the run up in."),
    to: Optional[str] = typer.Option(None, "--to", help="Baselines root (default: RESULTS/baselines)."),
) -> None:
    """Deliberately replace the baseline of the run's profile with this run (commit the folder afterwards)."""
    from . import compare as compare_mod
    from .store import Run

    run_ = Run.find(Path(results), run_ref)
    dest, previous = compare_mod.update_baseline(run_, Path(to) if to else Path(results) / compare_mod.BASELINES)
    console.print(f"baseline: {dest} <- run {run_.id}" + (f" (replaced run {previous})" if previous else " (new)"), markup=False)


LIST_WHAT = ("methods", "datasets", "profiles", "budgets")


@app.command("list")
def list_(
    what: Optional[str] = typer.Argument(None, help=f"One of {', '.join(LIST_WHAT)} (default: all)."),
    profile: str = typer.Option("default", "--profile", "-p", help="Profile whose budgets to show."),
    config: Optional[Path] = typer.Option(None, "--config", help="bench.toml to read."),
) -> None:
    """List methods, data sets, profiles and budgets."""
    import methods as methods_pkg

    from . import budgets as budgets_mod
    from . import config as config_mod
    from . import datasets

    if what is not None and what not in LIST_WHAT:
        raise UsageError(f"cannot list '{what}'; choose one of {', '.join(LIST_WHAT)}")
    if what in (None, "methods"):
        t = Table(title="methods")
        for c in ("id", "arXiv", "paper", "modes", "knobs (primary first)"):
            t.add_column(c)
        for s in methods_pkg.available():
            knobs = sorted(s.knobs, key=lambda k: k.name != s.primary_knob)
            t.add_row(s.id, s.arxiv, s.paper, ", ".join(s.modes), ", ".join(f"{k.name}={k.default!r}" for k in knobs) or "-")
        console.print(t)
    if what in (None, "datasets"):
        t = Table(title="data sets")
        t.add_column("id")
        t.add_column("what")
        for k, (desc, *_rest) in datasets.DATASETS.items():
            t.add_row(k, desc)
        console.print(t)
    if what in (None, "profiles", "budgets"):
        data, path = config_mod.load_file(config)
    if what in (None, "profiles"):
        t = Table(title=f"profiles ({path})")
        for c in ("profile", "description", "data set", "backbone", "batch sizes"):
            t.add_column(c)
        for name in data["profiles"]:
            p = config_mod.profile(data, path, name)
            t.add_row(name, p.get("description", ""), p.get("dataset", "digits"), p.get("backbone", "digits_vit"),
                      ",".join(str(b) for b in p.get("batch_sizes", [1, 32])))
        console.print(t)
    if what in (None, "budgets"):
        p = config_mod.profile(data, path, profile)
        t = Table(title=f"budgets of profile '{profile}'")
        t.add_column("method")
        t.add_column("budgets")
        t.add_column("knobs")
        for s in methods_pkg.available():
            bl = budgets_mod.for_method(s.id, {k: list(v) for k, v in p.get("budgets", {}).items()})
            t.add_row(s.id, ", ".join(budgets_mod.label(b) for b in bl), "; ".join(budgets_mod.describe(s.id, b) for b in bl))
        console.print(t)


@app.command()
def train(
    target: str = typer.Argument("backbone", help="'backbone', or a method id that needs fine-tuning."),
    profile: str = typer.Option("default", "--profile", "-p", help="Profile in bench.toml."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Budget whose training knobs to fine-tune for."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "--model", help="The profile's backbone, or one of the digits ViT variants (docs/avit_study.md)."),
    ship: bool = typer.Option(False, "--ship", help="Write into bench/assets (checkpoints shipped with the project)."),
    config: Optional[Path] = typer.Option(None, "--config", help="bench.toml to read."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train the embedded-default backbone (or fine-tune a method) and cache the checkpoint."""
    import methods as methods_pkg

    from . import budgets as budgets_mod
    from . import cache, runner
    from . import config as config_mod

    cfg = config_mod.resolve(profile, config, retrain=True, backbone=backbone)
    config_mod.check_values(cfg)
    reporter = _reporter(quiet)
    from . import datasets

    if not datasets.is_embedded(cfg):
        raise UsageError("bench train works on the embedded defaults (dataset digits with digits_vit or a variant of it, "
                         "digits_video with digits_video_vit)")
    vit = runner.create_backbone(cfg)
    if target == "backbone":
        key = cache.config_key(runner.backbone_key(cfg))
        path = runner.train_backbone(cfg, vit, key, reporter, folder=cache.ASSETS if ship else None)
    else:
        spec = methods_pkg.get(target) if target in [s.id for s in methods_pkg.available()] else None
        if spec is None:
            raise UsageError(f"unknown training target '{target}'; use 'backbone' or a method id (`bench list methods`)")
        if spec.train is None:
            raise UsageError(f"method '{target}' has no training (it is training-free)")
        cfg.retrain = False
        vit, info = runner.prepare_backbone(cfg, vit, reporter)
        cfg.retrain = True
        knobs = budgets_mod.parse(target, budget) if budget else {}
        runner.method_weights(cfg, spec, vit, knobs, info, reporter)
        return
    console.print(f"checkpoint: {path}", markup=False)
    console.print(f"sha256:     {cache.file_sha256(path)}", markup=False)


def _normalise_argv(argv: list[str]) -> list[str]:
    """``--resume`` with no value means the latest run."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "latest")
            break
    return out


def main() -> None:
    # Signals first, so that Ctrl-C or SIGTERM while torch is still being imported ends as cleanly as later.
    # Ctrl-C must stop a run cleanly even when started from a shell that ignores SIGINT for
    # background jobs (the handler is inherited as SIG_IGN there).
    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _on_sigterm))}
    global _main_pid
    _main_pid = os.getpid()
    try:
        _main()
    except Interrupted as e:
        _interrupted(str(e))
    except KeyboardInterrupt:
        _interrupted()
    finally:  # called in-process (tests, an embedding program): leave its handlers as they were
        for s, h in previous.items():
            signal.signal(s, h)


def _main() -> None:
    from methods.convert import CheckpointError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files only
    args = _normalise_argv(sys.argv[1:])
    exits, aborts, parse_errors = _parser_exceptions()
    try:
        code = app(args=args, prog_name="bench", standalone_mode=False)
        # Not standalone, typer returns exit codes instead of exiting: 130 is its Ctrl-C.
        if code == 130:
            _interrupted()
        if isinstance(code, int) and code:
            sys.exit(code)
    except (UsageError, CheckpointError) as e:
        _error(str(e))
    except exits as e:
        sys.exit(e.exit_code)
    except aborts:
        _interrupted()
    except parse_errors as e:  # typer's (or click's) parsing errors: unknown option, bad value, ...
        _parse_error(e, args)


def _parser_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, abort, parse error) classes. typer >= 0.20 raises its own bundled copy of click's
    exceptions, older typer raises click's: catch whichever exist."""
    exits, aborts = [typer.Exit], [typer.Abort]
    parse_errors = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click
    except ImportError:
        pass
    else:
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        parse_errors.append(click.ClickException)
    return tuple(exits), tuple(aborts), tuple(parse_errors)


def _parse_error(e: Exception, args: list[str]) -> None:
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError":  # `bench` or `bench baseline` alone: the help, then why
        console.print(e.format_message(), markup=False, highlight=False)
        command = ctx.command_path if ctx is not None else "bench"
        _error(f"{command} needs a command; pick one of those listed above")
    command = ctx.command_path if ctx is not None else "bench"
    message = " ".join(e.format_message().split()).rstrip(".")  # one line, whatever the parser's wrapping
    _error(f"{message}; see `{command} --help`")


def _error(message: str) -> None:
    """The one line a user gets for bad input, exit code 2."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _bench_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("bench")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


_terminated = False  # SIGTERM, not Ctrl-C: the exit code says which
_main_pid = 0


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler, `kill`, a CI timeout) stops a run the way Ctrl-C does: the run's
    manifest says 'interrupted' and what was finished is kept. A forked child (a DataLoader
    worker) that inherited this handler dies as usual: its parent stops it with SIGTERM."""
    global _terminated
    if os.getpid() != _main_pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _terminated = True
    raise KeyboardInterrupt


def _interrupted(message: str | None = None) -> None:
    err.print(f"[bold red]interrupted:[/] {escape(message or 'stopped before the end')}", soft_wrap=True)
    sys.exit(128 + signal.SIGTERM if _terminated else 130)


if __name__ == "__main__":
    main()
