"""Checkpoints from the wild into our models: read safely, rename keys, load strictly.

What users bring (docs/methods/avit.md#checkpoints, docs/methods/adavit.md#checkpoints, docs/methods/README.md#weights-and-checkpoints):

* timm / DeiT ``.pth`` (DeiT: ``{"model": ...}``; timm training: ``state_dict`` / ``state_dict_ema``;
  DDP / ``torch.compile`` prefixes ``module.`` / ``_orig_mod.``) and ``.safetensors``. Read with
  timm's own ``load_state_dict`` at ``weights_only=True`` (which allows the ``argparse.Namespace``
  that DeiT, A-ViT and AdaViT training scripts store under ``args``, and nothing else): a file that
  needs any other code to unpickle is refused, never executed.
* official A-ViT checkpoints (NVlabs/A-ViT): timm's ViT key layout (qkv, proj, fc1, fc2), no extra
  parameters; the gate (gamma, beta) is in the file name: ``tiny-10-30.pth`` -> 10 / 30,
  ``small-10-75.pth`` -> 10 / 75, the demo ``visualization-tiny.pth`` -> 5 / 50 (docs/methods/avit.md#released-settings).
* official AdaViT checkpoints (MengLcool/AdaViT, ``ada_step_deit_*``): separate ``attn.query`` /
  ``attn.key`` / ``attn.value`` linears, per-block gates ``attn.token_select.mlp_head`` (patch),
  ``head_select.mlp_head`` (heads) and ``layer_select.mlp_head`` (MSA / FFN), EMA weights under
  ``state_dict_ema`` (the official evaluation prefers them, docs/methods/adavit.md#checkpoints). They become timm's
  fused ``attn.qkv`` (rows q, k, v in that order, as timm's Attention splits them) and our
  ``adavit_gates.{i}.{patch,head,block}`` (methods/adavit.py).

* official TimeSformer checkpoints (facebookresearch/TimeSformer ``.pyth``): PySlowFast's
  ``{"model_state": ..., "optimizer_state": ..., "cfg": ...}``; the official key names under the
  ``model.`` prefix of its wrapper module (methods/timesformer.py removes it; docs/timesformer.md#checkpoints).

Everything is loaded strictly after renaming (docs/methods/README.md#weights-and-checkpoints: the official repos load with
``strict=False`` somewhere; we fail loudly instead): missing, unexpected and mis-shaped keys are
listed in one message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn



class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""

ADAVIT_GATE_PREFIX = "adavit_gates."  # methods/adavit.py GATE_PREFIX (read, not imported: no cycle)
_ADAVIT_QKV = re.compile(r"^blocks\.(\d+)\.attn\.(query|key|value)\.(weight|bias)$")
_ADAVIT_GATES = {
    "attn.token_select.mlp_head": "patch",
    "head_select.mlp_head": "head",
    "layer_select.mlp_head": "block",
}
_ADAVIT_GATE = re.compile(r"^blocks\.(\d+)\.(attn\.token_select\.mlp_head|head_select\.mlp_head|layer_select\.mlp_head)\.(weight|bias)$")
# A-ViT release names: <anything>-<gamma>-<beta>.pth (README "tiny-10-30.pth", "small-10-75.pth").
_AVIT_NAME = re.compile(r"-(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)\.pth(?:\.tar)?$")
_AVIT_DEMO = {"visualization-tiny.pth": (5.0, 50.0)}  # docs/methods/avit.md#released-settings: the demo checkpoint


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.safetensors`` file, wrappers removed.

    Never runs pickled code: ``weights_only=True`` through timm's loader.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .pth or .safetensors file itself")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except RuntimeError as e:
        if "weights_only" not in str(e):
            raise CheckpointError(f"checkpoint {path} cannot be read ({str(e).splitlines()[0][:200]})") from None
        unsafe = re.search(r"Unsupported globals: (.+?)\.(?:\s|$)", str(e))
        what = f" (it needs {unsafe.group(1)})" if unsafe else ""
        raise CheckpointError(
            f"checkpoint {path} needs arbitrary code to unpickle{what} and is refused (weights_only=True); "
            "re-save its state dict with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
    except Exception as e:  # a truncated or foreign file
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a torch (.pth) or safetensors file ({detail}); "
            "pass a state dict saved with torch.save or safetensors"
        ) from None
    for wrapper in ("module", "model_state"):  # VideoMAE (DeepSpeed); TimeSformer's .pyth (PySlowFast)
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    return dict(state)


def is_adavit_official(state: dict[str, torch.Tensor]) -> bool:
    return any(_ADAVIT_QKV.match(k) for k in state)


def adavit_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official AdaViT (separate q, k, v; gate modules inside the blocks) -> timm + ``adavit_gates``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = _ADAVIT_QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        g = _ADAVIT_GATE.match(k)
        if g:
            out[f"{ADAVIT_GATE_PREFIX}{g.group(1)}.{_ADAVIT_GATES[g.group(2)]}.{g.group(3)}"] = v
            continue
        out[k] = v
    for (block, kind), parts in qkv.items():
        absent = [p for p in ("query", "key", "value") if p not in parts]
        if absent:
            raise CheckpointError(f"AdaViT checkpoint: block {block} has no attn.{'/'.join(absent)}.{kind}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def avit_gate_from_name(path: str | Path | None) -> tuple[float, float] | None:
    """(gate_scale gamma, gate_center beta) that an official A-ViT file name encodes, else None."""
    if not path:
        return None
    name = Path(path).name
    if name in _AVIT_DEMO:
        return _AVIT_DEMO[name]
    m = _AVIT_NAME.search(name)
    return (float(m.group(1)), float(m.group(2))) if m else None


def implied_budgets(path: str | Path | None) -> dict[str, list[str]]:
    """Budgets a checkpoint's file name fixes: the official A-ViT gate (docs/methods/avit.md#released-settings, docs/methods/avit.md#check-avit-9-released-checkpoints)."""
    gate = avit_gate_from_name(path)
    if gate is None:
        return {}
    gamma, beta = (int(v) if v.is_integer() else v for v in gate)
    return {"avit": [f"gate_scale:{gamma}+gate_center:{beta}"]}


@dataclass
class Converted:
    """A checkpoint in our layout: the backbone's keys, plus what methods add on top of it."""

    layout: str  # "timm" or "adavit-official"
    backbone: dict[str, torch.Tensor]
    method_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def convert(state: dict[str, torch.Tensor]) -> Converted:
    """Rename a state dict into timm's layout; method parameters go to ``method_states``."""
    layout = "timm"
    if is_adavit_official(state):
        state, layout = adavit_from_official(state), "adavit-official"
    backbone = {k: v for k, v in state.items() if not k.startswith(ADAVIT_GATE_PREFIX)}
    gates = {k: v for k, v in state.items() if k.startswith(ADAVIT_GATE_PREFIX)}
    return Converted(layout, backbone, {"adavit": gates} if gates else {})


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``model`` exactly, else the missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing keys: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        parts.append(f"shape mismatch (checkpoint vs model): {_few(wrong)}")
    if any(k.startswith(("head_dist.", "dist_token")) for k in unexpected):
        parts.append("it is a distilled DeiT (dist_token, head_dist): pick the matching *_distilled_* backbone")
    return "; ".join(parts)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    problem = mismatch(model, state)
    if problem:
        raise CheckpointError(f"checkpoint {source} does not fit the model ({problem}); check --backbone")
    model.load_state_dict(state, strict=True)
    return model


def load_backbone(vit: nn.Module, path: str | Path) -> Converted:
    """Read ``path``, convert it, load its backbone part into ``vit`` strictly; returns the rest."""
    conv = convert(read_state_dict(path))
    video = getattr(vit, "checkpoint_filter", None)  # VideoMAE keys -> timm keys (methods/video.py)
    if video is not None:
        conv.backbone = video(conv.backbone)
    load_strict(vit, conv.backbone, str(path))
    return conv


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load strictly; a mismatch lists the missing and unexpected keys (docs/methods/README.md#weights-and-checkpoints)."""
    state = read_state_dict(path)
    convert = getattr(model, "checkpoint_filter", None)  # e.g. VideoMAE keys -> timm keys (methods/video.py)
    return load_strict(model, convert(state) if convert else state, str(path))
