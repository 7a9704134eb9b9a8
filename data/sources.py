"""Listing the input images of a dataset before they are written as shards (``launch/prepare_data.py``).

Three layouts:
- ImageNet: the train layout ``<synset>/<file>.JPEG`` (class index = position of the synset in the sorted
  synset list, the convention of torchvision's ImageFolder and of every ImageNet checkpoint), and the
  validation layout (a flat folder of ``ILSVRC2012_val_*.JPEG``) with a labels file;
- FFHQ: a folder (searched recursively) or a ``.zip`` of face images, unconditional;
- folder: any class-per-folder tree (classes = sorted sub-folder names), or a flat folder (unconditional).

Every file found is accounted for: files that are not images by extension are returned as skipped with a
reason, never dropped silently. Contents are checked later, when the shard writer decodes them. A source that
does not exist, or holds no image file, is refused (:class:`SourceError`) naming the folder and what was looked
for: a run that writes 0 samples must not look like a success (issue 20.10).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif"}
_EXTS = ", ".join(sorted(IMAGE_EXTS))


class SourceError(ValueError):
    """An input folder that cannot be listed as a dataset, with what was looked for."""


def _exists(root: Path, what: str) -> None:
    if not root.exists():
        raise SourceError(f"--src {root} does not exist: give the {what}")
    if not root.is_dir():
        raise SourceError(f"--src {root} is not a folder: give the {what}")


def _found(listing: "Listing", looked_for: str) -> "Listing":
    """``listing``, unless it holds no image: then a :class:`SourceError` naming the folder and what it looked for."""
    if listing.items:
        return listing
    other = f"; {len(listing.skipped)} other files set aside, e.g. {listing.skipped[0]['path']} " \
            f"({listing.skipped[0]['reason']})" if listing.skipped else "; the folder holds no files"
    raise SourceError(f"--src {listing.root} holds no image to write: looked for {looked_for} with an image "
                      f"extension ({_EXTS}){other}")


@dataclass(frozen=True)
class Item:
    """One input image: its path relative to the source (or inside the zip), label (-1: none), byte size."""
    path: str
    label: int
    size: int


@dataclass
class Listing:
    """What a source holds: the items to write, class names (None when unconditional), files set aside."""
    root: str
    items: list[Item]
    classes: Optional[list[str]]
    skipped: list[dict]
    zip_path: Optional[str] = None


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _walk(folder: Path, root: Path, label: int, items: list[Item], skipped: list[dict]) -> None:
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if _is_image(p):
            items.append(Item(rel, label, p.stat().st_size))
        else:
            skipped.append({"path": rel, "reason": f"not an image file name (extension '{p.suffix}')"})


def list_folder(src: str | Path) -> Listing:
    """Class-per-folder tree (labels = index of the sorted sub-folder name), or a flat folder (labels -1)."""
    root = Path(src)
    _exists(root, "folder of images (class sub-folders, or images directly)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[Item] = []
    skipped: list[dict] = []
    if not classes:
        _walk(root, root, -1, items, skipped)
        return _found(Listing(str(root), items, None, skipped), "files in it and its sub-folders (no class "
                      "sub-folder found, so unconditional)")
    for label, name in enumerate(classes):
        _walk(root / name, root, label, items, skipped)
    for p in sorted(root.iterdir()):  # stray files next to the class folders have no class
        if p.is_file():
            skipped.append({"path": p.name, "reason": "file outside the class folders (no label)"})
    return _found(Listing(str(root), items, classes, skipped), f"files in its {len(classes)} class sub-folders "
                  f"({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})")


def _read_lines(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if fields:
            rows.append(fields)
    return rows


def read_labels(labels: str | Path, synsets: Optional[str | Path] = None) -> tuple[dict[str, int], list[str]]:
    """ImageNet validation labels: ``{file stem: class index}`` and the synset list.

    Accepts ``<file> <label>`` lines (label a synset ``n01440764`` or an integer sorted-synset index, as in
    Caffe's ``val.txt``) and Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, first token of
    the prediction string is the synset). ``synsets`` (one per line, first token used, e.g.
    ``LOC_synset_mapping.txt``) pins the class list; otherwise it is the sorted synsets of the labels file.
    """
    rows = [r for r in _read_lines(Path(labels)) if len(r) >= 2 and r[0] != "ImageId"]
    if not rows:
        raise ValueError(f"labels file {labels} holds no '<file> <label>' lines")
    is_synset = re.fullmatch(r"n\d{8}", rows[0][1]) is not None
    if synsets is not None:
        classes = [r[0] for r in _read_lines(Path(synsets))]
    elif is_synset:
        classes = sorted({r[1] for r in rows})
    else:
        classes = [str(i) for i in range(max(int(r[1]) for r in rows) + 1)]
    lookup = {c: i for i, c in enumerate(classes)}
    out: dict[str, int] = {}
    for r in rows:
        stem = Path(r[0]).stem
        if is_synset:
            if r[1] not in lookup:
                raise ValueError(f"labels file {labels}: synset {r[1]} of {r[0]} is not in the synset list")
            out[stem] = lookup[r[1]]
        else:
            out[stem] = int(r[1])
    return out, classes


def list_imagenet(src: str | Path, labels: Optional[str | Path] = None,
                  synsets: Optional[str | Path] = None) -> Listing:
    """ImageNet train layout (synset folders), or the flat validation layout with ``labels``."""
    root = Path(src)
    _exists(root, "ImageNet train folder (synset sub-folders) or val folder (flat, with --labels)")
    has_dirs = any(p.is_dir() for p in root.iterdir())
    if has_dirs:
        return list_folder(root)
    if labels is None:
        raise ValueError(f"{root} has no synset folders: for the flat validation layout give --labels "
                         "(lines '<file> <synset or index>', or Kaggle's LOC_val_solution.csv)")
    table, classes = read_labels(labels, synsets)
    items: list[Item] = []
    skipped: list[dict] = []
    for p in sorted(root.iterdir()):
        if not p.is_file():
            continue
        if not _is_image(p):
            skipped.append({"path": p.name, "reason": f"not an image file name (extension '{p.suffix}')"})
        elif p.stem not in table:
            skipped.append({"path": p.name, "reason": "no label for this file in the labels file"})
        else:
            items.append(Item(p.name, table[p.stem], p.stat().st_size))
    return _found(Listing(str(root), items, classes, skipped), "ILSVRC2012_val_* files directly in it, named in "
                  "the labels file")


def list_ffhq(src: str | Path) -> Listing:
    """FFHQ (or any unconditional set) from a folder, searched recursively, or from a .zip archive."""
    path = Path(src)
    if path.is_file() and zipfile.is_zipfile(path):
        items: list[Item] = []
        skipped: list[dict] = []
        with zipfile.ZipFile(path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if info.is_dir():
                    continue
                if _is_image(Path(info.filename)):
                    items.append(Item(info.filename, -1, info.file_size))
                else:
                    skipped.append({"path": info.filename, "reason": "not an image file name"})
        return _found(Listing(str(path), items, None, skipped, zip_path=str(path)), "files in the archive")
    if not path.exists():
        raise SourceError(f"--src {path} does not exist: give the folder or .zip of the images")
    if not path.is_dir():
        raise SourceError(f"--src {path} is neither a folder nor a .zip file")
    items, skipped = [], []
    _walk(path, path, -1, items, skipped)
    return _found(Listing(str(path), items, None, skipped), "files in it and its sub-folders")


__all__ = ["Item", "Listing", "SourceError", "IMAGE_EXTS", "list_folder", "list_imagenet", "list_ffhq", "read_labels"]
