"""``bench flops``: one model's work as every counter counts it (docs/counting.md#every-counter).

Per method and budget, on a handful of test samples, each traced alone (batch 1, so a counter sees
the shapes that sample produced): our closed form (the trace's ``gmacs``), fvcore's
``FlopCountAnalysis`` and ptflops' ``get_model_complexity_info`` (``aten`` backend) on the
``compact`` model, and beside each counter what the documented rules predict it counts
(``MethodSpec.counting``, methods/counting.py). The papers' own conventions are evaluated on the
samples as one batch (ATS's padded-batch count needs batch mates).
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import methods

from .errors import UsageError

COUNTERS = ("fvcore", "ptflops", "paper")  # the closed form is always shown: every other column is read against it
TOLERANCE = 1e-9  # relative: counts are integers, the rules exact


def sdpa_macs(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> int:
    """q @ k^T plus attn @ v of one ``scaled_dot_product_attention`` call, by the rule both
    counters apply to an explicit matmul (docs/counting.md#every-counter)."""
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _fvcore_sdpa(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import get_shape

    return sdpa_macs(*(tuple(get_shape(v)) for v in inputs[:3]))


def _ptflops_sdpa(args: tuple, outputs: tuple) -> int:
    return sdpa_macs(*(tuple(a.shape) for a in args[:3]))


def _ptflops_sdpa_hooks() -> dict:
    """ptflops' aten backend keys hooks by the op the dispatcher sees: SDPA arrives as one of its
    fused kernels (CPU flash, CUDA flash / efficient / cuDNN); the math backend decomposes into bmm."""
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return {getattr(aten, n): _ptflops_sdpa for n in names if hasattr(aten, n)}


def fvcore_gmacs(model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, float]]:
    """fvcore's total (it counts multiply-accumulates) and its per-operator split, in G."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, on import (docs/counting.md#what-fvcore-counts)
        from fvcore.nn import FlopCountAnalysis
    fca = FlopCountAnalysis(model, x).set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the jit tracer's warnings about data-dependent Python values
        total = fca.total()
    return total / 1e9, {k: v / 1e9 for k, v in fca.by_operator().items()}


class EagerExtras(TorchFunctionMode):
    """What ptflops' aten backend counts differently from fvcore on the same executed work: no
    LayerNorm or BatchNorm, and one MAC per output element for a bias. Seen at the functional level
    (module calls and the methods' sliced ``F.linear`` alike) during ptflops' own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_macs = 0
        self.bias_adds = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.layer_norm:
            affine = _arg(args, kwargs, 2, "weight") is not None
            self.norm_macs += args[0].numel() * (5 if affine else 4)
        elif func is F.batch_norm:
            affine = _arg(args, kwargs, 3, "weight") is not None
            self.norm_macs += args[0].numel() * (2 if affine else 1)
        elif func in (F.linear, F.conv1d, F.conv2d, F.conv3d) and _arg(args, kwargs, 2, "bias") is not None:
            self.bias_adds += out.numel()
        return out


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


@contextlib.contextmanager
def _hooks_restored(model: nn.Module) -> Iterator[None]:
    """ptflops' aten backend registers forward hooks on the model's children and never removes
    them; drop them afterwards so that repeated counts do not pile hooks up."""
    children = list(model.children())
    before = [(set(m._forward_pre_hooks), set(m._forward_hooks)) for m in children]
    try:
        yield
    finally:
        for m, (pre, post) in zip(children, before):
            for k in set(m._forward_pre_hooks) - pre:
                del m._forward_pre_hooks[k]
            for k in set(m._forward_hooks) - post:
                del m._forward_hooks[k]


def ptflops_gmacs(model: nn.Module, x: torch.Tensor) -> tuple[float, EagerExtras]:
    """ptflops' aten-backend count of one forward on ``x`` in G, and the norms and biases of the
    same forward (the terms by which it differs from fvcore's rules)."""
    from ptflops import get_model_complexity_info

    extras = EagerExtras()
    log = io.StringIO()  # ptflops prints its failures instead of raising them
    with _hooks_restored(model), torch.no_grad(), extras:
        macs, _ = get_model_complexity_info(model, tuple(x.shape[1:]), print_per_layer_stat=False, as_strings=False,
                                            input_constructor=lambda _res: {"x": x}, ost=log, backend="aten",
                                            custom_modules_hooks=_ptflops_sdpa_hooks())
    if macs is None:
        raise RuntimeError(f"ptflops could not count {type(model).__name__}: {log.getvalue().strip()}")
    return macs / 1e9, extras


# ----------------------------------------------------------------------------------------------
# one model


def _run(model: nn.Module, x: torch.Tensor) -> methods.Trace:
    with torch.no_grad():
        model(x)
    return methods.trace(model)


def _rule(fn, model: nn.Module, trace: methods.Trace) -> torch.Tensor:
    """A counting rule of the method's spec; None means our closed form."""
    if fn is None:
        return trace.gmacs.detach().cpu().to(torch.float64)
    return fn(model, trace)


def count_sample(model: nn.Module, spec: methods.MethodSpec, x: torch.Tensor, counters: tuple[str, ...]) -> dict[str, float]:
    """Every counter on one sample ``x`` (batch 1), beside what the documented rules predict."""
    trace = _run(model, x)
    out = {"closed": float(trace.gmacs[0])}
    rules = spec.counting
    executed = float(_rule(rules.executed, model, trace)[0])
    if "fvcore" in counters:
        out["fvcore_rule"] = float(_rule(rules.traced, model, trace)[0])
        out["fvcore"], _ = fvcore_gmacs(model, x)
    if "ptflops" in counters:
        out["ptflops"], eager = ptflops_gmacs(model, x)
        out["ptflops_rule"] = executed + (eager.bias_adds - eager.norm_macs) / 1e9
    return out


OURS = "ours"  # the closed form on the conventions' own samples (--samples all), to read them against


def count_conventions(model: nn.Module, spec: methods.MethodSpec, batches, with_ours: bool = False) -> dict[str, list[float]]:
    """The method's papers' conventions (``spec.counting.conventions``) per sample, each batch of
    ``batches`` run as one forward; ``with_ours`` adds our closed form on the same samples."""
    rules = [(r.name, r.gmacs) for r in spec.counting.conventions]
    if with_ours:
        rules.insert(0, (OURS, lambda _model, trace: trace.gmacs.detach().cpu()))
    out: dict[str, list[float]] = {name: [] for name, _ in rules}
    for x in batches:
        trace = _run(model, x)
        for name, fn in rules:
            out[name].extend(fn(model, trace).tolist())
    return out


@dataclass
class FlopsResult:
    """The counts of one method at one budget: per-sample counter values and convention values."""

    method: str
    budget: str
    samples: list[dict[str, float]] = field(default_factory=list)
    conventions: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def mean(self, key: str) -> float | None:
        values = [s[key] for s in self.samples if key in s]
        return sum(values) / len(values) if values else None

    def explained(self, counter: str) -> bool | None:
        """Whether every sample's ``counter`` equals its documented rule."""
        pairs = [(s[counter], s[f"{counter}_rule"]) for s in self.samples if counter in s]
        if not pairs:
            return None
        return all(abs(a - b) <= TOLERANCE * max(abs(b), 1e-12) for a, b in pairs)


def count_model(model: nn.Module, spec: methods.MethodSpec, budget: str, inputs: torch.Tensor, counters: tuple[str, ...],
                convention_batches=None) -> FlopsResult:
    """Every counter on each of ``inputs`` alone; the conventions on ``convention_batches``
    (default: ``inputs`` as one batch)."""
    from .kernels import set_attention

    set_attention(model, "unfused")  # fvcore and ptflops cannot see timm's fused SDPA (docs/counting.md#what-fvcore-counts)
    result = FlopsResult(spec.id, budget, notes={r.name: r.note for r in spec.counting.conventions})
    per_sample = tuple(c for c in counters if c != "paper")
    for i in range(inputs.shape[0]):
        result.samples.append(count_sample(model, spec, inputs[i : i + 1], per_sample))
    if "paper" in counters and spec.counting.conventions:
        whole = convention_batches is not None
        result.conventions = count_conventions(model, spec, convention_batches if whole else [inputs], with_ours=whole)
    return result


def parse_counters(text: str | None) -> tuple[str, ...]:
    if not text or text == "all":
        return COUNTERS
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in COUNTERS]
    if unknown or not chosen:
        raise UsageError(f"unknown counter '{unknown[0] if unknown else text}'; use all or a comma list of {', '.join(COUNTERS)}")
    return chosen


def check_counters_installed(counters: tuple[str, ...]) -> None:
    """Both are dependencies, but an environment may lack one: say which to install rather than fail later."""
    import importlib.util

    for name in ("fvcore", "ptflops"):
        if name in counters and importlib.util.find_spec(name) is None:
            raise UsageError(f"counter '{name}' is not installed: pip install {name} (or pass --counters without it)")


# ----------------------------------------------------------------------------------------------
# a profile's methods and budgets


def _all_batches(evalset, sample_shape: tuple[int, ...], batch_size: int):
    """The whole test list (``--samples all``), one view per model input."""
    for x, _ in evalset.batches(batch_size):
        yield x.reshape(-1, *sample_shape)


def measure(cfg, samples: int | None, counters: tuple[str, ...], reporter) -> tuple[list[FlopsResult], dict]:
    """Every method x budget of ``cfg`` on ``samples`` seeded test inputs (None: the counters on
    4 of them, the conventions on the whole test list)."""
    from methods.convert import load_strict

    from . import budgets as budgets_mod
    from . import datasets, runner

    method_ids, _ = runner.validate(cfg)
    vit = runner.create_backbone(cfg)
    evalset = datasets.load(cfg, vit)
    vit, info = runner.prepare_backbone(cfg, vit, reporter)
    inputs = evalset.timing_inputs(samples or 4, cfg.seed)
    whole = None if samples else (lambda: _all_batches(evalset, evalset.sample_shape, cfg.eval_batch_size))
    results = []
    for m in method_ids:
        spec = methods.get(m)
        for b in budgets_mod.for_method(m, cfg.budgets):
            knobs = budgets_mod.parse(m, b)
            state, _ = runner.method_weights(cfg, spec, vit, knobs, info, reporter)
            model = methods.build(m, vit, mode="compact", **knobs).eval()
            if state is not None:
                load_strict(model, state, spec.id)
            reporter.print(f"counting {m} {budgets_mod.label(b)}", markup=False)
            results.append(count_model(model, spec, budgets_mod.label(b), inputs, counters, whole() if whole else None))
    about = {"backbone": cfg.backbone, "dataset": evalset.name, "checkpoint": info.get("checkpoint"),
             "samples": int(inputs.shape[0]), "convention_samples": "all" if whole else int(inputs.shape[0])}
    return results, about


# ----------------------------------------------------------------------------------------------
# tables

HEADERS = ("method", "budget", "closed form", "fvcore", "fvcore = rule", "ptflops (aten)", "ptflops = rule", "papers' conventions")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _check(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def table_rows(results: list[FlopsResult]) -> list[tuple[str, ...]]:
    """One row per method and budget: mean GMACs per sample of each counter, whether each counter
    equals its documented rule on every sample, and the conventions' means."""
    rows = []
    for r in results:
        conv = "; ".join(f"{name} {sum(v) / len(v):.6f}" for name, v in r.conventions.items() if v) or "-"
        rows.append((r.method, r.budget, _fmt(r.mean("closed")), _fmt(r.mean("fvcore")), _check(r.explained("fvcore")),
                     _fmt(r.mean("ptflops")), _check(r.explained("ptflops")), conv))
    return rows


def markdown(results: list[FlopsResult], about: dict) -> str:
    """The table as Markdown, with the conventions' notes."""
    notes = {name: note for r in results for name, note in r.notes.items()}
    return section_markdown(about, table_rows(results), notes, "#")


def describe(about: dict) -> str:
    return (f"Counters on {about['samples']} seeded test samples, each alone (batch 1), `compact` models; papers' "
            f"conventions on {about['convention_samples']} samples. Checkpoint: `{about['checkpoint']}`. "
            "What each counter counts and each rule: docs/counting.md#every-counter.")


def section_markdown(about: dict, rows: list, notes: dict[str, str], level: str = "##") -> str:
    """The Markdown of a counting table (``bench flops``' file and the report's section)."""
    lines = [f"{level} GMACs per sample as every counter counts them ({about['backbone']}, {about['dataset']})", "",
             describe(about), "", "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if notes:
        lines += ["", "Conventions:", ""] + [f"* {name}: {note}" for name, note in notes.items()]
    return "\n".join(lines) + "\n"


def csv_rows(results: list[FlopsResult]) -> list[dict]:
    """Every sample's counts (G), one row each; conventions as their own rows."""
    out = []
    for r in results:
        for i, s in enumerate(r.samples):
            out.append({"method": r.method, "budget": r.budget, "sample": i, **s})
        for name, values in r.conventions.items():
            out.extend({"method": r.method, "budget": r.budget, "sample": i, f"paper:{name}": v} for i, v in enumerate(values))
    return out


# ----------------------------------------------------------------------------------------------
# the report's section: `bench flops --run RUN` leaves it in the run's folder, `bench report` shows it

SECTION = "flops.json"


def save_section(folder, results: list[FlopsResult], about: dict) -> None:
    import json

    from .store import atomic_write

    notes = {name: note for r in results for name, note in r.notes.items()}
    body = {"about": about, "headers": list(HEADERS), "rows": [list(row) for row in table_rows(results)], "notes": notes}
    atomic_write(folder / SECTION, json.dumps(body, indent=1).encode())


def load_section(folder) -> dict | None:
    """The section a run's folder holds, or None (no `bench flops --run` yet, or unreadable)."""
    import json

    try:
        return json.loads((folder / SECTION).read_text())
    except (OSError, ValueError):
        return None
