import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's checkpoint cache; shipped checkpoints still count."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def bench_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("bench")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bench.cli"]


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``bench ARGS`` in this process (the console script's entry point): exit code, stdout, stderr."""
    from bench import cli

    monkeypatch.setattr(sys, "argv", ["bench", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def shipped_backbone(cfg, ship_cmd: str):
    """The shipped backbone checkpoint of a profile's config and the backbone loaded from it (eval);
    fails (not skips) when it is missing, naming the command that ships it."""
    from bench import cache, runner
    from methods.convert import load_checkpoint

    key = cache.config_key(runner.backbone_key(cfg))
    path = cache.ASSETS / f"{cfg.backbone}-{key}.safetensors"
    if not path.is_file():
        pytest.fail(f"no shipped checkpoint for the {cfg.profile} profile (key {key}); run `{ship_cmd}`")
    vit = runner.create_backbone(cfg)
    load_checkpoint(vit, path)
    return path, vit.eval()


def quick_timing(profile: str, timing_samples: int = 2) -> str:
    """A bench.toml ``[profiles.PROFILE.timing]`` table that times each cell for two iterations:
    the measurement path runs end to end in tests without spending seconds on it."""
    return f"""
[profiles.{profile}.timing]
warmup_iters = 1
min_iters = 2
max_iters = 2
min_seconds = 0.0
timing_samples = {timing_samples}
memory_iters = 1
"""


def fvcore_gmacs_of(model, x) -> float:
    """fvcore's GMACs of ``model`` on ``x`` (all samples together), with timm's fused attention
    switched off so that fvcore sees both attention matmuls (docs/counting.md#what-fvcore-counts)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        fca = FlopCountAnalysis(model, x)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        return fca.total() / 1e9


def sharpened_digits(std: float = 0.12, seed: int = 0):
    """The digits ViT with random weights whose attention is sharpened (a fixed seed), so that
    tokens score differently as in a trained model (timm's init scores them nearly the same)."""
    import timm
    import torch

    torch.manual_seed(seed)
    vit = timm.create_model("digits_vit").eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.normal_(0, std)
        vit.pos_embed.normal_(0, 1.0)
    return vit
