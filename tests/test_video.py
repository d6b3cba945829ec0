"""Video ViT (methods/video.py): a timm VisionTransformer over tubelet tokens that every method
adapts unchanged; closed-form GMACs against fvcore; VideoMAE checkpoint key mapping; the
moving-digits data of the video default."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import methods
from bench import cache, config, datasets, runner
from bench.data import moving_digits
from bench.train import accuracy
from conftest import ROOT, shipped_backbone

SHIPPED_MIN_TOP1 = 0.90  # measured 94.0% on the 1000 test clips (run 20261121-104949-video)
from methods.convert import load_checkpoint
from methods.macs import _first_conv_in_channels
from methods.video import TubeletEmbed, VideoVisionTransformer, sinusoid_table


def tiny_digits_video(depth: int = 3) -> VideoVisionTransformer:
    torch.manual_seed(0)
    return timm.create_model("digits_video_vit", depth=depth).eval()


def tiny_videomae(**kw) -> VideoVisionTransformer:
    """VideoMAE's layout (no CLS, mean pooling + fc_norm, plain Conv3d tubelets), tiny."""
    args = dict(img_size=32, patch_size=16, num_frames=4, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    torch.manual_seed(1)
    return timm.create_model("videomae_vit_small_patch16_224", **{**args, **kw}).eval()


def test_video_vit_is_a_timm_vit_with_space_time_tokens():
    vit = tiny_digits_video()
    assert isinstance(vit, VisionTransformer) and isinstance(vit.patch_embed, TubeletEmbed)
    assert vit.patch_embed.grid_size == (4, 4, 4) and vit.patch_embed.num_patches == 64
    tokens = vit.patch_embed(torch.randn(2, 1, 8, 32, 32))
    assert tokens.shape == (2, 64, 96)
    with pytest.raises(ValueError, match=r"expected clips of shape \(B, C, 8, 32, 32\)"):
        vit(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="tubelets"):
        timm.create_model("digits_video_vit", num_frames=7)


def test_tubelet_tokens_are_time_major():
    """Token t*H'*W' + h*W' + w holds tubelet (t, h, w), VideoMAE's flatten order."""
    vit = tiny_videomae(img_size=32, patch_size=16, num_frames=4)
    pe = vit.patch_embed
    x = torch.zeros(1, 3, 4, 32, 32)
    x[:, :, 2:4, 16:32, 0:16] = 1.0  # tubelet t=1, h=1, w=0
    with torch.no_grad():
        tok = pe(x) - pe(torch.zeros_like(x))
    moved = tok.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert moved == [1 * 4 + 1 * 2 + 0]


@pytest.mark.parametrize("make", [tiny_digits_video, tiny_videomae], ids=["digits_video_stem", "videomae_conv3d"])
def test_closed_form_matches_fvcore_on_video_vits(make):
    vit = make()
    shape = methods.vit_shape(vit)
    ours = shape.dense_gmacs()
    c = _first_conv_in_channels(vit.patch_embed)
    t, h, w = vit.patch_embed.input_shape
    from fvcore.nn import FlopCountAnalysis

    for m in vit.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    fca = FlopCountAnalysis(vit, torch.randn(2, c, t, h, w))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    assert ours == pytest.approx(fca.total() / 2 / 1e9, rel=1e-9)
    # the tubelet Conv3d is counted: out elements x in_chans x kernel volume
    if make is tiny_videomae:
        assert shape.embed_macs == vit.patch_embed.num_patches * 32 * 3 * 2 * 16 * 16


def test_videomae_base_is_180_gmacs_per_view():
    """VideoMAE reports 180 GFLOPs (fvcore MACs) per 16x224x224 view for ViT-B."""
    with torch.device("meta"):
        vit = timm.create_model("videomae_vit_base_patch16_224")
    assert methods.vit_shape(vit).num_tokens == 8 * 14 * 14
    assert methods.vit_shape(vit).dense_gmacs() == pytest.approx(180.5, abs=0.5)


@pytest.mark.parametrize("method, knobs", [("deit", {}), ("ats", {"keep": 0.25, "blocks": "1-2"}), ("avit", {}), ("adavit", {})])
def test_every_method_runs_on_video_tokens(method, knobs):
    vit = tiny_digits_video()
    x = torch.randn(3, 1, 8, 32, 32)
    dense = methods.vit_shape(vit).dense_gmacs()
    model = methods.build(method, vit, **knobs).eval()
    with torch.no_grad():
        logits = model(x)
    tr = methods.trace(model)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert tr.tokens.shape == (3, 3) and tr.gmacs.shape == (3,)
    assert int(tr.tokens[:, 0].max()) <= 65
    if method == "deit":
        assert torch.allclose(tr.gmacs, torch.full((3,), dense, dtype=torch.float64))
        with torch.no_grad():
            assert torch.allclose(logits, vit(x), atol=1e-5)
    if method == "ats":  # K = round(0.25 * 65) = 16 tokens leave block 1, so block 2 sees at most 16
        assert int(tr.tokens[:, -1].max()) <= 16
        assert bool((tr.gmacs < dense).all())


@pytest.mark.parametrize("method", ["ats", "adavit"])
def test_cls_reading_methods_refuse_videomae_without_a_class_token(method):
    """ATS scores by CLS attention and AdaViT gates heads/blocks on the CLS token: on VideoMAE's
    ViT (mean pooling, no CLS) both refuse with a clear error rather than read a patch token."""
    with pytest.raises((TypeError, ValueError), match="0 prefix token"):
        methods.build(method, tiny_videomae())


def test_ats_compact_equals_reference_on_video_tokens():
    vit = tiny_digits_video()
    x = torch.randn(4, 1, 8, 32, 32)
    outs = {}
    for mode in ("compact", "reference"):
        model = methods.build("ats", vit, mode=mode, keep=0.3).eval()
        with torch.no_grad():
            outs[mode] = (model(x), methods.trace(model).gmacs)
    assert torch.allclose(outs["compact"][0], outs["reference"][0], atol=1e-4)
    assert torch.allclose(outs["compact"][1], outs["reference"][1])


def _to_videomae_layout(vit: VideoVisionTransformer) -> dict:
    """A state dict as VideoMAE's fine-tuned ViT stores it: q_bias / v_bias beside a bias-free qkv,
    gamma_1 / gamma_2 for layer scale, no pos_embed (a fixed sinusoid table)."""
    out = {}
    for k, v in vit.state_dict().items():
        if k == "pos_embed":
            continue
        if k.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            out[k.replace("qkv.bias", "q_bias")] = q.clone()
            out[k.replace("qkv.bias", "v_bias")] = vb.clone()
        elif ".ls1.gamma" in k or ".ls2.gamma" in k:
            out[k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = v.clone()
        else:
            out[k] = v.clone()
    return out


def _videomae_forward(sd: dict, x: torch.Tensor, heads: int, tubelet: int) -> torch.Tensor:
    """VideoMAE's fine-tuning forward written out from its state dict (independent of timm)."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    x = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(tubelet, p, p)).flatten(2).transpose(1, 2)
    n, c = x.shape[1], x.shape[2]
    x = x + sinusoid_table(n, c)
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        y = F.layer_norm(x, (c,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros_like(sd[b + "attn.v_bias"]), sd[b + "attn.v_bias"]])
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], bias).reshape(x.shape[0], n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * (c // heads) ** -0.5) @ qkv[1].transpose(-2, -1)
        y = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(x.shape[0], n, c)
        y = F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + sd.get(b + "gamma_1", 1.0) * y
        y = F.layer_norm(x, (c,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + sd.get(b + "gamma_2", 1.0) * y
        i += 1
    x = F.layer_norm(x.mean(1), (c,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("layer_scale", [None, 0.1], ids=["plain", "layer_scale"])
def test_videomae_checkpoint_loads_with_key_mapping(tmp_path, layer_scale):
    src = tiny_videomae(init_values=layer_scale)
    with torch.no_grad():  # make the biases that the mapping must place visible
        for blk in src.blocks:
            blk.attn.qkv.bias.normal_()
            if layer_scale:
                blk.ls1.gamma.normal_()
    sd = _to_videomae_layout(src)
    assert "pos_embed" not in sd and "blocks.0.attn.q_bias" in sd and "blocks.0.attn.qkv.bias" not in sd
    path = tmp_path / "videomae_ft.pth"
    torch.save({"module": sd, "epoch": 30}, path)  # VideoMAE saves under "module"

    dst = tiny_videomae(init_values=layer_scale)
    load_checkpoint(dst, path)
    assert torch.equal(dst.blocks[1].attn.qkv.bias[32:64], torch.zeros(32))  # keys carry no bias
    assert torch.equal(dst.blocks[1].attn.qkv.bias[64:], sd["blocks.1.attn.v_bias"])
    assert torch.allclose(dst.pos_embed, sinusoid_table(dst.patch_embed.num_patches, 32))
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        for m in dst.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        assert torch.allclose(dst(x), _videomae_forward(sd, x, heads=2, tubelet=2), atol=1e-5)
        # and the methods run on the loaded model (ATS needs a CLS token, which VideoMAE lacks)
        model = methods.build("avit", dst).eval()
        assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match="CLS"):
        methods.build("ats", dst)


def test_sinusoid_table_is_the_transformer_formula():
    t = sinusoid_table(10, 6)[0]
    assert t.shape == (10, 6)
    assert float(t[3, 4]) == pytest.approx(math.sin(3 / 10000 ** (4 / 6)))
    assert float(t[3, 5]) == pytest.approx(math.cos(3 / 10000 ** (4 / 6)))


def test_wrong_checkpoint_names_the_keys(tmp_path):
    sd = _to_videomae_layout(tiny_videomae(depth=3))
    path = tmp_path / "deeper.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.2\."):
        load_checkpoint(tiny_videomae(depth=2), path)


def test_moving_digits_clips():
    cfg = moving_digits.MovingDigitsConfig(n_train=40, n_test=30)
    x, y = moving_digits.make_split(cfg, "test")
    x2, y2 = moving_digits.make_split(cfg, "test")
    assert x.shape == (30, 1, 8, 32, 32) and torch.equal(x, x2) and torch.equal(y, y2)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and set(y.tolist()) <= set(range(10))
    xt, _ = moving_digits.make_split(cfg, "train")
    assert not torch.equal(xt[:30], x)
    # things move: the ink's centre of mass changes between the first and last frame
    ys = torch.arange(32.0)[:, None]
    com = [(x[:, 0, t] * ys).sum((1, 2)) / x[:, 0, t].sum((1, 2)) for t in (0, 7)]
    assert float((com[0] - com[1]).abs().mean()) > 2.0
    assert 0.3 < moving_digits.empty_tubelet_fraction(x) < 0.8


@pytest.fixture(scope="module")
def shipped_video():
    cfg = config.resolve("video", ROOT / "bench.toml")
    return (cfg, *shipped_backbone(cfg, "bench train backbone --profile video --ship"))


def test_shipped_video_checkpoint_is_in_the_readme_and_classifies_clips(shipped_video):
    cfg, path, vit = shipped_video
    readme = (ROOT / "README.md").read_text()
    assert path.name in readme and cache.file_sha256(path) in readme
    assert runner.backbone_key(cfg) != runner.backbone_key(config.resolve("default", ROOT / "bench.toml"))
    x, y = moving_digits.make_split(datasets.moving_digits_config(cfg), "test", n=300)
    assert accuracy(vit, x, y, data=moving_digits) >= SHIPPED_MIN_TOP1
