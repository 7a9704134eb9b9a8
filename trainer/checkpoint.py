"""Checkpoints that a crash cannot corrupt: per-engine DeepSpeed folders, per-rank state, an atomic ``latest``.

Layout of ``<out_dir>/checkpoints``::

    step_00001000/
        generator/ discriminator/     DeepSpeed engine checkpoints (ZeRO shards, optimizer, scheduler, client state)
        rank_00000.pt ...             per-rank state: RNG states (Python, NumPy, torch, CUDA) and the data-stream cursor
        meta.json                     step, world size, MLflow run id, config hash; written last, by rank 0
    latest                            name of the newest COMPLETE checkpoint, replaced atomically

``latest`` moves only after a barrier that every rank reaches once all its files are written and fsynced
(each rank syncs what it wrote; rank 0 then syncs the folders and ``meta.json``), so neither a crash in the
middle of a save nor a power loss right after ``latest`` moved leaves a checkpoint that is not on disk as the
one resumed. Older checkpoints beyond ``keep_last`` are deleted after the pointer has moved, and so are the
partial folders (no ``meta.json``) that crashed saves left behind; a starting run deletes them before it writes
anything, since a partial folder may be what filled the disk.

``meta.json`` also lists the size and sha256 of every file (``trainer/integrity.py``): a resume checks them and
falls back to the newest intact checkpoint, saying so, when the one ``latest`` names is damaged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vitvq.trainer.engine import (DistInfo, all_gather_object, barrier, broadcast_object, convert_to_universal, load_engine,
                                  save_engine)
from vitvq.trainer.integrity import (check, checksums, describe_write_error, first_intact, folder_files, free_bytes,
                                     is_write_error, own_checksums, write_failed_message)


# -- the layout on disk: every name of it is spelled here and only here -----------------------------------
def tag_of(step: int) -> str:
    """The step folder's name (its tag): ``step_00001000``. Zero-padded to 8 digits for people listing the folder;
    code orders folders by :func:`step_of`, never by name (``step_100000000`` sorts before ``step_99999999``)."""
    if step < 0:
        raise ValueError(f"a checkpoint step is >= 0, got {step}")
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The step of a step folder's name, the inverse of :func:`tag_of`; ValueError for any other name (``latest``,
    ``step_8``, ``step_00000008.old``), so that nothing but a step folder is ever ordered or deleted as one."""
    digits = tag.removeprefix("step_")
    if digits.isascii() and digits.isdigit() and tag == tag_of(int(digits)):
        return int(digits)
    raise ValueError(f"{tag!r} is not a checkpoint step folder name (like {tag_of(1000)!r})")


def is_tag(name: str) -> bool:
    """Whether ``name`` is a step folder's name (see :func:`step_of`)."""
    try:
        step_of(name)
    except ValueError:
        return False
    return True


def step_folders(root: Path) -> list[Path]:
    """The step folders in ``root`` (complete or not), oldest first by step number; other entries are ignored."""
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and is_tag(p.name)]
    return sorted(folders, key=lambda p: step_of(p.name))


def rank_file(folder: Path, rank: int) -> Path:
    """Rank ``rank``'s own state in step folder ``folder``: ``rank_00000.pt``."""
    return folder / f"rank_{rank:05d}.pt"


def meta_file(folder: Path) -> Path:
    """The file that makes step folder ``folder`` complete, written last: ``meta.json``."""
    return folder / "meta.json"


def latest_file(root: Path) -> Path:
    """The pointer in checkpoints folder ``root`` to the newest complete checkpoint (it holds that tag)."""
    return root / "latest"


def checkpoints_root(out_dir: str | Path) -> Path:
    """The checkpoints folder of the run in ``out_dir``."""
    return Path(out_dir) / "checkpoints"


def prune_partial_saves(root: Path) -> list[Path]:
    """Delete the step folders of checkpoints folder ``root`` that have no ``meta.json`` (saves that crashed before
    completing; never named by ``latest``); returns them, oldest first. Only while no rank is saving."""
    partial = [p for p in step_folders(root) if not meta_file(p).is_file()]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


class CheckpointWriteError(OSError):
    """A save failed to write (a full disk, a quota, a lost mount); ``latest`` still names the previous one."""


FAULT_ENV = "VITVQ_INJECT_FAULT"
"""Test hook: ``save@STEP`` fails in the middle of that save (this rank's engine files written, its rank file not);
``step@STEP`` after that step. Options after commas: ``rank=R`` fires on that rank only (``RANK``); ``kill``
SIGKILLs the process instead of raising (no cleanup, no exit handlers); ``sleep=S`` sleeps S seconds and goes on
(a slow rank, or slow storage). Example: ``save@8,rank=1,kill``."""


class InjectedFault(RuntimeError):
    pass


def maybe_fault(kind: str, step: int) -> None:
    """Fail (raise, die or stall) where a test asked for it (``VITVQ_INJECT_FAULT=save@4``, see :data:`FAULT_ENV`);
    one-shot per marker file if set."""
    spec = os.environ.get(FAULT_ENV, "")
    where, *options = spec.split(",")
    opts = dict(o.partition("=")[::2] for o in options)  # "rank=1" -> {"rank": "1"}, "kill" -> {"kill": ""}
    rank = os.environ.get("RANK", "0")
    if where != f"{kind}@{step}" or opts.get("rank", rank) != rank:
        return
    marker = os.environ.get(FAULT_ENV + "_ONCE")  # a file: fire only while it does not exist yet
    if marker:
        if Path(marker).exists():
            return
        Path(marker).touch()
    if "sleep" in opts:
        time.sleep(float(opts["sleep"]))
        return
    if "kill" in opts:
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault {spec}")


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's (its entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, newer_than: float = 0.0) -> None:
    """fsync every file of ``folder`` modified after ``newer_than`` (a rank's own files), then the folders."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            try:
                if path.stat().st_mtime >= newer_than:
                    _fsync(path)
            except FileNotFoundError:  # another rank's temporary file, renamed meanwhile (it syncs its own)
                continue
        _fsync(Path(root))


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over ``path``, fsync the folder: ``path`` is the old or the new
    text after any crash, and the new one once this returns."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_shared_folder(folder: Path, dist: DistInfo) -> None:
    """Collective: refuse to start unless every rank sees the file rank 0 just wrote in ``folder``: with node-local
    disks the other nodes would find no ``latest`` and start fresh while rank 0 resumes. This is a run's first
    write, so rank 0 deletes the partial step folders of crashed saves (:func:`prune_partial_saves`) before it."""
    probe = folder / f".shared-check-{os.getpid()}-{dist.rank}"
    token = f"{time.time_ns()}-{os.getpid()}"
    if dist.is_main:
        # A save that crashed on a full disk may have left the partial folder that fills it (issue 20, item 3).
        prune_partial_saves(checkpoints_root(folder))
        atomic_write_text(probe, token)
    token, name = broadcast_object((token, probe.name))
    seen = (folder / name).is_file() and (folder / name).read_text() == token
    views = all_gather_object(seen)
    barrier()
    if dist.is_main:
        (folder / name).unlink(missing_ok=True)
    missing = [r for r, ok in enumerate(views) if not ok]
    if missing:
        raise RuntimeError(f"train.out_dir={folder} is not shared storage: ranks {missing} cannot see the file rank 0 "
                           f"wrote there, so they would not see its checkpoints either; give every node the same "
                           f"folder (a shared filesystem mount) as train.out_dir")


class CheckpointManager:
    """The checkpoints of one run. Without ``dist`` it only reads (exports, tools); saving needs the process group."""

    def __init__(self, out_dir: str | Path, dist: Optional[DistInfo] = None, keep_last: int = 1):
        self.root = checkpoints_root(out_dir)
        self.dist, self.keep_last = dist, keep_last
        self._said: set[str] = set()  # the notes already printed ("no checksums recorded"), once each
        if dist is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            if dist.is_main:  # a run starts: nothing writes here yet, so a folder without meta.json is a crashed save
                self.prune_partial()

    def prune_partial(self) -> list[Path]:
        """Delete the step folders that have no ``meta.json`` (see :func:`prune_partial_saves`)."""
        return prune_partial_saves(self.root)

    @staticmethod
    def tag(step: int) -> str:
        return tag_of(step)

    def _newest_intact(self) -> Optional[tuple[str, dict[str, Any]]]:
        pointer = latest_file(self.root)
        if not pointer.is_file():
            return None
        named = pointer.read_text().strip()
        if not is_tag(named):
            raise RuntimeError(f"{pointer} holds {named[:40]!r}, not a step folder name: it was altered by hand; write "
                               f"the name of a complete step folder into it (like {tag_of(8)!r}), or delete it to "
                               f"start over")
        older = [p for p in reversed(step_folders(self.root))
                 if step_of(p.name) < step_of(named) and meta_file(p).is_file()]
        return first_intact([self.root / named, *older], "resuming from" if self.dist else "using", self._said)

    def latest(self) -> Optional[tuple[str, dict[str, Any]]]:
        """(tag, meta) of the newest intact complete checkpoint, or None for a fresh run: the one ``latest`` names,
        unless its files differ from the checksums its save recorded (or its ``meta.json`` is unreadable): then the
        next older intact one, said on stdout; none intact is an error. With a process group (every rank calls
        this) rank 0 checks and broadcasts its answer, so that every rank resumes the same checkpoint."""
        found, error = None, None
        if self.dist is None or self.dist.is_main:
            try:
                found = self._newest_intact()
            except Exception as e:  # raised below, once the other ranks know (none waits for a broadcast)
                error = e
        if self.dist is not None:
            found, text = broadcast_object((found, None if error is None else f"{type(error).__name__}: {error}"))
            if text and error is None:
                raise RuntimeError(f"rank 0 found no checkpoint to resume: {text}")
        if error is not None:
            raise error
        return found

    def complete(self, tag: Optional[str] = None) -> tuple[str, dict[str, Any]]:
        """(tag, meta) of checkpoint ``tag``, or of the latest when None; refuses one that is missing, partial or
        damaged."""
        if tag is None:
            found = self.latest()
            if found is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.root} (no {latest_file(self.root).name}): "
                                        f"train first, or name a checkpoint folder")
            return found
        folder = self.root / tag
        done = [p.name for p in step_folders(self.root) if meta_file(p).is_file()]
        if not meta_file(folder).is_file():
            raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {meta_file(folder).name}); complete "
                                    f"ones: {done or 'none'}")
        meta, problem = check(folder, self._said)
        if meta is None:
            raise RuntimeError(f"checkpoint {folder} is damaged ({problem}); complete ones: {done}")
        return tag, meta

    def save(self, step: int, engines: dict[str, Any], client_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own ``rank_state``. A failed write (a full disk) raises
        :class:`CheckpointWriteError` on every rank, with ``latest`` on the previous checkpoint."""
        tag = self.tag(step)
        folder = self.root / tag
        if self.dist.is_main and folder.exists():  # leftovers of a crashed save of this same step
            shutil.rmtree(folder)
        barrier()
        started = time.time() - 1.0  # files this rank writes from here on (mtime granularity: be generous)
        failure, sums = None, {}
        try:
            for name, engine in engines.items():
                save_engine(engine, folder, name, client_state)
            maybe_fault("save", step)
            mine = rank_file(folder, self.dist.rank)
            tmp = mine.with_name(mine.name + ".tmp")
            torch.save({**rank_state, "rng": rng_state()}, tmp)
            os.replace(tmp, mine)
            fsync_tree(folder, newer_than=started)  # what this rank wrote is on disk before it says so
            sums = own_checksums(folder, self.dist.rank)  # its own shards, while they are in the page cache
        except Exception as e:
            if not is_write_error(e):
                raise
            failure = describe_write_error(e, free_bytes(folder))
        # Every rank has written, synced and hashed its files (or failed: then all raise below, none waits).
        reports = all_gather_object((failure, sums))
        failed = [(r, why) for r, (why, _) in enumerate(reports) if why]
        message = None
        if self.dist.is_main:
            try:
                if not failed:
                    files = {k: v for _, own in reports for k, v in own.items()}
                    files.update(checksums(folder, [n for n in folder_files(folder) if n not in files]))
                    atomic_write_text(meta_file(folder), json.dumps({**meta, "step": step, "tag": tag, "world_size":
                                                                     self.dist.world_size, "files": files}, indent=1))
                    atomic_write_text(latest_file(self.root), tag)
            except OSError as e:
                failed = [(0, describe_write_error(e, free_bytes(folder)))]
            if failed:
                message = self._write_failed(tag, failed)
            else:
                self._prune(keep=tag)
        message = broadcast_object(message)
        if message:
            raise CheckpointWriteError(message)
        return folder

    def _write_failed(self, tag: str, failed: list[tuple[int, str]]) -> str:
        """Delete the partial folder of ``tag`` (every rank has given up on it) and say what to do."""
        pointer = latest_file(self.root)
        prev = pointer.read_text().strip() if pointer.is_file() else None
        if prev != tag:  # (the pointer moved, and only syncing its folder failed: then it is complete)
            shutil.rmtree(self.root / tag, ignore_errors=True)
        return write_failed_message(self.root / tag, failed, pointer, self.root / prev if prev else None)

    def _prune(self, keep: str) -> None:
        """Complete checkpoints beyond ``keep_last``, and partial folders older than ``keep`` (crashed saves)."""
        folders = step_folders(self.root)  # oldest first, by step number
        done = [p for p in folders if meta_file(p).is_file()]
        stale = [p for p in folders if step_of(p.name) < step_of(keep) and not meta_file(p).is_file()]
        for old in done[:-self.keep_last] + stale:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def prepare_resume(self, tag: str, meta: dict[str, Any], engine_names: tuple[str, ...]) -> dict[str, str]:
        """Engine tags to load; converts to universal format first when the world size changed (collective)."""
        if meta["world_size"] == self.dist.world_size:
            return {name: name for name in engine_names}
        if self.dist.is_main:
            for name in engine_names:
                convert_to_universal(self.root / tag, name)
        barrier()
        return {name: f"{name}_universal" for name in engine_names}

    def load(self, tag: str, engines: dict[str, Any], engine_tags: dict[str, str]) -> tuple[dict, Optional[dict]]:
        """Load every engine; returns (client state of the first engine, this rank's state or None)."""
        client_state: dict[str, Any] = {}
        for name, engine in engines.items():
            universal = engine_tags[name] != name  # the buffers are not in the universal format: see load_engine
            state = load_engine(engine, self.root / tag, engine_tags[name], buffers_from=name if universal else None)
            client_state = client_state or state
        mine = rank_file(self.root / tag, self.dist.rank)
        rank_state = torch.load(mine, weights_only=False) if mine.is_file() else None
        return client_state, rank_state

    def resize_state(self, tag: str, world_size: int) -> tuple[dict[str, Any], list[Optional[dict]]]:
        """Collective: what every rank of another world size continues from, the same on all of them: the data
        state, and the task states of all old ranks (rank order) for the task to share out among the new ranks.

        Rank 0 reads the files of all ``world_size`` ranks that wrote ``tag`` (the folder is shared storage) and
        checks that they stopped at the same position (every rank consumes the same batches); the data state is old
        rank 0's with the skipped samples of all old ranks, so that their total carries over (on new rank 0).
        """
        state, tasks, error = None, [], None
        if self.dist.is_main:
            files = [rank_file(self.root / tag, r) for r in range(world_size)]
            missing = [f.name for f in files if not f.is_file()]
            loaded = [] if missing else [torch.load(f, weights_only=False) for f in files]
            states = [s["data"] for s in loaded]
            positions = sorted({s.get("batches") for s in states})
            if missing:
                error = f"{self.root / tag} lacks {missing}: the checkpoint is damaged"
            elif len(positions) != 1:
                error = f"the ranks that wrote {self.root / tag} stopped at different batches {positions}"
            else:
                state = dict(states[0])
                if all(isinstance(s.get("skipped"), int) for s in states):
                    state["skipped"] = sum(s["skipped"] for s in states)
                tasks = [s.get("task") for s in loaded]
        state, tasks, error = broadcast_object((state, tasks, error))  # every rank raises together, none waits
        if error:
            raise RuntimeError(f"{error}; point {latest_file(self.root)} at an older complete checkpoint")
        return state, tasks
