"""Kinetics loaders (bench/data/kinetics.py, bench/video.py): both layouts, labels by the full class
list, PyAV decoding in DataLoader workers, clip sampling and multi-view testing, corrupt videos named
or skipped. Clips are written here with PyAV; ../shared/fixtures/kinetics-mini is used where present."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import config, runner
from bench.data import kinetics
from bench.errors import UsageError
from bench.progress import Reporter
from bench.video import load_kinetics
from conftest import FIXTURES, ROOT, quick_timing

MINI = FIXTURES / "kinetics-mini"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"fixture folder {MINI} is absent")
K400 = kinetics.CLASS_LISTS[400].read_text().splitlines()


def write_clip(path, frames=40, width=64, height=48):
    """An h264 clip whose green channel encodes the frame index (20 + 5 i) and whose red channel
    ramps from left (0) to right (255)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = ramp[None, :]
            img[..., 1] = 20 + 5 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_class_folders_are_labelled_by_kinetics400_index(tmp_path):
    for name in ("zumba", "abseiling", "massaging_persons_head", "passing American football (in game)"):
        write_clip(tmp_path / "val" / name / "a.mp4", frames=4)
    items, info = kinetics.discover(tmp_path, 400)
    labels = sorted({label for _, label in items})
    assert len(K400) == 400 and K400[0] == "abseiling" and K400[-1] == "zumba"
    assert labels == sorted([0, 399, K400.index("massaging person's head"), K400.index("passing American football (in game)")])
    assert info["layout"] == "class_folders" and info["n"] == 4


def test_unknown_class_folder_is_named(tmp_path):
    write_clip(tmp_path / "val" / "juggling_chainsaws" / "a.mp4", frames=2)
    with pytest.raises(kinetics.LayoutError, match="juggling_chainsaws"):
        kinetics.discover(tmp_path, 400)


def test_official_csv_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "arm wrestling,-0aB_c1x9,5,15,val\n"
        "zumba,Zz123,170,180,val\n"
        "zumba,gone4ever,0,10,val\n"  # taken down: not on disk
    )
    write_clip(tmp_path / "val" / "-0aB_c1x9_000005_000015.mp4", frames=3)
    write_clip(tmp_path / "val" / "zumba" / "Zz123_000170_000180.mp4", frames=3)
    items, info = kinetics.discover(tmp_path, 400)
    assert [(p.name, label) for p, label in items] == [("-0aB_c1x9_000005_000015.mp4", 6), ("Zz123_000170_000180.mp4", 399)]
    assert info["layout"] == "csv" and info["missing_on_disk"] == 1 and info["splits"] == ["val"]
    # the CSV itself may be given as --data
    assert kinetics.discover(tmp_path / "annotations" / "val.csv", 400)[0] == items


def test_csv_errors_name_the_problem(tmp_path):
    (tmp_path / "val.csv").write_text("youtube_id,time_start,time_end\nabc,0,10\n")
    with pytest.raises(kinetics.LayoutError, match="missing column.*label"):
        kinetics.discover(tmp_path, 400)
    (tmp_path / "val.csv").write_text("label,youtube_id,time_start,time_end\nnew class,abc,0,10\n")
    with pytest.raises(kinetics.LayoutError, match="new class"):
        kinetics.discover(tmp_path, 400)
    (tmp_path / "val.csv").write_text("label,youtube_id,time_start,time_end\nzumba,abc,0,10\n")
    with pytest.raises(kinetics.LayoutError, match="none of its 1 clips"):
        kinetics.discover(tmp_path, 400)


def test_kinetics600_needs_a_full_class_list(tmp_path):
    write_clip(tmp_path / "zumba" / "a.mp4", frames=2)
    with pytest.raises(kinetics.LayoutError, match="classes.txt"):
        kinetics.discover(tmp_path, 600)
    names = sorted(K400 + [f"extra class {i:03d}" for i in range(200)])
    (tmp_path / "classes.txt").write_text("\n".join(names))
    items, _ = kinetics.discover(tmp_path, 600)
    assert items[0][1] == names.index("zumba")


def test_clip_sampling_and_crops(tmp_path):
    frames = kinetics.read_video(write_clip(tmp_path / "c.mp4", frames=40), short_side=32)
    assert frames.shape == (40, 32, 43, 3)  # 64x48 -> short side 32
    s = kinetics.Sampling(frames=4, stride=2, clips=3, crops=3, size=32, short_side=32, mean=(0, 0, 0), std=(1, 1, 1))
    views = kinetics.sample_views(frames, s)
    assert views.shape == (9, 3, 4, 32, 32)
    index = ((views[:, 1].mean((2, 3)) * 255 - 20) / 5).round().long()  # (views, T) decoded frame index
    assert index[::3].tolist() == [[0, 2, 4, 6], [16, 18, 20, 22], [32, 34, 36, 38]]  # starts spread over 40 frames
    assert torch.equal(index[0], index[1]) and torch.equal(index[0], index[2])  # 3 crops of one clip
    left_red = views[:3, 0, 0, :, 0].mean(1)  # left column of crops at both ends and the centre
    assert float(left_red[0]) < 0.05 and float(left_red[0]) < float(left_red[1]) < float(left_red[2])
    # one clip, one crop: centred; a video shorter than the clip repeats its last frame
    one = kinetics.sample_views(frames[:5], kinetics.Sampling(frames=4, stride=2, size=32, short_side=32, mean=(0, 0, 0), std=(1, 1, 1)))
    assert ((one[0, 1].mean((1, 2)) * 255 - 20) / 5).round().long().tolist() == [0, 2, 4, 4]


def _video_cfg(tmp_path, data, **video):
    cfg = config.resolve("kinetics400", ROOT / "bench.toml", data=str(data), out=str(tmp_path / "results"))
    cfg.video = {"stride": 2, "clips": 2, "crops": 1, **video}
    return cfg


def _tiny_backbone(cfg):
    cfg.model = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return runner.create_backbone(cfg)


def test_corrupt_video_is_named_or_skipped(tmp_path):
    data = tmp_path / "k"
    write_clip(data / "zumba" / "good.mp4", frames=40)
    write_clip(data / "yoga" / "good2.mp4", frames=40)
    bad = data / "yoga" / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    cfg = _video_cfg(tmp_path, data)
    vit = _tiny_backbone(cfg)
    evalset = load_kinetics(cfg, vit, 400)
    with pytest.raises(UsageError, match=r"cannot decode video .*broken\.mp4.*--skip-corrupt"):
        list(evalset.batches(2))
    cfg.skip_corrupt = True
    evalset = load_kinetics(cfg, vit, 400)
    batches = list(evalset.batches(2))
    assert sum(len(y) for _, y in batches) == 2 and list(evalset.skipped.values()) == [str(bad)]
    x, y = batches[0]
    assert x.shape[1:] == (3, 16, 32, 32) and x.shape[0] == 2 * len(y)  # 2 views per video
    assert evalset.timing_inputs(5, seed=0).shape == (2, 3, 16, 32, 32)


@needs_mini
def test_fixture_class_folders_and_decoding():
    items, info = kinetics.discover(MINI, 400)
    assert info["n"] == 12 and info["classes_present"] == 4
    assert sorted({label for _, label in items}) == [K400.index(c) for c in ("abseiling", "arm wrestling", "cleaning pool", "flipping pancake")]
    frames = kinetics.read_video(items[0][0], short_side=112)
    assert frames.shape[0] == 50 and min(frames.shape[1:3]) == 112
    views = kinetics.sample_views(frames, kinetics.Sampling(frames=16, stride=2, clips=2, crops=3, size=112, short_side=112))
    assert views.shape == (6, 3, 16, 112, 112) and torch.isfinite(views).all()
    x, label, _, reason = kinetics.VideoFiles([(MINI / "corrupted.mp4", 0)], kinetics.Sampling())[0]
    assert x is None and reason


@needs_mini
def test_fixture_run_end_to_end_at_224_with_views_and_skip_corrupt(tmp_path):
    """The kinetics400 profile's real sampling (16 frames, 224 px crops, 5 clips x 3 crops) on the
    real clips, decoded in worker processes after the parent decoded its timing clips: the path
    that hung (fork after PyAV's decoder threads). A small model keeps it quick."""
    data = tmp_path / "mini"
    shutil.copytree(MINI / "val", data / "val")
    shutil.copy(MINI / "corrupted.mp4", data / "val" / "abseiling" / "corrupted.mp4")
    toml = tmp_path / "bench.toml"
    toml.write_text((ROOT / "bench.toml").read_text() + """
[profiles.kmini]
extends = "kinetics400"
methods = "deit,avit"
batch_sizes = [1]
[profiles.kmini.budgets]
avit = [20]
[profiles.kmini.model]
img_size = 224
embed_dim = 32
depth = 2
num_heads = 2
""" + quick_timing("kmini"))
    cmd = [sys.executable, "-m", "bench", "run", "--config", str(toml), "--profile", "kmini", "--data", str(data), "--checkpoint", "random",
           "--out", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert "corrupted.mp4" in bad.stderr and "--skip-corrupt" in bad.stderr and "Traceback" not in bad.stderr
    # finish that run in-process with --skip-corrupt (the one flag --resume accepts)
    cfg = config.resolve("kmini", toml, skip_corrupt=True)
    run = runner.execute(cfg, Reporter(quiet=True), resume=str(next((tmp_path / "results").iterdir())))
    assert run.manifest()["status"] == "complete"
    run_dir = next((tmp_path / "results").iterdir())
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"deit", "avit"}
    for r in records:
        assert r["views"] == 15 and r["n_samples"] == 12
        assert r["gmacs_per_video"] == pytest.approx(15 * r["gmacs"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["dataset"]["skipped_corrupt"] == 1
    assert manifest["dataset"]["skipped_files"] == [str(data / "val" / "abseiling" / "corrupted.mp4")]


def test_csv_row_with_an_empty_label_is_named(tmp_path):
    (tmp_path / "val.csv").write_text("label,youtube_id,time_start,time_end\nzumba,abc,0,10\n,def,0,10\n  ,ghi,0,10\n")
    with pytest.raises(kinetics.LayoutError, match=r"val.csv:3: empty label \(and 1 more rows\)"):
        kinetics.discover(tmp_path, 400)
