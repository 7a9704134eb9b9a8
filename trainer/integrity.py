"""What a checkpoint folder must hold to be resumed, and what to say when a write to it fails (issue 20, items 3, 7).

A save records the size and sha256 of every file of its step folder in ``meta.json`` (``"files"``); a resume
checks them before anything is loaded, so that a truncated shard, garbage in ``meta.json`` or one flipped bit
is named (file and problem) instead of surfacing as a PyTorch or JSON error, or not at all. Each rank hashes the
files that carry its rank in their name (``zero_pp_rank_R_*``, ``rank_R.pt``) as soon as it has written them;
rank 0 hashes the rest once every rank is done. Files a checkpoint gains later (``<engine>_universal``, written
at a resume on another world size) are derived from the checked ones and are not listed, so they are not checked.

A failed write names the folder, the free space and what a checkpoint of the run takes: PyTorch's writer turns
ENOSPC into ``unexpected pos ... vs ...`` or ``file write failed``, which names neither the disk nor the cause.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from vitvq.data.shards import sha256_file

META = "meta.json"
_WRITER = re.compile(r"zero_pp_rank_(\d+)_|^rank_(\d+)\.pt$")
"""A file that carries its writer's rank in its name: DeepSpeed's ZeRO shards and our per-rank state."""
_HIDDEN_IO = ("unexpected pos", "file write failed", "iostream error", "PytorchStreamWriter failed")
"""What PyTorch's zip writer raises (as RuntimeError) when a write fails; the errno is lost."""
NEARLY_FULL = 64 << 20
"""Free bytes under which a write that failed for an unknown reason is taken for a full disk."""


def writer_of(name: str) -> int:
    """The rank that writes a step folder's file named ``name``: its rank in the name, else rank 0."""
    m = _WRITER.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def folder_files(folder: Path) -> list[str]:
    """The files of step folder ``folder`` a checksum covers (paths relative to it, sorted): everything but
    ``meta.json``, temporary files, and the universal-format conversions made at resume."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if (p.is_file() and rel.as_posix() != META and ".tmp" not in p.name
                and not any(part.endswith(("_universal", "_universal.tmp")) for part in rel.parts[:-1])):
            out.append(rel.as_posix())
    return sorted(out)


def checksums(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files ``names`` of ``folder``."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def own_checksums(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """The checksums of the files of ``folder`` that carry ``rank`` in their name (written by that rank)."""
    return checksums(folder, [n for n in folder_files(folder) if _WRITER.search(Path(n).name)
                              and writer_of(Path(n).name) == rank])


def read_meta(folder: Path) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(meta, None) for a readable ``meta.json`` of ``folder``; (None, the problem) otherwise."""
    path = folder / META
    if not path.is_file():
        return None, f"{META}: missing"
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{META}: not valid JSON ({e})"
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("step", "world_size")):
        return None, f"{META}: not a checkpoint description (no integer 'step' and 'world_size')"
    return meta, None


def damage(folder: Path, meta: dict[str, Any]) -> Optional[str]:
    """What is wrong with the files ``meta`` lists (missing, another size, another sha256), None when all match.
    A checkpoint without checksums (written before they were recorded) has nothing to check: None."""
    problems = []
    for name, want in sorted(meta.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != want["bytes"]:
            size = path.stat().st_size
            how = "truncated" if size < want["bytes"] else "longer than written"
            problems.append(f"{name}: {size} bytes, {want['bytes']} written ({how})")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
    if not problems:
        return None
    more = f", and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def check(folder: Path, said: set[str]) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(meta, None) when step folder ``folder`` is an intact checkpoint, (None, what is wrong) otherwise. One
    written before checksums were recorded is taken unchecked, and said once (``said``: the notes printed)."""
    if not folder.is_dir():
        return None, "the folder is missing"
    meta, problem = read_meta(folder)
    if meta is not None and (problem := damage(folder, meta)) is None:
        note = (f"checkpoint {folder.name} has no checksums recorded (written by an older vitvq): its files are used "
                f"unchecked")
        if "files" not in meta and note not in said:
            said.add(note)
            print(note, flush=True)
        return meta, None
    return None, problem


def first_intact(folders: list[Path], verb: str, said: set[str]) -> tuple[str, dict[str, Any]]:
    """(tag, meta) of the first intact checkpoint of ``folders`` (newest first), saying on stdout which ones before
    it are damaged and that ``verb`` ("resuming from") it instead; an error naming them all if none is intact."""
    damaged = []
    for folder in folders:
        meta, problem = check(folder, said)
        if meta is None:
            damaged.append((folder, problem))
            continue
        for bad, why in damaged:  # never silently: the run goes back in time
            print(f"checkpoint {bad.name} is damaged ({why}): {verb} {folder.name} instead; delete or move {bad} to "
                  f"silence this", flush=True)
        return folder.name, meta
    listed = "; ".join(f"{bad.name} ({why})" for bad, why in damaged)
    root = folders[0].parent
    raise RuntimeError(f"no intact checkpoint in {root}: {listed}. Restore the damaged files from a copy, or delete "
                       f"{root / 'latest'} and the step folders to start over")


def write_failed_message(folder: Path, failed: list[tuple[int, str]], pointer: Path, prev: Optional[Path]) -> str:
    """What a save that could not write step folder ``folder`` says (its partial files already deleted): what failed
    on which rank, the free space, what a checkpoint takes (``prev``, the one ``pointer`` names), what to do."""
    size = (f"; a checkpoint of this run takes {human(folder_bytes(prev))} ({prev.name})"
            if prev and prev.is_dir() else "")
    kept = (f"{pointer} still names {prev.name}, which is complete; rerun the same command to resume from it"
            if prev else "there is no complete checkpoint yet; rerun the same command to start over")
    why = "; ".join(f"rank {r}: {w}" for r, w in failed[:4])
    return (f"checkpoint {folder.name} could not be written to {folder} ({why}). {human(free_bytes(folder))} are "
            f"free on that filesystem now, with the partial {folder.name} deleted{size}. Free space there, or point "
            f"train.out_dir at a larger filesystem, or lower train.keep_last (checkpoints kept); {kept}")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files a checkpoint is made of (see :func:`folder_files`), plus ``meta.json``."""
    return sum((folder / n).stat().st_size for n in [*folder_files(folder), META] if (folder / n).is_file())


def human(n: float) -> str:
    """``4.5 MiB``: a size for people."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            break
        n /= 1024
    else:
        unit = "TiB"
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def is_write_error(e: BaseException) -> bool:
    """An OSError, or PyTorch's RuntimeError for a failed write (which hides the OSError)."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _HIDDEN_IO))


def describe_write_error(e: BaseException, free_before: int) -> str:
    """The cause in plain words: "No space left on device" when it is that, even behind PyTorch's message."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"No space left on device (or quota exceeded): {e}"
    if isinstance(e, OSError):
        return str(e)
    if free_before < NEARLY_FULL:
        return f"No space left on device ({human(free_before)} free; PyTorch said: {str(e).strip()[-200:]})"
    return f"a write failed (PyTorch said: {str(e).strip()[-200:]})"


def free_bytes(path: Path) -> int:
    """Free bytes for this user on the filesystem of ``path`` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
