"""ImageNet validation on disk: both layouts, labels by wnid, the backbone's timm eval transform
(overridable), grayscale and tiny images, corrupt files (stop by path, or --skip-corrupt), and
`bench run --profile imagenet` printing the papers' numbers beside ours."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import config, datasets, runner
from bench.errors import UsageError
from bench.paper import beside
from conftest import FIXTURES, ROOT, quick_timing, run_main

MINI = FIXTURES / "imagenet-mini"
# wnid -> ImageNet-1k index (synset_words.txt order); chosen so folder order != index order
WNIDS = {"n01440764": 0, "n01443537": 1, "n04074963": 761, "n03017168": 494}

TINY_TOML = """
[profiles.tiny]
methods = "deit"
dataset = "imagenet"
backbone = "deit_tiny_patch16_224"
checkpoint = "random"
batch_sizes = [1, 2]
eval_batch_size = 2
seed = 0

[profiles.tiny.model]
embed_dim = 48
depth = 2
num_heads = 2
img_size = 64

[profiles.tiny.transform]
input_size = [3, 64, 64]
""" + quick_timing("tiny", timing_samples=4)

QUICK_TIMING = """
[profiles.imagenet-quick]
extends = "imagenet"
""" + quick_timing("imagenet-quick")


def _photo(path: Path, size=(96, 80), mode="RGB", seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG")


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "imagenet"
    for j, wnid in enumerate(WNIDS):
        for k in range(2):
            _photo(root / "val" / wnid / f"{wnid}_{k}.JPEG", seed=10 * j + k)
    _photo(root / "val" / "n03017168" / "gray.JPEG", mode="L")  # grayscale
    _photo(root / "val" / "n04074963" / "tiny.JPEG", size=(12, 30))  # smaller than any crop
    return root


@pytest.fixture
def flat(tmp_path):
    folder = tmp_path / "val_flat"
    lines = []
    for i, idx in enumerate([5, 999, 0, 5]):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        _photo(folder / name, seed=i)
        lines.append(f"{name} {idx}")
    (tmp_path / "val_flat.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_cfg(tmp_path, data: Path, **flags):
    toml = tmp_path / "bench.toml"
    toml.write_text(TINY_TOML)
    return config.resolve("tiny", toml, data=str(data), out=str(tmp_path / "results"), **flags)


def labels_of(evalset) -> list[int]:
    return [int(v) for _, y in evalset.batches(3) for v in y]


def test_class_folders_are_labelled_by_wnid_not_folder_order(tmp_path, class_folders):
    cfg = tiny_cfg(tmp_path, class_folders)
    evalset = datasets.load(cfg, runner.create_backbone(cfg))
    assert evalset.info["layout"] == "class_folders" and evalset.n == 10
    expected = [WNIDS[p.parent.name] for p, _ in evalset.dataset.items]
    assert labels_of(evalset) == expected
    assert sorted(set(expected)) == [0, 1, 494, 761]


def test_flat_layout_with_label_file(tmp_path, flat):
    cfg = tiny_cfg(tmp_path, flat)
    evalset = datasets.load(cfg, runner.create_backbone(cfg))
    assert evalset.info["layout"] == "flat"
    assert labels_of(evalset) == [5, 999, 0, 5]


def test_flat_label_file_outside_imagenet_or_naming_absent_files(tmp_path, flat, capsys):
    """An index past 999 is an error naming the line; entries for files that are not there are
    counted in the manifest and reported (a partial copy of the validation set)."""
    label_file = tmp_path / "val_flat.txt"
    good = label_file.read_text()
    label_file.write_text(good.replace(" 999\n", " 5000\n"))
    cfg = tiny_cfg(tmp_path, flat)
    with pytest.raises(UsageError, match=r"val_flat.txt:2: class index 5000 is outside ImageNet-1k"):
        datasets.load(cfg, runner.create_backbone(cfg))
    label_file.write_text(good + "ILSVRC2012_val_00000099.JPEG 7\nILSVRC2012_val_00000098.JPEG 8\n")
    evalset = datasets.load(cfg, runner.create_backbone(cfg))
    assert evalset.n == 4 and evalset.info["labels_without_file"] == 2
    assert "labels 2 file(s) that are not in" in capsys.readouterr().err


def test_decompression_bomb_is_an_unreadable_image_not_a_crash(tmp_path, monkeypatch):
    """An image over PIL's pixel limit stops the run by path (or is skipped), like a corrupt one."""
    from bench.data.imagenet import ImageFiles

    _photo(tmp_path / "huge.JPEG", size=(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 200 x 200 is over twice the limit: PIL refuses it
    files = ImageFiles([(tmp_path / "huge.JPEG", 3)], transform=lambda im: torch.zeros(3, 8, 8))
    files.input_size = (3, 8, 8)
    assert files[0][1] == -1


def test_grayscale_and_tiny_images_become_model_sized_rgb(tmp_path, class_folders):
    cfg = tiny_cfg(tmp_path, class_folders)
    evalset = datasets.load(cfg, runner.create_backbone(cfg))
    names = [p.name for p, _ in evalset.dataset.items]
    for name in ("gray.JPEG", "tiny.JPEG"):
        x, label, _ = evalset.dataset[names.index(name)]
        assert label >= 0 and tuple(x.shape) == (3, 64, 64)
        assert x.std() > 0  # decoded pixels, not the zero placeholder of an unreadable file


def test_eval_transform_comes_from_the_timm_config_and_can_be_overridden(tmp_path, class_folders):
    import timm

    vit = timm.create_model("deit_small_patch16_224", pretrained=False)
    cfg = config.resolve("imagenet", ROOT / "bench.toml", data=str(class_folders))
    info = datasets.load(cfg, vit).info
    own = vit.pretrained_cfg
    assert (info["crop_pct"], info["interpolation"], info["input_size"]) == (own["crop_pct"], own["interpolation"], list(own["input_size"]))
    assert info["mean"] == pytest.approx(list(own["mean"])) and info["std"] == pytest.approx(list(own["std"]))
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406])  # DeiT: ImageNet mean, not the inception 0.5
    cfg = config.resolve("imagenet", ROOT / "bench.toml", data=str(class_folders),
                         transform={"crop_pct": 0.875, "interpolation": "bilinear"})
    evalset = datasets.load(cfg, vit)
    assert (evalset.info["crop_pct"], evalset.info["interpolation"]) == (0.875, "bilinear")
    resize = evalset.dataset.transform.transforms[0]
    assert resize.size == int(224 / 0.875) and resize.interpolation.value == "bilinear"
    cfg.transform = {"crop_pct": 1.5}
    with pytest.raises(UsageError, match="crop_pct must lie in"):
        datasets.load(cfg, vit)


def _cli(tmp_path, monkeypatch, capsys, *args):
    return run_main(monkeypatch, capsys, "run", "--config", str(tmp_path / "bench.toml"), "--profile", "tiny",
                 "--out", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), "-q", *args)


def test_corrupt_image_stops_the_run_by_path_or_is_skipped_and_counted(tmp_path, class_folders, monkeypatch, capsys):
    bad = class_folders / "val" / "n01443537" / "n01443537_broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "bench.toml").write_text(TINY_TOML)
    code, _, err = _cli(tmp_path, monkeypatch, capsys, "--data", str(class_folders))
    assert code == 2
    assert str(bad) in err.replace("\n", "") and "--skip-corrupt" in err and "Traceback" not in err

    code, _, err = _cli(tmp_path, monkeypatch, capsys, "--data", str(class_folders), "--skip-corrupt")
    assert code == 0, err
    assert "skipped 1 unreadable image" in err
    run = sorted((tmp_path / "results").iterdir())[-1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["dataset"]["skipped_corrupt"] == 1 and manifest["dataset"]["skipped_files"] == [str(bad)]
    recs = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert {r["n_samples"] for r in recs} == {10}  # 11 files, 1 skipped


def test_paper_numbers_sit_beside_ours():
    recs = [{"dataset": "imagenet", "method": "avit", "budget": "b", "backbone": "deit_small_patch16_224", "top1": 78.0,
             "gmacs": 3.5, "precision": "fp32", "mode": "compact", "batch_size": bs} for bs in (1, 256)]
    rows = beside(recs + [{**recs[0], "dataset": "digits"}])
    assert len(rows) == 1 and rows[0]["paper_top1"] == 78.8 and rows[0]["paper_gmacs"] == 3.6
    assert beside([{**recs[0], "backbone": "digits_vit"}]) == []


def test_imagenet_profile_prints_the_paper_number(tmp_path, monkeypatch, capsys):
    """`bench run --profile imagenet` on the shared photos with DeiT-T (random weights: the
    numbers mean nothing, the table and its paper column must be there)."""
    if not (MINI / "val").is_dir():
        pytest.skip(f"shared fixtures absent: {MINI}")
    toml = tmp_path / "bench.toml"  # the project's profiles plus `imagenet` with test-length timing
    toml.write_text((ROOT / "bench.toml").read_text() + QUICK_TIMING)
    code, out, err = run_main(monkeypatch, capsys, "run", "--config", str(toml), "--profile", "imagenet-quick",
                           "--data", str(MINI / "val"), "--methods", "deit",
                           "--backbone", "deit_tiny_patch16_224", "--checkpoint", "random", "--batch-sizes", "1",
                           "--precision", "fp32", "--out", str(tmp_path / "r"), "--reports", str(tmp_path / "rep"), "-q")
    assert code == 0, err
    assert "paper (docs/methods/README.md#papers-numbers)" in out and "72.20" in out and "DeiT-T, DeiT paper" in out
    run = sorted((tmp_path / "r").iterdir())[-1]
    rec = json.loads((run / "records.jsonl").read_text().splitlines()[0])
    assert rec["n_samples"] == 32 and rec["dataset"] == "imagenet"


@pytest.mark.skipif(not (MINI / "val").is_dir(), reason=f"shared fixtures absent: {MINI}")
def test_shared_fixture_both_layouts(tmp_path):
    words = [line.split()[0] for line in (MINI / "synset_words.txt").read_text().splitlines()]
    cfg = tiny_cfg(tmp_path, MINI / "val")
    vit = runner.create_backbone(cfg)
    folders = datasets.load(cfg, vit)
    assert folders.n == 32
    assert labels_of(folders) == [words.index(p.parent.name) for p, _ in folders.dataset.items]
    shapes = {tuple(x.shape[1:]) for x, _ in folders.batches(8)}  # grayscale chime, 40x122 remote included
    assert shapes == {(3, 64, 64)}
    cfg = tiny_cfg(tmp_path, MINI / "val_flat")
    flat = datasets.load(cfg, vit)
    truth = dict(line.split() for line in (MINI / "val_flat.txt").read_text().splitlines() if line.strip())
    assert flat.info["layout"] == "flat" and flat.n == 12
    assert labels_of(flat) == [int(truth[p.name]) for p, _ in flat.dataset.items]


def test_synthetic_images_at_the_backbone_input_size(tmp_path):
    toml = tmp_path / "bench.toml"
    toml.write_text(TINY_TOML)
    cfg = config.resolve("tiny", toml, dataset="synthetic", out=str(tmp_path / "r"))
    cfg.test_samples = 6
    vit = runner.create_backbone(cfg)
    a, b = datasets.load(cfg, vit), datasets.load(cfg, vit)
    assert a.n == 6 and tuple(a.images.shape) == (6, 3, 64, 64) and torch.equal(a.images, b.images)
    assert int(a.labels.max()) < 1000
    cfg.data = str(tmp_path)
    with pytest.raises(UsageError, match="takes no --data"):
        datasets.load(cfg, vit)


def test_each_rank_reads_only_its_shard_of_a_folder(tmp_path, class_folders):
    """torchrun ranks (bench/parallel.py): rank r decodes whole batches r, r + world, ... only."""
    cfg = tiny_cfg(tmp_path, class_folders)
    evalset = datasets.load(cfg, runner.create_backbone(cfg))
    whole = [(x, y) for x, y in evalset.batches(3)]
    ranks = [[(x, y) for x, y in evalset.batches(3, shard=(r, 2))] for r in range(2)]
    assert [len(y) for _, y in ranks[0]] == [3, 3] and [len(y) for _, y in ranks[1]] == [3, 1]
    dealt = [ranks[g % 2][g // 2] for g in range(4)]
    for (x, y), (xs, ys) in zip(whole, dealt):
        assert torch.equal(y, ys) and torch.equal(x, xs)
