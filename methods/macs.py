"""Closed-form multiply-accumulate counts for timm VisionTransformers (docs/counting.md#closed-forms).

Convention (fvcore's, which is what all three papers call "GFLOPs"): one multiply-add = 1, linear
layers count ``rows * in * out`` (bias free), LayerNorm counts 5 per element, BatchNorm in eval 2
per element (affine), convolutions ``out_elems * in/groups * kh * kw``; softmax, GELU, residual
adds and the attention scale count 0. For a pre-LN block with N tokens, width C, attention width A
(= C for timm ViTs) and MLP hidden width H (= r*C):

    block(N) = 3*N*C*A + 2*N^2*A + N*A*C + 2*N*C*H + 10*N*C
             = (3 + 1 + 2r)*N*C^2 + 2*N^2*C + 10*N*C       when A = C, H = r*C

which gives DeiT-T 1.258, DeiT-S 4.608, DeiT-B 17.582 GMACs at 224 (docs/counting.md#check-macs-1-dense-deit-gmacs). The
functions below take plain ints or tensors of token counts, so a per-sample trace turns into
per-sample GMACs without touching the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

Count = Union[int, float, torch.Tensor]


def linear(rows: Count, fan_in: int, fan_out: int) -> Count:
    return rows * fan_in * fan_out


def layernorm(rows: Count, width: int) -> Count:
    return 5 * rows * width


def attention_matmuls(queries: Count, keys: Count, attn_dim: int) -> Count:
    """q @ k^T plus attn @ v: each is queries * keys * attn_dim MACs."""
    return 2 * queries * keys * attn_dim


@dataclass(frozen=True)
class ViTShape:
    """The numbers of a timm VisionTransformer that the closed forms need."""

    embed_dim: int
    attn_dim: int
    mlp_hidden: int
    num_heads: int
    depth: int
    num_prefix_tokens: int
    num_patches: int
    num_classes: int
    embed_macs: int  # patch embedding (or conv stem) per sample
    head_macs: int  # fc_norm + classifier per sample (the final norm depends on tokens)
    final_norm_macs: int  # per element of the final norm: 5 LayerNorm, 4 without affine, 0 none
    norm_macs: int = 5  # per element of the blocks' norms (4: instance norm without affine, methods/variants.py)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def norm(self, rows: Count) -> Count:
        """One of the blocks' norms on ``rows`` tokens."""
        return self.norm_macs * rows * self.embed_dim

    def block(self, n_in: Count, n_out: Count | None = None) -> Count:
        """One pre-LN block. With ``n_out`` < ``n_in`` (ATS-style sampling inside the block), the
        queries kept after attention are ``n_out``: qkv and LN1 on n_in, q@k^T on n_in^2, attn@v on
        n_out*n_in, proj / LN2 / MLP on n_out (docs/methods/ats.md#check-ats-7-block-macs)."""
        c, a, h = self.embed_dim, self.attn_dim, self.mlp_hidden
        if n_out is None:
            n_out = n_in
        return (
            self.norm(n_in)
            + linear(n_in, c, 3 * a)
            + n_in * n_in * a
            + n_out * n_in * a
            + linear(n_out, a, c)
            + self.norm(n_out)
            + linear(n_out, c, h)
            + linear(n_out, h, c)
        )

    def reduced_block(self, n_attn: Count, n_mlp: Count) -> Count:
        """A block whose tokens are reduced between attention and MLP (ToMe merges, EViT fuses,
        docs/counting.md#closed-forms): LN1, qkv, both attention products and proj on ``n_attn``
        tokens, LN2 and the MLP on ``n_mlp``."""
        c, a, h = self.embed_dim, self.attn_dim, self.mlp_hidden
        attention = layernorm(n_attn, c) + linear(n_attn, c, 3 * a) + attention_matmuls(n_attn, n_attn, a) + linear(n_attn, a, c)
        return attention + layernorm(n_mlp, c) + linear(n_mlp, c, h) + linear(n_mlp, h, c)

    def final(self, n_final: Count) -> Count:
        """Final norm over the tokens left at the end, then pooling and the classifier."""
        return self.final_norm_macs * n_final * self.embed_dim + self.head_macs

    def dense_gmacs(self) -> float:
        n = self.num_tokens
        return (self.embed_macs + self.depth * self.block(n) + self.final(n)) / 1e9

    def gmacs_from_tokens(self, tokens: torch.Tensor, n_final: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample GMACs of a model whose blocks each see ``tokens[b, l]`` tokens (dense blocks
        over a per-sample token count, as in A-ViT after token zipping)."""
        t = tokens.to(torch.float64)
        if n_final is None:
            n_final = t[:, -1]
        macs = self.embed_macs + self.block(t).sum(dim=1) + self.final(n_final.to(torch.float64))
        return macs / 1e9


@dataclass(frozen=True)
class DividedViTShape(ViTShape):
    """TimeSformer's divided space-time block (methods/timesformer.py, docs/timesformer.md#gmacs).

    With ``n = 1 + T*P`` tokens (P patches per frame, the same in every frame):

        temporal = LN(T*P) + qkv(T*P) + P * 2*T^2*A + proj(T*P) + temporal_fc(T*P, C x C)
        spatial  = LN(T*(P+1)) + qkv(T*(P+1)) + T * 2*(P+1)^2*A + proj(T*(P+1))   (CLS copied per frame)
        mlp      = LN(n) + fc1(n) + fc2(n)

    The CLS average over frames and the residual adds count 0, as everywhere here.
    """

    frames: int = 1

    def block(self, n_in: Count, n_out: Count | None = None) -> Count:
        if n_out is not None:
            raise NotImplementedError("no closed form yet for token sampling inside a divided space-time block")
        c, a, h, t = self.embed_dim, self.attn_dim, self.mlp_hidden, self.frames
        per_frame = (n_in - self.num_prefix_tokens) / t
        rows_t, rows_s = t * per_frame, t * (per_frame + 1)
        temporal = (layernorm(rows_t, c) + linear(rows_t, c, 3 * a) + per_frame * attention_matmuls(t, t, a)
                    + linear(rows_t, a, c) + linear(rows_t, c, c))
        spatial = (layernorm(rows_s, c) + linear(rows_s, c, 3 * a) + t * attention_matmuls(per_frame + 1, per_frame + 1, a)
                   + linear(rows_s, a, c))
        mlp = layernorm(n_in, c) + linear(n_in, c, h) + linear(n_in, h, c)
        return temporal + spatial + mlp


def _leaf_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    # The whole output counts: the example is one sample, which a per-frame embedding (TimeSformer's
    # Conv2d over every frame, methods/timesformer.py) runs as a batch of T images.
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):  # Conv3d: video tubelet embeddings
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return (out.numel() // module.out_features) * module.in_features * module.out_features
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return inp[0].numel() * (2 if module.affine else 1)
    if isinstance(module, nn.LayerNorm):
        return inp[0].numel() * (5 if module.elementwise_affine else 4)
    if any(p is not None for p in module.parameters(recurse=False)):
        raise NotImplementedError(
            f"no closed form for a {type(module).__name__} in the patch embedding; add one to methods/macs.py"
        )
    return 0


@torch.no_grad()
def _module_macs(module: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``module`` on one sample, by walking its leaf modules with the shapes they see."""
    total = 0

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += _leaf_macs(m, inp, out if isinstance(out, torch.Tensor) else out[0])

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = module.training
    try:
        module.eval()
        module(example)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return int(total)


def vit_shape(vit: nn.Module) -> ViTShape:
    """Read the closed-form parameters off a timm VisionTransformer (cached on the module)."""
    cached = getattr(vit, "_bench_vit_shape", None)
    if cached is not None:
        return cached
    blocks = list(vit.blocks)
    blk = blocks[0]
    attn = blk.attn
    embed_dim = vit.embed_dim
    attn_dim = attn.qkv.out_features // 3 if hasattr(attn, "qkv") else 0  # 0: a Mixer block (methods/variants.py)
    mlp_hidden = blk.mlp.fc1.out_features
    pe = vit.patch_embed
    in_chans = _first_conv_in_channels(pe)
    # (C, H, W) for images; (C, T, H, W) for a video tubelet embedding (methods/video.py)
    sample = (in_chans, *getattr(pe, "input_shape", pe.img_size))
    param = next(vit.parameters())
    example = torch.zeros(1, *sample, device=param.device, dtype=param.dtype)
    embed_macs = _module_macs(pe, example)
    head_macs = 0
    fc_norm = getattr(vit, "fc_norm", nn.Identity())
    if isinstance(fc_norm, nn.LayerNorm):
        head_macs += layernorm(1, embed_dim)
    if isinstance(vit.head, nn.Linear):
        head_macs += linear(1, vit.head.in_features, vit.head.out_features)
    fields = dict(
        embed_dim=embed_dim,
        attn_dim=attn_dim,
        mlp_hidden=mlp_hidden,
        num_heads=getattr(attn, "num_heads", 0),
        depth=len(blocks),
        num_prefix_tokens=vit.num_prefix_tokens,
        num_patches=pe.num_patches,
        num_classes=vit.num_classes,
        embed_macs=embed_macs,
        head_macs=int(head_macs),
        final_norm_macs=norm_macs_per_element(vit.norm, other=0),
        norm_macs=norm_macs_per_element(blk.norm1, other=5),
    )
    if getattr(vit, "attention_layout", "joint") == "divided":  # TimeSformer (methods/timesformer.py)
        shape = DividedViTShape(frames=int(vit.num_frames), **fields)
    elif hasattr(vit, "bench_make_shape"):  # a backbone with its own block closed form (methods/variants.py)
        shape = vit.bench_make_shape(fields)
    else:
        shape = ViTShape(**fields)
    vit.__dict__["_bench_vit_shape"] = shape  # plain attribute, not a registered buffer
    return shape


def norm_macs_per_element(norm: nn.Module, other: int) -> int:
    """fvcore's count per element of a norm: 5 with an affine scale and shift, 4 without, 0 none;
    ``other`` for any other module (what these closed forms assumed before norms varied)."""
    if isinstance(norm, nn.LayerNorm):
        return 5 if norm.elementwise_affine else 4
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        return 5 if norm.affine else 4
    return 0 if isinstance(norm, nn.Identity) else other


def _first_conv_in_channels(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    raise ValueError("the patch embedding has no Conv2d or Conv3d; cannot infer its input channels")


_COEFFS: dict[ViTShape, tuple[float, ...]] = {}


def sampled_gmacs(shape: ViTShape, t_in: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
    """Per-sample GMACs of a model whose blocks keep fewer queries than they read (ATS,
    docs/methods/ats.md#check-ats-7-block-macs): embed + sum_l block(n_in_l, n_out_l) + final(n_last),
    from (B, depth) tokens entering and leaving each block.

    ``ViTShape.block(n_in, n_out)`` is a polynomial a*n_in + b*n_in^2 + c*n_in*n_out + d*n_out; its
    coefficients are read off the public closed form once, so a forward pays a handful of tensor
    ops instead of the full expression (the tests check both agree).
    """
    if shape not in _COEFFS:
        f = shape.block
        ab = f(1, 0)
        bq = (f(2, 0) - 2 * ab) / 2
        cq = (f(2, 1) - f(2, 0)) - (f(1, 1) - f(1, 0))
        dq = (f(1, 1) - f(1, 0)) - cq
        fin = shape.final(1) - shape.final(0)
        _COEFFS[shape] = (float(ab - bq), float(bq), float(cq), float(dq), float(fin), float(shape.embed_macs + shape.final(0)))
    a, bq, cq, dq, fin, const = _COEFFS[shape]
    n_in, n_out = t_in.double(), t_out.double()
    macs = (n_in * (a + bq * n_in + cq * n_out) + dq * n_out).sum(dim=1) + fin * n_out[:, -1] + const
    return macs / 1e9


# AdaViT's shipped lookup table (docs/methods/adavit.md#the-shipped-lookup-table)


def official_block_macs(embed_dim: int, num_heads: int, mlp_hidden: int, num_tokens_total: int, heads, tokens, attn, mlp):
    """One block's MACs as AdaViT's shipped lookup table counts them (docs/methods/adavit.md#the-shipped-lookup-table):

        T = 5*N*C*(1 + a) + a*(3*t*C*c + 2*t^2*c + t*c^2) + m*(t*c*rC + t*rC*C),   c = C*h/H

    with N the model's full token count (LayerNorms are counted on all tokens), t the kept tokens
    including CLS, h the kept heads, a / m the MSA / FFN on-off; an entry with h = 0 is 0. Works
    on ints or tensors (element-wise); the h = 0 rule needs tensors or ints alike.
    """
    c_full, rc = embed_dim, mlp_hidden
    c = c_full * heads / num_heads
    t = tokens
    total = (
        5 * num_tokens_total * c_full * (1 + attn)
        + attn * (3 * t * c_full * c + 2 * t * t * c + t * c * c)
        + mlp * (t * c * rc + t * rc * c_full)
    )
    if isinstance(total, torch.Tensor):
        return torch.where(torch.as_tensor(heads) == 0, torch.zeros_like(total), total)
    return 0 if heads == 0 else total


def official_table_tokens(t: int, num_tokens_total: int = 197) -> int:
    """The token count the shipped table's entry t was really built with: the script keeps
    int(float32(t / N) * N) tokens, which is t - 1 for t in {13, 26, 51, 52, 53, 102, 104, 106,
    117, 119, 121} at N = 197 (docs/methods/adavit.md#the-shipped-lookup-table, docs/methods/adavit.md#check-adavit-4-lookup-table-closed-form)."""
    ratio = torch.tensor(t / num_tokens_total, dtype=torch.float32)
    return int(ratio * num_tokens_total)


def official_table_entry(embed_dim: int, num_heads: int, mlp_hidden: int, num_tokens_total: int, heads: int, tokens: int, attn: int, mlp: int) -> float:
    """Entry T[h, t, a, m] of the shipped ``*_flops_dict.pth`` tables in G, truncation included."""
    t = official_table_tokens(tokens, num_tokens_total)
    return official_block_macs(embed_dim, num_heads, mlp_hidden, num_tokens_total, heads, t, attn, mlp) / 1e9
