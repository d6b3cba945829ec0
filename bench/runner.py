"""``bench run``: config -> (data, methods, measure) -> results (docs/design.md#the-shape-of-the-code)."""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import methods
from methods.convert import CheckpointError, load_checkpoint
from methods.convert import implied_budgets, load_strict

from . import budgets as budgets_mod
from . import cache, calibrate, datasets, kernels, measure, parallel, records, tokenmap
from .config import RunConfig, check_values
from .devices import device_name, machine_info, resolve_device
from .errors import UsageError, warn
from .progress import Reporter
from .store import Run, cell_key
from .train import TrainConfig, train_digits_backbone


# ----------------------------------------------------------------------------------------------
# validation


def resolve_methods(names: list[str]) -> list[str]:
    known = [s.id for s in methods.available()]
    if not names:  # `--methods=` or `--methods ,`: nothing chosen is not "everything"
        raise UsageError("no method given; pass --methods all or a comma list of ids (`bench list methods`)")
    if names == ["all"]:
        return known
    out = []
    for n in names:
        if n == "all":
            out.extend(m for m in known if m not in out)
        elif n not in known:
            raise UsageError(f"unknown method '{n}'; known methods: {', '.join(known)} (`bench list methods`)")
        elif n not in out:
            out.append(n)
    if methods.DENSE not in out:
        out.insert(0, methods.DENSE)  # the dense reference is always measured: every ratio needs it
    return out


def validate(cfg: RunConfig) -> tuple[list[str], list[torch.device]]:
    method_ids = resolve_methods(cfg.methods)
    devices = [resolve_device(d) for d in cfg.devices]
    for p in cfg.precisions:
        if p not in measure.PRECISIONS:
            raise UsageError(f"unknown precision '{p}'; use one of {', '.join(measure.PRECISIONS)}")
    check_values(cfg)
    for m, given in cfg.budgets.items():
        if m not in [s.id for s in methods.available()] + [budgets_mod.ALL]:
            raise UsageError(f"budgets given for unknown method '{m}'; known: {', '.join(s.id for s in methods.available())}")
        if not given and m != budgets_mod.ALL:  # `all = []` opts a profile out of its parent's shared budgets
            raise UsageError(f"{cfg.config_path}: budgets.{m} is empty; list at least one budget (e.g. [\"full\"]) or drop the key")
    for m in method_ids:  # parse every budget now, so a typo fails before any work
        for b in budgets_mod.for_method(m, cfg.budgets):
            budgets_mod.parse(m, b)
    datasets.check(cfg)
    return method_ids, devices


# ----------------------------------------------------------------------------------------------
# backbone and fine-tuned weights


def train_config(cfg: RunConfig) -> TrainConfig:
    try:
        return TrainConfig(**cfg.train)
    except TypeError as e:
        raise UsageError(f"{cfg.config_path}: bad [train] table ({e})") from None


def backbone_key(cfg: RunConfig) -> dict:
    return {
        "backbone": cfg.backbone,
        "model": cfg.model,
        "digits": datasets.embedded_config(cfg).key(),
        "train": train_config(cfg).key(),
    }


def create_backbone(cfg: RunConfig) -> nn.Module:
    """The backbone's architecture, weights not loaded yet."""
    import timm

    kwargs: dict[str, Any] = {**cfg.model, **datasets.model_kwargs(cfg)}
    try:
        vit = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UsageError(f"unknown backbone '{cfg.backbone}'; use a timm VisionTransformer name (e.g. deit_small_patch16_224), "
                             "digits_vit (or a study variant such as digits_vit_rope, docs/avit_study.md), digits_video_vit, "
                             "videomae_vit_base_patch16_224 or timesformer_base_patch16_224") from None
        raise
    except (TypeError, ValueError) as e:  # ValueError: a study option's value (methods/variants.py)
        raise UsageError(f"backbone '{cfg.backbone}' does not take these [model] settings: {e}") from None
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise UsageError(f"backbone '{cfg.backbone}' is a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


def prepare_backbone(cfg: RunConfig, vit: nn.Module, reporter: Reporter) -> tuple[nn.Module, dict]:
    """Give ``vit`` its weights: a given checkpoint, a cached or shipped one, or trained now."""
    if cfg.checkpoint == "random":
        reporter.print("[yellow]checkpoint 'random': random weights, speed and compute only (accuracy is meaningless)")
        return vit.eval(), {"checkpoint": "random", "checkpoint_sha256": ""}
    if cfg.checkpoint:
        from methods.convert import load_backbone

        path = Path(cfg.checkpoint).expanduser()
        try:
            conv = load_backbone(vit, path)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        _warn_non_finite(vit, path)
        info = {"checkpoint": str(path), "checkpoint_sha256": cache.file_sha256(path), "checkpoint_layout": conv.layout}
        return vit.eval(), {**info, "_method_states": conv.method_states}
    if not datasets.is_embedded(cfg):
        raise UsageError(
            f"no checkpoint for backbone '{cfg.backbone}' on '{cfg.dataset}': pass --checkpoint PATH "
            "(weights are never downloaded) or --checkpoint random for speed-only runs"
        )
    key = cache.config_key(backbone_key(cfg))
    path = None if cfg.retrain else cache.find(cfg.backbone, key)
    if path is None:
        path = train_backbone(cfg, vit, key, reporter)
    else:
        reporter.print(f"backbone: cached checkpoint {path}", markup=False)
    load_checkpoint(vit, path)
    return vit.eval(), {"checkpoint": str(path), "checkpoint_sha256": cache.file_sha256(path), "checkpoint_key": key}


def _warn_non_finite(vit: nn.Module, path: Path) -> None:
    """NaN or inf weights run, but every prediction they make is meaningless: say so."""
    bad = [k for k, v in vit.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warn(f"checkpoint {path} has NaN or inf values in {len(bad)} tensor(s) (first: {bad[0]}); its accuracy is meaningless")


def train_backbone(cfg: RunConfig, vit: nn.Module, key: str, reporter: Reporter, folder: Path | None = None) -> Path:
    tc = train_config(cfg)
    reporter.print(f"backbone: no cached checkpoint for this configuration (key {key}); training {cfg.backbone} ({tc.epochs} epochs)",
                   markup=False)
    metrics = train_digits_backbone(vit, datasets.embedded_config(cfg), tc, reporter, data=datasets.embedded_data(cfg))
    meta = {"key": backbone_key(cfg), "val_top1": metrics["val_top1"], "train_seconds": round(metrics["train_seconds"], 1)}
    path = cache.save(vit.state_dict(), cfg.backbone, key, meta, folder)
    reporter.print(f"backbone: val top-1 {metrics['val_top1']:.2%} after {metrics['train_seconds']:.0f} s; saved {path}", markup=False)
    return path


def method_train_data(cfg: RunConfig, device: torch.device, batch_size: int) -> methods.TrainData:
    dc = datasets.embedded_config(cfg)
    data = datasets.embedded_data(cfg)  # bench.data.digits, or moving_digits for the video default
    steps = -(-dc.n_train // batch_size)

    def batches(epoch: int):
        x, y = data.make_split(dc, "train", epoch=10_000 + epoch)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield data.normalize(x[idx]).to(device), y[idx].to(device)

    def val_batches():
        x, y = data.make_split(dc, "val")
        for i in range(0, len(y), 256):
            yield data.normalize(x[i : i + 256]).to(device), y[i : i + 256].to(device)

    return methods.TrainData(batches=batches, steps_per_epoch=steps, val_batches=val_batches, num_classes=10)


NOT_FINETUNED = {"finetuned": False, "method_checkpoint": "", "method_checkpoint_sha256": ""}


def training_mode(spec: methods.MethodSpec, vit: nn.Module) -> str:
    """The method's first mode that the backbone does not refuse (docs/avit_study.md#which-methods-run-where)."""
    refusal = getattr(vit, "unsupported_reason", None)
    return next((m for m in spec.modes if refusal is None or not refusal(spec.id, m)), spec.modes[0])


def method_weights(
    cfg: RunConfig, spec: methods.MethodSpec, vit: nn.Module, knobs: dict, backbone_info: dict, reporter: Reporter
) -> tuple[dict | None, dict]:
    """Fine-tuned state dict for methods that train (cached like the backbone), else None."""
    given = backbone_info.get("_method_states", {}).get(spec.id)
    if given:  # the checkpoint carries this method's own parameters (official AdaViT: its gates)
        return {**vit.state_dict(), **given}, _method_checkpoint(Path(backbone_info["checkpoint"]), backbone_info["checkpoint_sha256"])
    if spec.train is None:
        return None, dict(NOT_FINETUNED)
    settings = dict(spec.train_settings)
    train_knobs = {k: knobs.get(k, spec.knob(k).default) for k in spec.train_knobs}
    if not datasets.is_embedded(cfg) or cfg.checkpoint:
        reporter.print(f"[yellow]{spec.id}: fine-tuning runs only on the embedded default here; evaluating without it")
        return None, dict(NOT_FINETUNED)
    key_obj = {"backbone": backbone_info.get("checkpoint_key", backbone_info.get("checkpoint_sha256")), "method": spec.id,
               "train_knobs": train_knobs, "settings": settings}
    key = cache.config_key(key_obj)
    name = f"{cfg.backbone}-{spec.id}"
    path = None if cfg.retrain else cache.find(name, key)
    if path is None:
        model = methods.build(spec.id, vit, mode=training_mode(spec, vit), **knobs)
        data = method_train_data(cfg, torch.device("cpu"), int(settings.get("batch_size", 128)))
        epochs = int(settings.get("epochs", 1))
        with reporter.bar(f"fine-tune {spec.id} {budgets_mod.label(train_knobs)}", epochs * data.steps_per_epoch) as bar:
            metrics = spec.train(model, data, settings, bar)
        path = cache.save(model.state_dict(), name, key, {"key": key_obj, **(metrics or {})})
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}
        reporter.print(f"{spec.id}: fine-tuned {shown}; saved {path}", markup=False)
    from safetensors.torch import load_file

    return load_file(str(path)), {**_method_checkpoint(path, cache.file_sha256(path)), "_path": str(path)}


def _method_checkpoint(path: Path, sha256: str) -> dict:
    """The record's fine-tuned-weights columns: the file's name and hash, not a path into a home
    folder (``bench.cache.locate`` finds a cached file by its name)."""
    return {"finetuned": True, "method_checkpoint": path.name, "method_checkpoint_sha256": sha256}


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class Group:
    """Cells that share a model and an accuracy pass; they differ only in batch size."""

    method: str
    budget: str
    knobs: dict
    mode: str
    device: torch.device
    precision: str
    label: str | None = None  # the cells' device when run on a worker of a --devices pool (its kind)
    target: float | None = None  # a gmacs:R budget: the share of dense GMACs the knobs are calibrated to

    def identity(self, batch_size: int) -> dict:
        return {"method": self.method, "budget": self.budget, "mode": self.mode, "device": self.label or str(self.device),
                "precision": self.precision, "batch_size": batch_size}


def plan(cfg: RunConfig, method_ids: list[str], devices: list[torch.device]) -> list[Group]:
    groups = []
    for dev in devices:
        for prec in cfg.precisions:
            for m in method_ids:
                spec = methods.get(m)
                mode = cfg.modes.get(m, spec.modes[0])
                if mode not in spec.modes:
                    raise UsageError(f"method '{m}' has no mode '{mode}'; modes: {', '.join(spec.modes)}")
                for b in budgets_mod.for_method(m, cfg.budgets):
                    target = budgets_mod.target(b)
                    knobs = budgets_mod.parse(m, b)
                    if target is not None and spec.matched.train_from_target is not None:
                        knobs = {**spec.matched.train_from_target(target), **knobs}
                    groups.append(Group(m, budgets_mod.label(b), knobs, mode, dev, prec, target=target))
    return groups


def check_methods_fit(cfg: RunConfig, groups: list[Group], vit: nn.Module) -> None:
    """Build each method once on the (untrained) backbone, so that one that cannot adapt it (e.g.
    ATS on a video ViT without a CLS token) fails before any training or measuring."""
    for method in dict.fromkeys(g.method for g in groups):
        g = next(g for g in groups if g.method == method)
        try:
            methods.build(g.method, vit, mode=g.mode, **g.knobs)
        except (ValueError, TypeError) as e:
            raise UsageError(f"method '{method}' cannot run on backbone '{cfg.backbone}' ({e}); choose others with --methods") from None


def device_memory(dev: torch.device) -> int:
    """Bytes of memory the device has in all."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_batch_memory(cfg: RunConfig, evalset: datasets.EvalSet, devices: list[torch.device]) -> None:
    """A batch size whose fp32 inputs alone exceed the device's memory cannot run at any setting:
    refuse it now, not with an allocation error after the backbone is trained."""
    view_bytes = 4 * int(np.prod(evalset.sample_shape))
    batches = [("--batch-sizes", b, b * view_bytes) for b in cfg.batch_sizes]  # timing: one view per input
    batches.append(("eval_batch_size", cfg.eval_batch_size, cfg.eval_batch_size * (evalset.views or 1) * view_bytes))
    for dev in devices:
        capacity = device_memory(dev)
        for what, bs, need in batches:
            if need > capacity:
                raise UsageError(f"{what} {bs}: one batch of inputs alone takes {need / 2**30:.1f} GiB, more than "
                                 f"the {capacity / 2**30:.1f} GiB of {dev}; pick a smaller batch size")


def git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "timm", "numpy", "pandas", "scikit-learn", "fvcore", "bench"):  # scikit-learn: the digits data
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def installed_packages() -> dict[str, str]:
    """Every installed distribution and its version (importlib.metadata), to rebuild the environment."""
    import importlib.metadata as md

    found = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name] = dist.version
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def default_budgets(cfg: RunConfig, method_ids: list[str]) -> dict[str, list[str]]:
    """Budgets no profile or flag gave: the method's own defaults (methods/registry.py), which a
    later version may change, so the manifest records them."""
    shared = bool(cfg.budgets.get(budgets_mod.ALL))
    return {m: [budgets_mod.label(b) for b in budgets_mod.for_method(m, {})] for m in method_ids
            if not cfg.budgets.get(m) and not (shared and methods.get(m).primary_knob is not None)}


def new_manifest(cfg: RunConfig, argv: list[str], method_ids: list[str]) -> dict:
    return {
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "status": "running",
        "command": argv,
        "profile": cfg.profile,
        "config": cfg.to_dict(),
        "default_budgets": default_budgets(cfg, method_ids),
        "schema_version": records.SCHEMA_VERSION,
        "versions": versions(),
        "machine": machine_info(),
        "packages": installed_packages(),
        "git": git_commit(),
        "threads": torch.get_num_threads(),
        "seeds": {"run": cfg.seed, "train": train_config(cfg).seed, "data": datasets.embedded_config(cfg).seed},
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE") if k in os.environ},
    }


def execute(cfg: RunConfig, reporter: Reporter, resume: str | None = None, argv: list[str] | None = None) -> Run | None:
    """Run (or finish) a benchmark; returns the run (None on torchrun ranks other than 0).
    KeyboardInterrupt propagates after saving."""
    root = Path(cfg.out)
    run = None
    if resume:
        run = Run.find(root, resume)
        skip_corrupt = cfg.skip_corrupt  # the one flag a resume may add: a run stopped by a corrupt video
        cfg = RunConfig.from_dict(run.manifest()["config"])
        cfg.skip_corrupt = cfg.skip_corrupt or skip_corrupt
        reporter.print(f"resuming run {run.path} ({len(run.records())} cells already done)", markup=False)
    for m, b in implied_budgets(cfg.checkpoint).items():  # official A-ViT: the gate is in the file name
        cfg.budgets.setdefault(m, b)
    if cfg.workers:
        cfg.devices = [parallel.check_pool(cfg.workers)[0].type]
    method_ids, devices = validate(cfg)
    kernels.check_attention(cfg.attention, devices[0])
    d = parallel.init(devices[0].type)
    if d.active:
        if cfg.workers:
            raise UsageError("--devices spreads cells over processes itself; under torchrun use --device")
        cfg.threads = cfg.threads or max(1, (os.cpu_count() or 1) // d.world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    with kernels.memory_cap(cfg.memory_cap_mb, parallel.rank_device(devices[0], d)):
        return _execute(cfg, reporter, run, argv, method_ids, devices, d)


def _execute(cfg: RunConfig, reporter: Reporter, run: Run | None, argv: list[str] | None, method_ids: list[str],
             devices: list[torch.device], d: parallel.Dist) -> Run | None:
    """``execute`` once the configuration is checked; ``run`` is the run being resumed, if any."""
    from .store import ensure_writable

    resume = run is not None
    root = Path(cfg.out)
    if d.main:
        ensure_writable(run.path if resume else root)  # fail before any training or measuring
    with contextlib.ExitStack() as held:
        if d.main and run is not None:
            held.enter_context(run.locked())  # a second `--resume` of this run refuses before any work
        return _prepare_and_measure(cfg, run, method_ids, devices, d, reporter, held, argv)


def _prepare_and_measure(cfg: RunConfig, run: Run | None, method_ids: list[str], devices: list[torch.device],
                         d: parallel.Dist, reporter: Reporter, held: contextlib.ExitStack, argv: list[str] | None) -> Run | None:
    """Backbone, data and plan, then every cell not done yet; ``run`` is None for a new run."""
    vit = create_backbone(cfg)
    evalset = datasets.load(cfg, vit)
    check_batch_memory(cfg, evalset, devices)
    groups = plan(cfg, method_ids, devices)
    check_methods_fit(cfg, groups, vit)
    for g in groups if d.active else ():  # rank r runs on cuda:LOCAL_RANK; the cells keep the asked device
        g.label, g.device = str(g.device), parallel.rank_device(g.device, d)
    vit, backbone_info = prepare_backbone(cfg, vit, reporter)
    if not d.main:
        _run_groups(cfg, None, groups, vit, backbone_info, evalset, reporter, d)
        parallel.finish(d)
        return None
    if run is not None:
        recorded = run.manifest().get("checkpoint_sha256")
        if recorded is not None and recorded != backbone_info.get("checkpoint_sha256"):
            raise UsageError(f"run {run.id} was measured with checkpoint sha256 {recorded[:12]}, but "
                             f"{backbone_info.get('checkpoint')} has {backbone_info.get('checkpoint_sha256', '')[:12]}; start a new run")
    else:
        run = Run.create(Path(cfg.out), cfg.profile, new_manifest(cfg, argv or sys.argv, method_ids))
        held.enter_context(run.locked())
    manifest = run.manifest()
    manifest.update({k: v for k, v in backbone_info.items() if not k.startswith("_")})
    manifest["status"] = "running"
    manifest["dataset"] = {"name": evalset.name, **evalset.info}
    manifest["backbone"] = {"name": cfg.backbone, "params_m": round(sum(p.numel() for p in vit.parameters()) / 1e6, 4),
                            "dense_gmacs": methods.vit_shape(vit).dense_gmacs()}
    total_cells = len(groups) * len(cfg.batch_sizes)
    manifest["planned_cells"] = total_cells
    run.write_manifest(manifest)
    reporter.print(f"run {run.id}: {len(groups)} model configurations x {len(cfg.batch_sizes)} batch sizes = {total_cells} cells -> {run.path}",
                   markup=False)
    _measure(cfg, run, groups, vit, backbone_info, evalset, reporter, d)
    return run


def _measure(cfg: RunConfig, run: Run, groups: list[Group], vit: nn.Module, backbone_info: dict,
             evalset: datasets.EvalSet, reporter: Reporter, d: parallel.Dist) -> None:
    """Every cell of ``groups`` not done yet; the manifest's status says how it ended."""
    try:
        if cfg.workers:
            parallel.merge_workers(run)  # cells a worker of an interrupted run finished
            for g in groups:  # fine-tune (and cache) here once, so workers never train the same thing twice
                method_weights(cfg, methods.get(g.method), vit, g.knobs, backbone_info, reporter)
            parallel.spawn(run, cfg.workers, len(groups), cfg.threads, reporter)
        else:
            _run_groups(cfg, run, groups, vit, backbone_info, evalset, reporter, d)
            parallel.finish(d)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (bench.cli turns it into this)
        _set_status(run, "interrupted")
        raise
    except Exception as e:  # a bad image, a bad setting met late, a bug: the manifest says so, not "running"
        _set_status(run, f"failed: {failure_reason(e)}")
        raise
    manifest = run.manifest()
    manifest["status"] = "complete"
    manifest["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    run.write_manifest(manifest)


def _set_status(run: Run, status: str) -> None:
    manifest = run.manifest()
    manifest["status"] = status
    run.write_manifest(manifest)


def failure_reason(e: BaseException) -> str:
    """One line for the manifest: the error's first line (or its type), at most 300 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def _run_groups(cfg: RunConfig, run: Run | None, groups: list[Group], vit: nn.Module, backbone_info: dict,
                evalset: datasets.EvalSet, reporter: Reporter, d: parallel.Dist = parallel.Dist(),
                done: set[str] | None = None) -> None:
    """Measure ``groups``; under torchrun every rank evaluates its shard and rank 0 (``run``) does the rest."""
    done = (run.done_keys() if run is not None else set()) | (done or set())
    dense_gmacs = methods.vit_shape(vit).dense_gmacs()
    references: dict[tuple, nn.Module] = {}
    calibration_inputs: dict[str, tuple] = {}  # gmacs:R groups: the samples each device searches on, made once
    timing_cpu = evalset.timing_inputs(cfg.timing.timing_samples, cfg.seed) if d.main else None
    # report plot 5: the same images for every method (images only: video token maps are not drawn)
    overlay_cpu = timing_cpu[: tokenmap.N_IMAGES] if timing_cpu is not None and evalset.views is None else None
    if run is not None and overlay_cpu is not None:
        run.add_file(tokenmap.IMAGES_FILE, tokenmap.image_record(vit, overlay_cpu))
    setup = {"attention": cfg.attention, "compile": cfg.compile_backend if cfg.compile else "off"}
    planned = len(groups) * len(cfg.batch_sizes)
    number = sum(cell_key(g.identity(b)) in done for g in groups for b in cfg.batch_sizes)  # cells a resume keeps
    for g in groups:
        todo = parallel.broadcast([b for b in cfg.batch_sizes if cell_key(g.identity(b)) not in done], d)
        if not todo:
            continue
        reporter.cell_started(number + 1, planned)
        spec = methods.get(g.method)
        model, method_info = _group_model(cfg, g, spec, vit, backbone_info, reporter, evalset, calibration_inputs)
        reference = _dense_reference(cfg, g, vit, references)
        name = f"{g.method} {g.budget}"
        with kernels.attention_context(cfg.attention):
            if d.active:  # every rank must take the same batches: no back-off under torchrun
                result, eval_bs, eval_failed = parallel.evaluate(model, evalset, cfg.eval_batch_size, g.device, g.precision,
                                                                 reporter, f"eval {name}", d), cfg.eval_batch_size, []
            else:
                result, eval_bs, eval_failed = kernels.with_backoff(
                    lambda b, m=model: parallel.evaluate(m, evalset, b, g.device, g.precision, reporter, f"eval {name}", d),
                    cfg.eval_batch_size, g.device)
            skipped = parallel.gather(getattr(evalset, "skipped", {}), d)
            if not d.main:
                continue
            if result is None:
                raise UsageError(f"{name}: out of memory even at evaluation batch 1 on {g.device}")
            _note_skipped(run, skipped)
            summary = result.summary()
            token_blocks = (tokenmap.token_blocks(kernels.unwrap(model), overlay_cpu.to(g.device), g.precision)
                            if overlay_cpu is not None else None)
            inputs = timing_cpu.to(g.device)
            for bs in todo:
                number += 1
                reporter.cell_started(number, planned)
                cell, ran, failed = kernels.with_backoff(
                    lambda b, m=model: _time_cell(cfg, g, m, reference, inputs, b, reporter, name), bs, g.device)
                t, raw = cell if cell is not None else ({k: float("nan") for k in OOM_NAN}, {})
                raw = {"correct1": result.correct1, "gmacs_per_sample": result.gmacs, **raw}
                if token_blocks is not None:
                    raw["token_blocks"] = token_blocks
                outcome = {"status": "oom" if cell is None else ("oom_backoff" if failed else "ok"), "batch_size_run": ran,
                           "oom_backoff": failed, "eval_batch_size": eval_bs, "eval_oom_backoff": eval_failed}
                record = _cell_record(cfg, g, bs, run, spec, backbone_info, method_info, evalset, model, summary, dense_gmacs,
                                      {**t, **setup, **_cap_fields(cfg, g.device), **outcome}, d)
                run.add_record(record, raw)
                reporter.cell_done(cell_line(record))
        del model


def cell_line(r: dict) -> str:
    """The one line a finished cell prints (docs/records.md for the columns)."""
    return (f"{r['method']} {r['budget']} {r['device']} {r['precision']} bs={r['batch_size']}: top-1 {r['top1']:.1f}%, "
            f"{r['gmacs']:.4g} GMACs ({r['gmacs_ratio']:.2f} of dense), {r['img_per_s']:.4g} img/s, "
            f"speedup {r['speedup']:.2f}x, p90 {r['latency_ms_p90']:.2f} ms, peak {r['peak_mem_mb']:.0f} MiB [{r['status']}]")


def _group_model(cfg: RunConfig, g: Group, spec: methods.MethodSpec, vit: nn.Module, backbone_info: dict,
                 reporter: Reporter, evalset: datasets.EvalSet, calibration_inputs: dict) -> tuple[nn.Module, dict]:
    """The group's model with its (fine-tuned) weights, on its device, ready to run; a gmacs:R
    group's knob is calibrated first (``g.knobs`` then holds the value found). ``calibration_inputs``
    keeps the calibration samples per device for the run: every group searches on the same ones."""
    state, method_info = method_weights(cfg, spec, vit, g.knobs, backbone_info, reporter)

    def build(knobs: dict) -> nn.Module:
        model = methods.build(g.method, vit, mode=g.mode, **knobs)
        if state is not None:
            load_strict(model, state, method_info.get("_path", method_info.get("method_checkpoint", spec.id)))
        return model.to(g.device).eval()

    if g.target is not None:
        key = str(g.device)
        if key not in calibration_inputs:
            calibration_inputs[key] = calibration_batches(cfg, evalset, g.device)
        batches, split = calibration_inputs[key]
        cal = calibrate.calibrate(build, spec, g.knobs, g.target, batches, methods.vit_shape(vit).dense_gmacs(), split)
        g.knobs = {**g.knobs, cal.knob: cal.value}
        method_info = {**method_info, **cal.fields()}
        note = "" if cal.matched else f" [yellow](outside +-{calibrate.TOLERANCE:.0%}: the knob's range ends there)[/]"
        reporter.print(f"{g.method} {g.budget}: {cal.knob} = {cal.value:.4g} gives {cal.ratio:.3f} of dense GMACs on {split}{note}")
    return _runnable(kernels.set_attention(build(g.knobs), cfg.attention), cfg), method_info


def calibration_batches(cfg: RunConfig, evalset: datasets.EvalSet, device: torch.device, n: int = 256) -> tuple[list[torch.Tensor], str]:
    """Inputs a compute target is matched on: the validation split of an embedded data set, else
    seeded samples of the evaluation data (there is no other split on disk)."""
    if datasets.is_embedded(cfg):
        val = method_train_data(cfg, device, 256).val_batches()
        batches, seen = [], 0
        for x, _ in val:
            batches.append(x[: n - seen])
            seen += len(batches[-1])
            if seen >= n:
                break
        return batches, "validation split"
    x = evalset.timing_inputs(16, cfg.seed + 1).to(device)  # few: a real-size forward is costly
    return list(x.split(8)), "evaluation samples (no validation split)"


def _dense_reference(cfg: RunConfig, g: Group, vit: nn.Module, references: dict) -> nn.Module | None:
    """The dense model a group's speedup is timed against (one per device and precision); None
    for the dense group itself."""
    if g.method == methods.DENSE:
        return None
    key = (str(g.device), g.precision)
    if key not in references:
        references[key] = _runnable(kernels.set_attention(methods.build(methods.DENSE, vit).to(g.device).eval(), cfg.attention), cfg)
    return references[key]


def _cell_record(cfg: RunConfig, g: Group, bs: int, run: Run, spec: methods.MethodSpec, backbone_info: dict, method_info: dict,
                 evalset: datasets.EvalSet, model: nn.Module, summary: dict, dense_gmacs: float, measured: dict,
                 d: parallel.Dist) -> dict:
    """One cell's record (docs/records.md): what was measured and everything needed to reproduce it."""
    return records.make({
        **g.identity(bs),
        "run_id": run.id,
        "paper": spec.paper,
        "arxiv": spec.arxiv,
        "knobs": g.knobs,
        "backbone": cfg.backbone,
        "checkpoint": Path(backbone_info.get("checkpoint", "")).name,
        "checkpoint_sha256": backbone_info.get("checkpoint_sha256", ""),
        **{k: v for k, v in method_info.items() if not k.startswith("_")},
        "dataset": evalset.name,
        "device_name": device_name(g.device),
        "threads": torch.get_num_threads(),
        "param_count_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 4),
        **summary,
        "dense_gmacs": dense_gmacs,
        "gmacs_ratio": summary["gmacs"] / dense_gmacs,
        **measured,  # timing, setup, memory cap and the cell's outcome
        "eval_world_size": d.world,
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **({"worker_device": str(g.device)} if g.label else {}),
    })


OOM_NAN = ("img_per_s", "speedup", "latency_ms_p50", "latency_ms_p90", "dense_img_per_s", "peak_mem_mb")


def _cap_fields(cfg: RunConfig, device: torch.device) -> dict:
    """The memory cap a cell ran under (kernels.memory_cap), recorded only when a profile set one."""
    if cfg.memory_cap_mb is None:
        return {}
    return {"memory_cap_mb": cfg.memory_cap_mb, "memory_cap_kind": kernels.MEMORY_CAP_KINDS[device.type]}


def _runnable(model: nn.Module, cfg: RunConfig) -> nn.Module:
    return kernels.compile_model(model, cfg.compile_backend) if cfg.compile else model


def _time_cell(cfg: RunConfig, g: Group, model: nn.Module, reference: nn.Module | None, inputs: torch.Tensor, bs: int,
               reporter: Reporter, name: str) -> tuple[dict, dict]:
    """Timing (interleaved with the dense reference) and peak memory of one cell at batch ``bs``."""
    t = measure.time_side_by_side(
        model, reference, inputs, bs, g.device, g.precision,
        cfg.timing.warmup_iters, cfg.timing.min_iters, cfg.timing.max_iters, cfg.timing.min_seconds,
        reporter, label=f"time {name} bs={bs}",
    )
    mem, mem_kind = measure.peak_memory_mb(model, measure.batch_of(inputs, bs), g.device, g.precision, cfg.timing.memory_iters)
    raw = {"iter_seconds": np.asarray(t.pop("raw_seconds"))}
    if "raw_dense_seconds" in t:
        raw["dense_iter_seconds"] = np.asarray(t.pop("raw_dense_seconds"))
    if g.method == methods.DENSE:
        t["speedup"] = 1.0
        t["dense_img_per_s"] = t["img_per_s"]
        t["dense_latency_ms_p50"] = t["latency_ms_p50"]
    return {**t, "peak_mem_mb": round(mem, 2), "peak_mem_kind": mem_kind}, raw


def _note_skipped(run: Run, skipped: list[dict] | None) -> None:
    """--skip-corrupt: the unreadable images met so far, counted and listed in the manifest."""
    merged = {k: v for part in (skipped or []) for k, v in part.items()}
    if not merged:
        return
    manifest = run.manifest()
    ds = manifest.setdefault("dataset", {})
    if ds.get("skipped_corrupt") != len(merged):
        ds["skipped_corrupt"] = len(merged)
        ds["skipped_files"] = sorted(merged.values())
        run.write_manifest(manifest)


def run_worker(run_path: Path, index: int, device: str, share: list[int], threads: int | None, reporter: Reporter) -> None:
    """One worker of a ``--devices`` run (bench/parallel.py): its share of the planned groups on
    ``device``, cells into ``workers/<index>/`` of the run, which the parent merges."""
    main = Run.open(run_path)
    cfg = RunConfig.from_dict(main.manifest()["config"])
    method_ids, devices = validate(cfg)
    torch.set_num_threads(threads or cfg.threads or max(1, (os.cpu_count() or 1) // len(cfg.workers)))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    groups = plan(cfg, method_ids, devices)
    mine = [groups[i] for i in share]
    for g in mine:
        g.label, g.device = str(g.device), resolve_device(device)
    vit = create_backbone(cfg)
    evalset = datasets.load(cfg, vit)
    vit, backbone_info = prepare_backbone(cfg, vit, reporter)
    folder = parallel.worker_folder(main.path, index)
    folder.mkdir(parents=True, exist_ok=True)
    part = Run(folder)
    part.write_manifest({"worker": index, "device": device, "groups": share})
    with kernels.memory_cap(cfg.memory_cap_mb, mine[0].device if mine else resolve_device(device)):
        _run_groups(cfg, part, mine, vit, backbone_info, evalset, reporter, done=main.done_keys())
