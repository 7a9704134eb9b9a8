"""Built-in demo shards: real photographs from the scikit-image wheel, fast to make, reused, held-out val."""

from __future__ import annotations

import json
import tarfile
import time
from itertools import islice
from pathlib import Path

from PIL import Image

from vitvq.data import DataConfig, build_eval_loader, build_train_stream, ensure_demo_shards
from vitvq.data.builtin import PHOTOS, SPLITS, skimage_photos


def test_demo_shards_made_once_from_skimage_photos(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    train = ensure_demo_shards(tmp_path, 64)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"demo data took {elapsed:.1f} s"
    photos = skimage_photos()
    assert {p.name for p in photos} <= set(PHOTOS) and len(photos) >= 5
    index = json.loads(train.read_text())
    assert index["num_samples"] == SPLITS["train"][0] and index["num_classes"] == len(photos)
    mtimes = {p: p.stat().st_mtime_ns for p in train.parent.glob("*.tar")}
    val = ensure_demo_shards(tmp_path, 64, split="val")  # already there: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in train.parent.glob("*.tar")} == mtimes
    widths = {p.name: Image.open(p).size[0] for p in photos}
    for path, inside in ((train, lambda x, s, w: x + s <= 0.8 * w + 1), (val, lambda x, s, w: x >= int(0.8 * w))):
        idx = json.loads(path.read_text())
        with tarfile.open(path.parent / idx["shards"][0]["name"]) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        assert metas and all(inside(m["box"][0], m["box"][2], widths[m["src"]]) for m in metas)  # val held out


def test_demo_source_feeds_the_stream(tmp_path: Path) -> None:
    cfg = DataConfig(source="demo", demo_root=str(tmp_path), image_size=64, num_workers=0)
    stream = build_train_stream(cfg, batch_size=16, rank=0, world_size=1, seed=0)
    batch = next(iter(stream))
    assert batch["image"].shape == (16, 3, 64, 64) and -1 <= batch["image"].min() < batch["image"].max() <= 1
    assert stream.num_classes == len(skimage_photos()) and batch["label"].max() < stream.num_classes
    val = build_eval_loader(str(ensure_demo_shards(tmp_path, 64, "val")), image_size=64, batch_size=64, rank=0,
                            world_size=1)
    assert sum(b["image"].shape[0] for b in islice(val, 100)) == SPLITS["val"][0]
