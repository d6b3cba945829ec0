"""Where each method spent its compute on a few test images: blocks per token, for report plot 5.

The run stores these maps (``raw/<cell>.npz`` key ``token_blocks``) and the images they belong to
(``raw/overlay_images.npz``), so a report is drawn from the results folder alone: no model, no
checkpoint cache and no data set is needed again, and a run measured on another machine (a GPU box)
is reported anywhere. Each method's model says which tokens entered which block from its own trace
(``tokens_entered``, docs/design.md#contracts).
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
    mask = model.tokens_entered(methods.trace(model))
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
