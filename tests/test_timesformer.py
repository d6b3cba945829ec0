"""TimeSformer (methods/timesformer.py): divided space-time attention with a CLS token as a timm
VisionTransformer; the official checkpoint layout loads strictly; the divided closed form against
fvcore; the timesformer profile on the real Kinetics fixture (docs/timesformer.md)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import methods
from bench import config, runner, video
from bench.errors import UsageError
from bench.progress import Reporter
from conftest import FIXTURES, ROOT, quick_timing, run_main
from methods.convert import CheckpointError, load_checkpoint
from methods.convert import load_backbone
from methods.timesformer import FramePatchEmbed, TimeSformer

MINI = FIXTURES / "kinetics-mini"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"fixture folder {MINI} is absent")
TINY = dict(img_size=32, num_frames=4, embed_dim=32, depth=2, num_heads=2, num_classes=7)  # 4 x 2x2 patches + CLS


def tiny_timesformer(**kw) -> TimeSformer:
    torch.manual_seed(0)
    return timm.create_model("timesformer_base_patch16_224", **{**TINY, **kw}).eval()


def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter random (the official init leaves temporal_fc zero after block 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def official_order_forward(model: TimeSformer, x: torch.Tensor) -> torch.Tensor:
    """The official forward re-stated in its own token order (position-major: token 1 + n*T + t is
    patch n of frame t), with the model's submodules, to check our time-major layout against it."""
    b, t, d = x.shape[0], model.num_frames, model.embed_dim
    n = model.patch_embed.patches_per_frame
    tok = model.patch_embed.proj(x.transpose(1, 2).flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, N, D)
    tok = (tok + model.pos_embed[:, 1:]).view(b, t, n, d).transpose(1, 2)  # (B, N, T, D)
    tok = (tok + model.time_embed[:, None]).reshape(b, n * t, d)
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(b, 1, d), tok], dim=1)
    for blk in model.blocks:
        cls, patches = x[:, :1], x[:, 1:]
        res_t = blk.temporal_attn(blk.temporal_norm1(patches.reshape(b * n, t, d))).reshape(b, n * t, d)
        xt = patches + blk.temporal_fc(res_t)
        per_frame = xt.view(b, n, t, d).transpose(1, 2).reshape(b * t, n, d)
        res_s = blk.attn(blk.norm1(torch.cat([cls.repeat(1, t, 1).reshape(b * t, 1, d), per_frame], dim=1)))
        cls_res = res_s[:, 0].view(b, t, d).mean(dim=1, keepdim=True)
        patch_res = res_s[:, 1:].reshape(b, t, n, d).transpose(1, 2).reshape(b, n * t, d)
        x = torch.cat([cls, xt], dim=1) + torch.cat([cls_res, patch_res], dim=1)
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x)[:, 0])


def official_shapes(d=32, t=4, n=4, patch=16, classes=7, depth=2, hidden=128) -> dict[str, tuple]:
    """Key -> shape of the official ViT-B TimeSformer state dict (timesformer/models/vit.py layout)."""
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d), "time_embed": (1, t, d),
              "patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,), "head.weight": (classes, d), "head.bias": (classes,)}
    linears = {"temporal_attn.qkv": (3 * d, d), "temporal_attn.proj": (d, d), "temporal_fc": (d, d),
               "attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden)}
    for i in range(depth):
        for name in ("temporal_norm1", "norm1", "norm2"):
            shapes[f"blocks.{i}.{name}.weight"] = shapes[f"blocks.{i}.{name}.bias"] = (d,)
        for name, (out, inp) in linears.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (out, inp), (out,)
    return shapes


def save_official(path, shapes: dict[str, tuple], seed: int = 2) -> dict[str, torch.Tensor]:
    """A PySlowFast-style .pyth: model_state under the wrapper's ``model.`` prefix, plus the
    epoch, optimizer state and config string that its checkpoints carry. Returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    torch.save({"epoch": 15, "model_state": {f"model.{k}": v for k, v in tensors.items()},
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.005, "momentum": 0.9, "params": [0, 1]}]},
                "cfg": "TIMESFORMER:\n  ATTENTION_TYPE: divided_space_time\n"}, path)
    return tensors


def test_timesformer_is_a_timm_vit_with_frame_patches():
    vit = tiny_timesformer()
    assert isinstance(vit, VisionTransformer) and isinstance(vit.patch_embed, FramePatchEmbed)
    pe = vit.patch_embed
    assert (pe.num_frames, pe.img_size, pe.patches_per_frame, pe.num_patches) == (4, (32, 32), 4, 16)
    assert vit.num_prefix_tokens == 1 and vit.cls_token.shape == (1, 1, 32)
    assert vit.pos_embed.shape == (1, 5, 32) and vit.time_embed.shape == (1, 4, 32)
    assert vit(torch.randn(2, 3, 4, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match=r"expected clips of shape \(B, C, 4, 32, 32\)"):
        vit(torch.randn(2, 3, 8, 32, 32))


def test_patch_tokens_are_time_major():
    """Token t*N + h*W' + w (after CLS) is patch (h, w) of frame t, as methods/video.py's order."""
    pe = tiny_timesformer(img_size=(32, 48)).patch_embed  # 2 x 3 patches per frame
    x = torch.zeros(1, 3, 4, 32, 48)
    x[:, :, 2, 16:32, 16:32] = 1.0  # frame 2, patch (1, 1)
    with torch.no_grad():
        moved = (pe(x) - pe(torch.zeros_like(x))).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert moved == [2 * 6 + 1 * 3 + 1]


def test_temporal_step_mixes_one_position_and_spatial_step_one_frame():
    blk = randomize(tiny_timesformer()).blocks[0]
    patches = torch.randn(1, 16, 32)  # 4 frames x 4 positions, time-major
    bumped = patches.clone()
    bumped[0, 2 * 4 + 3] += torch.randn(32)  # frame 2, position 3 (not a constant: LayerNorm removes those)
    with torch.no_grad():
        moved_t = (blk.temporal(bumped) - blk.temporal(patches)).abs().sum(-1)[0]
        cls = torch.randn(1, 1, 32)
        _, base = blk.spatial(cls, patches)
        _, bump = blk.spatial(cls, bumped)
        moved_s = (bump - base).abs().sum(-1)[0]
    assert (moved_t > 1e-6).nonzero().flatten().tolist() == [3, 7, 11, 15]  # position 3 of every frame
    assert (moved_s > 1e-6).nonzero().flatten().tolist() == [8, 9, 10, 11]  # every position of frame 2


def test_forward_equals_the_official_position_major_statement():
    vit = randomize(tiny_timesformer())
    x = torch.randn(3, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(x), official_order_forward(vit, x), atol=1e-5)


def test_state_dict_has_the_official_names_and_shapes():
    vit = tiny_timesformer()
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == official_shapes()


@pytest.mark.parametrize("loader", [load_backbone, load_checkpoint], ids=["runner", "api"])
def test_official_pyth_loads_strictly(tmp_path, loader):
    path = tmp_path / "TimeSformer_divST_4x16_32_tiny.pyth"
    tensors = save_official(path, official_shapes())
    vit = tiny_timesformer()
    loader(vit, path)
    state = vit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(x), official_order_forward(vit, x), atol=1e-5)


def test_what_does_not_fit_is_listed(tmp_path):
    other = tmp_path / "k600_8frames.pyth"
    save_official(other, {**official_shapes(), "head.weight": (600, 32), "head.bias": (600,), "time_embed": (1, 8, 32)})
    with pytest.raises(CheckpointError, match=r"shape mismatch .*time_embed \(1, 8, 32\) vs \(1, 4, 32\).*head\.weight \(600, 32\) vs \(7, 32\)"):
        load_checkpoint(tiny_timesformer(), other)
    joint = tmp_path / "jointST.pyth"  # the joint space-time model has no temporal_* parameters
    save_official(joint, {k: s for k, s in official_shapes().items() if ".temporal_" not in k})
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.0\.temporal_norm1\.weight"):
        load_checkpoint(tiny_timesformer(), joint)


def test_closed_form_matches_fvcore_per_view():
    from fvcore.nn import FlopCountAnalysis

    vit = randomize(tiny_timesformer(img_size=(32, 48)))
    shape = methods.vit_shape(vit)
    for m in vit.modules():  # fvcore cannot see fused SDPA
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    fca = FlopCountAnalysis(vit, torch.randn(2, 3, 4, 32, 48))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    assert shape.num_tokens == 1 + 4 * 6
    assert shape.dense_gmacs() == pytest.approx(fca.total() / 2 / 1e9, rel=1e-9)
    assert shape.embed_macs == 4 * 6 * 32 * 3 * 16 * 16  # every frame's Conv2d, not one frame's


def test_timesformer_base_is_196_gmacs_per_view():
    """fvcore on the full 8x224 model counts 196.053 GMACs (docs/timesformer.md#gmacs)."""
    with torch.device("meta"):
        vit = timm.create_model("timesformer_base_patch16_224")
    shape = methods.vit_shape(vit)
    assert (shape.num_tokens, shape.frames) == (8 * 196 + 1, 8)
    assert shape.dense_gmacs() == pytest.approx(196.053, abs=1e-3)


def test_deit_is_the_backbone_and_the_other_methods_refuse():
    vit = randomize(tiny_timesformer())
    x = torch.randn(2, 3, 4, 32, 32)
    model = methods.build("deit", vit)
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x))
    tr = methods.trace(model)
    assert tr.tokens.tolist() == [[17, 17], [17, 17]]
    assert torch.allclose(tr.gmacs, torch.full((2,), methods.vit_shape(vit).dense_gmacs(), dtype=torch.float64))
    for method in ("ats", "avit", "adavit"):
        with pytest.raises(ValueError, match=f"^{method} is not adapted to TimeSformer's divided space-time attention"):
            methods.build(method, vit)


def test_timesformer_profile_is_the_official_test_protocol():
    cfg = config.resolve("timesformer", ROOT / "bench.toml")
    assert (cfg.backbone, cfg.methods, cfg.dataset) == ("timesformer_base_patch16_224", ["deit"], "kinetics400")
    with torch.device("meta"):
        vit = runner.create_backbone(cfg)
    s = video.sampling_for(cfg, vit)
    assert (s.frames, s.stride, s.clips, s.crops, s.size, s.short_side) == (8, 32, 1, 3, 224, 224)
    assert (s.mean, s.std) == ((0.45,) * 3, (0.225,) * 3)


@needs_mini
def test_other_methods_stop_the_run_with_one_line(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "run", "--profile", "timesformer", "--methods", "deit,ats",
                            "--checkpoint", "random", "--data", str(MINI / "val"), "--quiet")
    assert code == 2 and "Traceback" not in err
    assert "method 'ats' cannot run on backbone 'timesformer_base_patch16_224' (ats is not adapted" in err


def _fixture_profile(tmp_path, name: str, extra: str):
    toml = tmp_path / "bench.toml"
    toml.write_text((ROOT / "bench.toml").read_text() + f"""
[profiles.{name}]
extends = "timesformer"
batch_sizes = [1]
{extra}
""" + quick_timing(name))
    return toml


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


@needs_mini
def test_fixture_runs_end_to_end_on_a_tiny_timesformer(tmp_path):
    """Every fixture clip, 3 views each; the corrupt clip stops the run naming it, or is skipped."""
    data = tmp_path / "mini"
    shutil.copytree(MINI / "val", data / "val")
    shutil.copy(MINI / "corrupted.mp4", data / "val" / "abseiling" / "corrupted.mp4")
    toml = _fixture_profile(tmp_path, "tsmini", """
[profiles.tsmini.model]
img_size = 32
embed_dim = 32
depth = 2
num_heads = 2
[profiles.tsmini.video]
stride = 8
short_side = 40
""")
    flags = dict(data=str(data), checkpoint="random", out=str(tmp_path / "results"))
    with pytest.raises(UsageError, match=r"cannot decode video .*abseiling/corrupted\.mp4.*--skip-corrupt"):
        runner.execute(config.resolve("tsmini", toml, **flags), Reporter(quiet=True))
    cfg = config.resolve("tsmini", toml, skip_corrupt=True, **{**flags, "out": str(tmp_path / "skipping")})
    run = runner.execute(cfg, Reporter(quiet=True))
    assert run.manifest()["status"] == "complete" and run.manifest()["dataset"]["skipped_corrupt"] == 1
    (r,) = _records(run.path)
    assert (r["method"], r["views"], r["n_samples"]) == ("deit", 3, 12)
    assert r["gmacs"] == pytest.approx(methods.vit_shape(runner.create_backbone(cfg)).dense_gmacs())
    assert r["gmacs_per_video"] == pytest.approx(3 * r["gmacs"])


@needs_mini
@pytest.mark.slow
def test_fixture_runs_end_to_end_at_224(tmp_path):
    """`bench run` with the real TimeSformer-B (8 frames of 224, 3 crops) on two real clips: the one slow check."""
    toml = _fixture_profile(tmp_path, "ts224", "test_samples = 2")
    cmd = [sys.executable, "-m", "bench", "run", "--config", str(toml), "--profile", "ts224", "--data", str(MINI / "val"),
           "--checkpoint", "random", "--out", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    (r,) = _records(next((tmp_path / "results").iterdir()))
    assert (r["backbone"], r["views"], r["n_samples"]) == ("timesformer_base_patch16_224", 3, 2)
    assert r["gmacs"] == pytest.approx(196.053, abs=1e-3) and r["gmacs_per_video"] == pytest.approx(3 * 196.053, abs=3e-3)
    assert r["latency_ms_p50"] > 0
