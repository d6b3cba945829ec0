"""Cost per token row of DeiT-S's linear layers as the row count drops (CPU, fp32).

    .venv/bin/python tools/gemm_rows.py
    .venv/bin/python tools/gemm_rows.py --rows 55,100,128,197 --threads 2

Compact execution runs the same weights on fewer rows; when the GEMM library is less efficient on
fewer rows, the wall-clock saving falls short of the MAC saving even with no other overhead. Each
line: microseconds per row of qkv, proj, fc1 and fc2 at that row count, timed round-robin over the
row counts so machine noise hits them alike, and their sum relative to the sum at the largest count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}  # (in, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="55,70,88,100,113,139,197")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    weights = {n: (torch.randn(o, i, generator=g), torch.randn(o, generator=g)) for n, (i, o) in SHAPES.items()}
    inputs = {(n, m): torch.randn(m, SHAPES[n][0], generator=g) for n in SHAPES for m in rows}
    times: dict = {key: [] for key in inputs}
    with torch.no_grad():
        for r in range(args.rounds + 10):
            for (n, m), x in inputs.items():
                w, b = weights[n]
                t0 = time.perf_counter()
                F.linear(x, w, b)
                if r >= 10:
                    times[(n, m)].append(time.perf_counter() - t0)
    per_row = {key: statistics.median(t) / key[1] * 1e6 for key, t in times.items()}
    top = max(rows)
    ref = sum(per_row[(n, top)] for n in SHAPES)
    for m in rows:
        row = {"rows": m, **{f"{n}_us_per_row": round(per_row[(n, m)], 2) for n in SHAPES}}
        row["block_cost_per_row_vs_%d" % top] = round(sum(per_row[(n, m)] for n in SHAPES) / ref, 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
