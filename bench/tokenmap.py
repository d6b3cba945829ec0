"""Where each method spent its compute on a few test images: blocks per token, for report plot 5.

The run stores these maps (``raw/<cell>.npz`` key ``token_blocks``) and the images they belong to
(``raw/overlay_images.npz``), so a report is drawn from the results folder alone: no model, no
checkpoint cache and no data set is needed again, and a run measured on another machine (a GPU box)
is reported anywhere. The maps are read from each method's own trace (docs/design.md#contracts):
A-ViT's per-token halting depths, ATS's kept token indices per stage, AdaViT's
per-block kept-patch masks (docs/methods/avit.md#trace-fields, docs/methods/ats.md#trace-fields, docs/methods/adavit.md#trace-fields).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import methods

from .kernels import is_oom
from .measure import autocast

N_IMAGES = 6  # the first test images of the seeded timing list, the same for every method
IMAGES_FILE = "raw/overlay_images.npz"


def enters(model: nn.Module, trace: methods.Trace) -> torch.Tensor | None:
    """(B, depth, N) bool: token n (prefix tokens first, original order) entered block l.

    None for a method whose trace has no per-token record. Summing over N gives ``trace.tokens``.
    """
    tokens = trace.tokens
    b, depth = tokens.shape
    n = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
    method = getattr(model, "bench_method", "")
    if method == "deit":
        return torch.ones(b, depth, n, dtype=torch.bool)
    if method == "avit":
        return trace.depths.cpu().unsqueeze(1) > torch.arange(depth).view(1, depth, 1)
    if method == "adavit":
        return trace.patch_keep.cpu().bool()
    if method == "ats":
        # Stage j (ATS in block s_j) keeps kept_index[j]; those tokens enter blocks s_j+1 .. s_{j+1}.
        stages = sorted(b_ if b_ >= 0 else depth + b_ for b_ in model.ats_config.blocks)
        out = torch.zeros(b, depth, n, dtype=torch.bool)
        out[:, : stages[0] + 1] = True
        for j, kept in enumerate(trace.kept_index):
            last = stages[j + 1] if j + 1 < len(stages) else depth - 1
            member = torch.zeros(b, n + 1, dtype=torch.bool)  # column n catches -1 (padding)
            member.scatter_(1, kept.cpu().long().where(kept.cpu() >= 0, n), True)
            out[:, stages[j] + 1 : last + 1] = member[:, None, :n]
        return out
    return None


@torch.inference_mode()
def token_blocks(model: nn.Module, images: torch.Tensor, precision: str) -> np.ndarray | None:
    """(K, N) int16: number of blocks that computed each token of each image (prefix included).

    None for a method with no per-token record, or where even these few images run out of memory
    (the cell's OOM columns tell that story; the report leaves the method out of plot 5)."""
    model.eval()
    try:
        with autocast(images.device, precision):
            model(images)
    except Exception as e:
        if not is_oom(e):
            raise
        return None
    trace = methods.trace(model)
    mask = enters(model, trace)
    if mask is None:
        return None
    return mask.sum(dim=1).to(torch.int16).numpy()


def image_record(vit: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The overlay images as uint8 (K, H, W, C), min-max scaled per image for display, and the
    patch grid and prefix-token count needed to place a token's value on the image."""
    x = images.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    pixels = ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    return {"images": pixels.numpy(), "grid": np.asarray(grid), "prefix_tokens": np.asarray(int(vit.num_prefix_tokens)),
            "depth": np.asarray(len(vit.blocks))}
