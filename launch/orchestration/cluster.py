"""What a multi-node run needs, checked once on the driver before anything starts.

``launch/orchestration/ray_train.fit`` (and the pipeline) call :func:`check_multinode` before building the ``TorchTrainer``:

- every folder the run writes and reads back (``train.out_dir``, Ray Train's ``--storage``, an absolute SQLite
  tracking store) must be the same storage on every node. The driver writes a random token into each folder and a
  zero-CPU Ray task pinned to every alive node (``NodeAffinitySchedulingStrategy(soft=False)``) reads it back; a
  folder that some node cannot see is refused, naming the folder, what it is for and the nodes. Ray checks none of
  this itself: a ``RunConfig(storage_path=...)`` on a node-local disk is written on whichever node reports, and
  the checkpoint Ray names after a restart may not exist where the new worker looks; our own
  ``check_shared_folder`` (trainer/checkpoint.py) runs inside the workers, once Ray has placed them and DeepSpeed
  has started.
- the MLflow store: MLflow's default (``sqlite:///mlflow.db``) and any relative ``sqlite:`` or file-store path
  mean a different file on every node (each resolves it in its own working directory), so rank 0 after a restart
  on another node would write a second, partial run. With more than one node these are refused, naming
  ``MLFLOW_TRACKING_URI`` and the fix (a tracking server, or an absolute path on shared storage). A single node
  passes: the relative default is what the plain launchers use.

Messages name folders and URIs through ``configs/redact.py`` (no credential is printed).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

from vitvq.configs.redact import redact

PathLike = Union[str, Path]
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3.x's default store, relative to the working directory
TOKEN_PREFIX = ".vitvq-visible-"


class ClusterCheckError(RuntimeError):
    """A multi-node requirement is not met; the message names the field, the nodes and the fix."""


# -- the cluster ----------------------------------------------------------------------------------
def alive_nodes() -> list[dict[str, Any]]:
    """The alive Ray nodes that can run workers (CPU or GPU resources), as ``ray.nodes()`` describes them. Needs
    ``ray.init`` (a head started with ``num_cpus=0`` only hosts the driver and Train's controller)."""
    import ray
    return [n for n in ray.nodes() if n.get("Alive") and
            (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def _node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (node {node.get('NodeID', '?')[:8]})"


def _read_tokens(tokens: list[tuple[str, str, str]]) -> list[bool]:
    """On one node: whether each ``(folder, file name, token)`` is there with the token the driver wrote."""
    seen = []
    for folder, name, token in tokens:
        try:
            seen.append((Path(folder) / name).read_text() == token)
        except OSError:
            seen.append(False)
    return seen


def check_visible_everywhere(paths: dict[str, PathLike], timeout_s: float = 60.0) -> None:
    """Refuse (:class:`ClusterCheckError`) any folder of ``paths`` (what it is -> folder, created if missing) that some
    alive node cannot see at the same path with the same content. One node: nothing to check, returns at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    if not ray.is_initialized():
        return
    nodes = alive_nodes()
    if len(nodes) <= 1 or not paths:
        return
    written: dict[str, tuple[str, str, str]] = {}
    try:
        for what, folder in paths.items():
            folder = Path(folder).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(16)
            (folder / f"{TOKEN_PREFIX}{token}").write_text(token)
            written[what] = (str(folder), f"{TOKEN_PREFIX}{token}", token)
        read = ray.remote(_read_tokens)
        items = list(written.values())
        refs = {read.options(num_cpus=0, max_retries=0,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(items): n for n in nodes}
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        blind: dict[str, list[str]] = {what: [] for what in written}
        for ref in done:
            try:
                seen = ray.get(ref)
            except ray.exceptions.RayError:  # the node died meanwhile: it cannot see anything
                seen = [False] * len(items)
            for what, ok in zip(written, seen):
                if not ok:
                    blind[what].append(_node_name(refs[ref]))
        for ref in late:
            ray.cancel(ref, force=True)
    finally:
        for folder, name, _ in written.values():
            (Path(folder) / name).unlink(missing_ok=True)
    problems = [f"  {what} = {written[what][0]}: not visible from {', '.join(names)}" for what, names in blind.items()
                if names]
    if late:
        problems.append(f"  no answer within {timeout_s:.0f} s from {', '.join(_node_name(refs[r]) for r in late)}")
    if problems:
        raise ClusterCheckError(
            f"a folder of this run is not the same storage on all {len(nodes)} Ray nodes:\n" + "\n".join(problems) +
            "\nEvery node must mount the same storage at the same path (NFS, a cluster file system, a shared volume) "
            "and the run's folders must be on it, e.g. train.out_dir=/shared/runs/NAME --storage /shared/ray; a "
            "node-local disk (/tmp, a local SSD, a container's own file system) is a different folder on each node")


def effective_tracking_uri(uri: Optional[str] = None) -> str:
    """The effective MLflow tracking URI: ``uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _local_store(uri: str) -> Optional[tuple[str, bool]]:
    """``(path, is_sqlite)`` of a store that is a file on this machine (sqlite, file store, plain path); None for
    servers (http(s), databases)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db, sqlite:////absolute/path.db (SQLAlchemy's form)
        return (uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri[len("sqlite:"):]), True
    if parsed.scheme == "file":
        return (parsed.path if parsed.netloc in ("", "localhost") else parsed.netloc + parsed.path), False
    if not parsed.scheme or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return uri, False
    return None


def check_tracking(uri: Optional[str] = None) -> None:
    """Refuse (:class:`ClusterCheckError`) a tracking store that would differ from node to node: with more than one
    alive node, a relative ``sqlite:`` URI (MLflow's default among them) or a relative file-store path; an absolute
    one must be visible everywhere. Servers (http(s), databases) and single-node clusters pass."""
    import ray
    effective = effective_tracking_uri(uri)
    store = _local_store(effective)
    if store is None or not ray.is_initialized():
        return
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    path, is_sqlite = store
    source = ("the tracking URI given" if uri else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
              else "MLflow's default, as MLFLOW_TRACKING_URI is not set")
    if not os.path.isabs(path):
        raise ClusterCheckError(
            f"MLFLOW_TRACKING_URI={redact(effective)} ({source}) is a {'SQLite file' if is_sqlite else 'file store'} "
            f"relative to each process's working directory: on {len(nodes)} Ray nodes rank 0 would write a different "
            f"store wherever it runs (a restart on another node splits the run). Run a tracking server on the head, "
            f"reachable by the nodes: `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri "
            f"sqlite:////shared/mlflow.db` (give --host the head's cluster address, or tunnel the port, for the nodes "
            f"to reach it), then MLFLOW_TRACKING_URI=http://HEAD:5000; or an absolute path on storage every node "
            f"mounts: MLFLOW_TRACKING_URI=sqlite:////shared/mlflow.db")
    check_visible_everywhere({f"MLFLOW_TRACKING_URI={redact(effective)} (its folder)": Path(path).parent})


def check_multinode(out_dirs: dict[str, PathLike], tracking_uri: Optional[str] = None) -> None:
    """Both checks, once on the driver before anything starts: a tracking store that is the same for every node
    (first: it writes nothing), and the folders of ``out_dirs`` (what -> folder) on storage every node sees."""
    check_tracking(tracking_uri)
    check_visible_everywhere(out_dirs)


__all__ = ["ClusterCheckError", "alive_nodes", "check_visible_everywhere", "effective_tracking_uri", "check_tracking",
           "check_multinode"]
