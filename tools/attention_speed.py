"""Padded attention on CPU: fused SDPA against the explicit product, side by side, over key lengths.

    .venv/bin/python tools/attention_speed.py                          # embedded default shapes
    .venv/bin/python tools/attention_speed.py --batch 1 --heads 6 --head-dim 64 --lengths 32,55,100,197

Each line: median microseconds of each kernel (calls interleaved, the same padded buffer and key
mask, 20% of the keys of each sample masked), and their ratio. This is what sets
``methods.attention.EXPLICIT_MAX_LEN``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def explicit(q, k, v, mask):
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min).softmax(-1) @ v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--lengths", default="4,8,16,24,32,40,48,56,65")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for length in (int(s) for s in args.lengths.split(",")):
        q, k, v = (torch.randn(args.batch, args.heads, length, args.head_dim) for _ in range(3))
        mask = torch.rand(args.batch, 1, 1, length) > 0.2
        mask[..., 0] = True
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        err = float((explicit(q, k, v, mask) - ref).abs().max())
        times = {"sdpa": [], "explicit": []}
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "explicit": lambda: explicit(q, k, v, mask)}
        for i in range(args.iters + 10):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if i >= 10:
                    times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) * 1e6 for n, t in times.items()}
        print(json.dumps({
            "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "length": length,
            "sdpa_us": round(med["sdpa"], 1), "explicit_us": round(med["explicit"], 1),
            "explicit_speedup": round(med["sdpa"] / med["explicit"], 2), "max_abs_diff": err,
        }), flush=True)


if __name__ == "__main__":
    main()
