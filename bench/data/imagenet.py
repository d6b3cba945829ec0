"""ImageNet validation images on disk, in the two layouts users have.

- class folders: ``<root>/[val/]<wnid>/*.JPEG``; labels by wnid through the 1000-class list
  (timm's ``ImageNetInfo``), never by the position of a folder among the folders present;
- flat: ``<root>/ILSVRC2012_val_*.JPEG`` plus a label file of ``filename index`` lines (``<root>.txt``
  beside the folder, or ``labels.txt`` / ``val.txt`` inside it).

Images are decoded with PIL in DataLoader workers and transformed with the backbone's own timm
evaluation config (resize, crop_pct, interpolation, mean/std). An unreadable image is reported by
path.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

IMAGE_EXT = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
WNID = re.compile(r"^n\d{8}$")


class LayoutError(ValueError):
    pass


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)


def _label_file(root: Path) -> Path | None:
    for cand in (root.with_suffix(".txt"), root.parent / f"{root.name}.txt", root / "labels.txt", root / "val.txt"):
        if cand.is_file():
            return cand
    return None


NUM_CLASSES = 1000


def discover(root: Path) -> tuple[list[tuple[Path, int]], dict]:
    """(file, ImageNet-1k index) pairs, and what was found under ``root``: the layout and, for a
    flat folder, how many label-file entries name no file in it (a partial copy of the set)."""
    from timm.data import ImageNetInfo

    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"data path {root} is not a folder")
    if (root / "val").is_dir() and any(WNID.match(p.name) for p in (root / "val").iterdir()):
        root = root / "val"
    info = ImageNetInfo()
    wnid_index = {w: i for i, w in enumerate(info.label_names())}
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and WNID.match(p.name))
    if class_dirs:
        unknown = [p.name for p in class_dirs if p.name not in wnid_index]
        if unknown:
            raise LayoutError(f"{root}: folders {', '.join(unknown[:3])} are not ImageNet-1k wnids")
        items = [(f, wnid_index[d.name]) for d in class_dirs for f in _images(d)]
        if not items:
            raise LayoutError(f"data path {root} has class folders but no images in them")
        return items, {"layout": "class_folders"}
    files = _images(root)
    if not files:
        raise LayoutError(
            f"data path {root} holds no images (expected <wnid>/*.JPEG class folders, or ILSVRC2012_val_*.JPEG with a label file)"
        )
    labels_path = _label_file(root)
    if labels_path is None:
        raise LayoutError(f"{root}: flat layout needs a label file of 'filename index' lines ({root.name}.txt beside it, or labels.txt inside)")
    labels = _read_labels(labels_path)
    missing = [f.name for f in files if f.name not in labels]
    if missing:
        raise LayoutError(f"{labels_path} has no label for {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    absent = len(labels) - len(files)  # every file has a label, so the rest of the entries name no file
    return [(f, labels[f.name]) for f in files], {"layout": "flat", "label_file": str(labels_path), "labels_without_file": absent}


def _read_labels(labels_path: Path) -> dict[str, int]:
    """``filename index`` lines; an index outside ImageNet-1k is an error naming the line."""
    labels: dict[str, int] = {}
    for n, line in enumerate(labels_path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise LayoutError(f"{labels_path}:{n}: expected 'filename index', got {line!r}")
        if int(parts[1]) >= NUM_CLASSES:
            raise LayoutError(f"{labels_path}:{n}: class index {parts[1]} is outside ImageNet-1k (0-{NUM_CLASSES - 1})")
        labels[parts[0]] = int(parts[1])
    return labels


class ImageFiles(Dataset):
    """(image, label, index); an unreadable file gives label -1 so the caller can name it."""

    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
            return self.transform(img), label, i
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
            return torch.zeros(self._shape()), -1, i

    def _shape(self):
        size = getattr(self, "input_size", (3, 224, 224))
        return size
