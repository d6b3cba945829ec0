"""Kinetics-400/600 videos on disk, in the two layouts users have, decoded with PyAV.

- class folders: ``<root>/[val|validate|test/]<class>/*.mp4`` (class names with spaces or
  underscores, as the various download scripts leave them);
- official annotations: a CSV with ``label,youtube_id,time_start,time_end[,split]`` columns (the
  file given as ``--data``, or the one ``*.csv`` in the folder or its ``annotations/``), clips named
  ``<youtube_id>_<time_start:06d>_<time_end:06d>.<ext>`` anywhere below the data root. Rows whose
  clip is not on disk (YouTube takedowns) are counted as missing, never silently relabelled.

Labels are the index of the class in the data set's full class list (alphabetical, as the official
annotations and VideoMAE / mmaction2 label maps), never a folder's position among the folders
present: Kinetics-400's list ships with the project; for Kinetics-600 a CSV that names all 600
classes, or a ``classes.txt`` (one name a line, index order) in the data root, gives it.

Test-time sampling (VideoMAE / mmaction2 protocol): ``clips`` temporal windows of ``frames`` frames
taken every ``stride`` frames, their starts spread evenly over the video (one clip: centred), each
resized to ``short_side`` on its short side and cut into ``crops`` square crops spread along the
long side (one crop: centred; three: both ends and the centre). Every video yields
``clips * crops`` views; the harness averages the views' softmax scores (mmaction2's
``average_clips='prob'``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

VIDEO_EXT = {".mp4", ".webm", ".mkv", ".avi", ".mov"}
SPLIT_DIRS = ("val", "validate", "validation", "test")
CLASS_LISTS = {400: Path(__file__).with_name("kinetics400_classes.txt")}
CSV_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


class LayoutError(ValueError):
    pass


def canonical(name: str) -> str:
    """Class-name key that survives the renamings of download scripts: case, spaces vs
    underscores, and dropped parentheses / apostrophes ("massaging_persons_head")."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower().replace("'", "")).split())


@dataclass(frozen=True)
class Sampling:
    frames: int = 16
    stride: int = 4
    clips: int = 1
    crops: int = 1
    size: int = 224  # crop side
    short_side: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def views(self) -> int:
        return self.clips * self.crops


def class_list(num_classes: int, root: Path, csv_labels: list[str] | None = None) -> list[str]:
    """The full class list in index order (see the module docstring for where it comes from)."""
    for cand in (root / "classes.txt", root.parent / "classes.txt"):
        if cand.is_file():
            names = [line.strip() for line in cand.read_text().splitlines() if line.strip()]
            if len(names) != num_classes:
                raise LayoutError(f"{cand} lists {len(names)} classes; Kinetics-{num_classes} needs {num_classes}")
            return names
    if num_classes in CLASS_LISTS:
        return CLASS_LISTS[num_classes].read_text().splitlines()
    if csv_labels is not None and len(set(csv_labels)) == num_classes:
        return sorted(set(csv_labels))
    raise LayoutError(
        f"cannot tell the index of each of the {num_classes} Kinetics-{num_classes} classes from {root}: put a classes.txt "
        f"(one class name a line, in index order) in the data folder, or use the official annotation CSV"
    )


def _index_files(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(root.rglob("*")) if p.suffix.lower() in VIDEO_EXT and p.is_file()}


def _find_csv(root: Path) -> Path | None:
    cands = sorted(root.glob("*.csv")) + sorted((root / "annotations").glob("*.csv"))
    if len(cands) > 1:
        preferred = [c for c in cands if c.stem.lower() in ("val", "validate", "validation", "kinetics_val")]
        if len(preferred) != 1:
            raise LayoutError(f"{root} holds several annotation CSVs ({', '.join(c.name for c in cands)}); pass --data to one of them")
        return preferred[0]
    return cands[0] if cands else None


def discover(path: Path, num_classes: int) -> tuple[list[tuple[Path, int]], dict]:
    """(video file, class index) pairs under ``path`` and what was found (layout, counts)."""
    path = Path(path)
    if not path.exists():
        raise LayoutError(f"data path {path} does not exist")
    csv = path if path.is_file() and path.suffix.lower() == ".csv" else (_find_csv(path) if path.is_dir() else None)
    if csv is not None:
        return _from_csv(csv, num_classes)
    if not path.is_dir():
        raise LayoutError(f"data path {path} is neither a folder of videos nor an annotation CSV")
    root = path
    for d in SPLIT_DIRS:
        if (path / d).is_dir():
            root = path / d
            break
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise LayoutError(
            f"data path {root} has no class folders (<class>/*.mp4) and no annotation CSV (label,youtube_id,time_start,time_end,split)"
        )
    names = class_list(num_classes, path)
    index = {canonical(n): i for i, n in enumerate(names)}
    unknown = [d.name for d in class_dirs if canonical(d.name) not in index]
    if unknown:
        raise LayoutError(f"{root}: folders {', '.join(unknown[:3])} are not Kinetics-{num_classes} classes")
    items = [(f, index[canonical(d.name)]) for d in class_dirs for f in sorted(d.iterdir())
             if f.is_file() and f.suffix.lower() in VIDEO_EXT]
    if not items:
        raise LayoutError(f"data path {root} has class folders but no videos ({', '.join(sorted(VIDEO_EXT))}) in them")
    return items, {"layout": "class_folders", "root": str(root), "n": len(items), "classes_present": len(class_dirs)}


def _from_csv(csv: Path, num_classes: int) -> tuple[list[tuple[Path, int]], dict]:
    import pandas as pd

    try:
        table = pd.read_csv(csv, dtype={"youtube_id": str, "label": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LayoutError(f"{csv}: not a readable CSV ({str(e).splitlines()[0]})") from None
    missing_cols = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing_cols:
        raise LayoutError(f"{csv}: missing column(s) {', '.join(missing_cols)}; expected {','.join(CSV_COLUMNS)},split")
    empty = table.index[table["label"].isna() | (table["label"].astype(str).str.strip() == "")]
    if len(empty):  # line numbers count the header as line 1
        raise LayoutError(f"{csv}:{int(empty[0]) + 2}: empty label" + (f" (and {len(empty) - 1} more rows)" if len(empty) > 1 else "")
                          + "; every clip needs its class name")
    root = csv.parent.parent if csv.parent.name == "annotations" else csv.parent
    names = class_list(num_classes, root, table["label"].tolist())
    index = {canonical(n): i for i, n in enumerate(names)}
    unknown = sorted({lab for lab in table["label"] if canonical(lab) not in index})
    if unknown:
        raise LayoutError(f"{csv}: labels {', '.join(unknown[:3])} are not Kinetics-{num_classes} classes")
    files = _index_files(root)
    items, missing = [], 0
    for row in table.itertuples(index=False):
        try:
            stem = f"{row.youtube_id}_{int(row.time_start):06d}_{int(row.time_end):06d}"
        except (TypeError, ValueError):
            raise LayoutError(f"{csv}: bad time_start/time_end {row.time_start!r}/{row.time_end!r} for {row.youtube_id}") from None
        if stem in files:
            items.append((files[stem], index[canonical(row.label)]))
        else:
            missing += 1
    if not items:
        raise LayoutError(f"{csv}: none of its {len(table)} clips (<youtube_id>_<start:06d>_<end:06d>.mp4) is under {root}")
    info = {"layout": "csv", "annotations": str(csv), "root": str(root), "n": len(items), "missing_on_disk": missing}
    if "split" in table.columns:
        info["splits"] = sorted(str(s) for s in table["split"].dropna().unique())
    return items, info


def read_video(path: Path, short_side: int) -> np.ndarray:
    """All frames of ``path`` as (N, H, W, 3) uint8, resized (by PyAV) to ``short_side``."""
    import av

    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            scale = short_side / min(frame.width, frame.height)
            w, h = max(short_side, round(frame.width * scale)), max(short_side, round(frame.height * scale))
            out.append(frame.to_ndarray(format="rgb24", width=w, height=h))
    if not out:
        raise ValueError("no decodable video frames")
    return np.stack(out)


def clip_starts(total: int, span: int, clips: int) -> list[int]:
    """Start frame of each temporal view: evenly spread over the video, or centred for one."""
    room = max(total - span, 0)
    if clips == 1:
        return [room // 2]
    return [int(round(s)) for s in np.linspace(0, room, clips)]


def crop_offsets(length: int, size: int, crops: int) -> list[int]:
    room = max(length - size, 0)
    if crops == 1:
        return [room // 2]
    return [int(round(s)) for s in np.linspace(0, room, crops)]


def sample_views(frames: np.ndarray, s: Sampling) -> torch.Tensor:
    """(views, 3, T, size, size) float clips, normalised, views ordered clip-major."""
    total, h, w = frames.shape[:3]
    span = s.frames * s.stride
    mean = torch.tensor(s.mean).view(3, 1, 1, 1)
    std = torch.tensor(s.std).view(3, 1, 1, 1)
    views = []
    for start in clip_starts(total, span, s.clips):
        idx = np.minimum(start + np.arange(s.frames) * s.stride, total - 1)  # short videos repeat their last frame
        clip = torch.from_numpy(frames[idx]).permute(3, 0, 1, 2).float().div_(255)  # (3, T, H, W)
        long_is_w = w >= h
        for off in crop_offsets(w if long_is_w else h, s.size, s.crops):
            y0, x0 = ((h - s.size) // 2, off) if long_is_w else (off, (w - s.size) // 2)
            views.append((clip[:, :, y0 : y0 + s.size, x0 : x0 + s.size] - mean) / std)
    return torch.stack(views)


class VideoFiles(Dataset):
    """(views, label, index, error) per video; an unreadable video gives ``error`` (its reason) so
    the caller can name it or skip it."""

    def __init__(self, items: list[tuple[Path, int]], sampling: Sampling):
        self.items = items
        self.sampling = sampling

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import av

        path, label = self.items[i]
        try:
            return sample_views(read_video(path, self.sampling.short_side), self.sampling), label, i, ""
        except (av.FFmpegError, OSError, ValueError, IndexError) as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            return None, label, i, reason


def collate(batch):
    """Stack the readable videos; report the unreadable ones as (index, reason)."""
    ok = [b for b in batch if b[0] is not None]
    failed = [(b[2], b[3]) for b in batch if b[0] is None]
    x = torch.stack([b[0] for b in ok]) if ok else None
    y = torch.tensor([b[1] for b in ok], dtype=torch.int64)
    return x, y, failed
