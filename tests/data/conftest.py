"""Small shard sets made by the tests themselves (no network, no shared data needed), and a local HTTP server."""

from __future__ import annotations

import functools
import io
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vitvq.data.shards import WriteOptions, write_shards
from vitvq.data.sources import list_folder


def photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random image (JPEG-friendly, unlike white noise), distinct per seed."""
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_folder(root: Path, n: int, classes: int = 3, seed: int = 0) -> Path:
    """``n`` JPEGs of varied sizes in ``classes`` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(24, 56)), int(rng.integers(24, 56))
        (folder / f"img{i:04d}.jpg").write_bytes(jpeg_bytes(photo_like(rng, w, h)))
    return root


def make_shards(root: Path, n: int, shard_size: int, name: str = "syn", seed: int = 0) -> Path:
    """Shards + index of ``n`` generated images; returns the index path."""
    src = make_folder(root / "src", n, seed=seed)
    write_shards(list_folder(src), root / "shards", WriteOptions(name=name, shard_size=shard_size), progress=False)
    return root / "shards" / f"{name}-train-index.json"


@pytest.fixture(scope="session")
def syn_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """83 images in 9 shards of <= 10 (83 is deliberately not a multiple of ranks x workers x batch)."""
    return make_shards(tmp_path_factory.mktemp("syn"), 83, shard_size=10)


@pytest.fixture(scope="session")
def mk() -> SimpleNamespace:
    """The image and shard makers above, for test modules (pytest's importlib mode cannot import conftest)."""
    return SimpleNamespace(photo_like=photo_like, jpeg_bytes=jpeg_bytes, make_folder=make_folder,
                           make_shards=make_shards)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def http_serve() -> Iterator[Callable[[Path], str]]:
    """``serve(folder)`` -> base URL of a real HTTP server on 127.0.0.1 serving ``folder`` (stopped after the test)."""
    servers = []

    def serve(folder: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
