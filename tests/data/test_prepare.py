"""Shard writer: ImageNet sample, every kind of bad file, resumable re-runs, FFHQ zip, ImageNet val labels."""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitvq.launch.prepare_data import main as prepare


def read_shards(index_path: Path) -> dict[str, dict]:
    """All samples of all shards of an index, read with plain tarfile: {key: {ext: bytes}}."""
    index = json.loads(index_path.read_text())
    out: dict[str, dict] = {}
    for s in index["shards"]:
        with tarfile.open(index_path.parent / s["name"]) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_imagenet_sample(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "imagenet-sample"
    index = prepare(["imagenet", "--src", str(src), "--out", str(tmp_path), "--shard-size", "250", "--no-progress"])
    assert index["num_samples"] == 1000 and index["num_classes"] == 1000 and index["num_skipped"] == 0
    assert [s["samples"] for s in index["shards"]] == [250] * 4
    synsets = sorted(p.name for p in src.iterdir() if p.is_dir())  # the standard class index, computed here
    samples = read_shards(tmp_path / "imagenet-train-index.json")
    assert len(samples) == 1000
    gray_sources = 0
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == synsets.index(meta["src"].split("/")[0])
        stored = Image.open(io.BytesIO(sample["jpg"]))
        assert stored.mode == "RGB", key
        if Image.open(src / meta["src"]).mode == "L":
            gray_sources += 1
            assert meta["note"] == "L converted to RGB"
        else:  # RGB originals keep their exact bytes
            assert sample["jpg"] == (src / meta["src"]).read_bytes()
    assert gray_sources == 23 == len(index["converted"])


def bad_folder(root: Path, mk) -> Path:
    rng = np.random.default_rng(1)
    good = mk.photo_like(rng, 40, 32)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "good.jpg").write_bytes(mk.jpeg_bytes(good))
    good.save(root / "a" / "good.png")
    full = mk.jpeg_bytes(mk.photo_like(rng, 64, 64))
    (root / "a" / "truncated.JPEG").write_bytes(full[: len(full) * 6 // 10])
    (root / "a" / "notimage.JPEG").write_bytes(b"<html>404 not found</html>")
    (root / "b" / "empty.JPEG").write_bytes(b"")
    good.save(root / "b" / "png_named.JPEG", format="PNG")
    good.convert("CMYK").save(root / "b" / "cmyk.JPEG", format="JPEG", quality=95)
    good.convert("L").save(root / "b" / "gray.JPEG", format="JPEG", quality=95)
    rgba = good.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white, not black
    rgba.save(root / "b" / "clear.png")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


def test_bad_files(tmp_path: Path, mk) -> None:
    src = bad_folder(tmp_path / "src", mk)
    index = prepare(["folder", "--src", str(src), "--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"])
    reasons = {s["path"]: s["reason"] for s in index["skipped"]}
    assert set(reasons) == {"a/truncated.JPEG", "a/notimage.JPEG", "b/empty.JPEG", "b/notes.txt"}
    assert "truncated" in reasons["a/truncated.JPEG"]
    assert "not an image" in reasons["a/notimage.JPEG"]
    assert "empty file" in reasons["b/empty.JPEG"]
    assert "extension" in reasons["b/notes.txt"]
    assert index["num_skipped"] == 4 and index["num_samples"] == 6 and index["num_classes"] == 2
    samples = {json.loads(s["json"])["src"]: s for s in read_shards(tmp_path / "out" / "src-train-index.json").values()}
    assert set(samples) == {"a/good.jpg", "a/good.png", "b/png_named.JPEG", "b/cmyk.JPEG", "b/gray.JPEG", "b/clear.png"}
    assert "png" in samples["b/png_named.JPEG"] and "jpg" not in samples["b/png_named.JPEG"]
    for path, sample in samples.items():
        ext = "png" if "png" in sample else "jpg"
        assert Image.open(io.BytesIO(sample[ext])).mode == "RGB", path
    # CMYK -> RGB gives the colours back (the naive conversion that forgets Adobe inversion would not).
    cmyk = np.asarray(Image.open(io.BytesIO(samples["b/cmyk.JPEG"]["jpg"])), dtype=float)
    ref = np.asarray(Image.open(src / "a" / "good.png"), dtype=float)
    assert np.abs(cmyk - ref).mean() < 8
    assert np.asarray(Image.open(io.BytesIO(samples["b/clear.png"]["png"]))).min() == 255  # transparent -> white
    notes = {c["path"]: c["what"] for c in index["converted"]}
    assert notes["b/png_named.JPEG"].startswith("PNG named .jpeg, stored as png")
    assert notes["b/cmyk.JPEG"] == "CMYK converted to RGB" and notes["b/gray.JPEG"] == "L converted to RGB"


def test_rerun_completes_missing_and_keeps_complete(tmp_path: Path, mk) -> None:
    src = mk.make_folder(tmp_path / "src", 40)
    out = tmp_path / "out"
    args = ["folder", "--src", str(src), "--out", str(out), "--shard-size", "10", "--no-progress"]
    first = prepare(args)
    shards = [out / s["name"] for s in first["shards"]]
    assert len(shards) == 4
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    shards[1].unlink()  # lost shard
    with open(shards[2], "r+b") as f:  # damaged shard: same size, one byte flipped
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = prepare(args)
    assert second["written"] == 2
    for i, p in enumerate(shards):
        mtime, data = before[p.name]
        assert p.read_bytes() == data  # rewritten shards are byte-identical (fixed tar metadata)
        if i in (0, 3):
            assert p.stat().st_mtime_ns == mtime, f"complete shard {p.name} was rewritten"
    assert json.loads((out / "src-train-index.json").read_text())["complete"]


def test_ffhq_zip_is_unconditional_and_lossless(tmp_path: Path, mk) -> None:
    rng = np.random.default_rng(2)
    zpath = tmp_path / "ffhq.zip"
    originals = {}
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(5):
            im = mk.photo_like(rng, 48, 48)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            zf.writestr(f"images/{i:05d}.png", buf.getvalue())
            originals[f"images/{i:05d}.png"] = np.asarray(im)
    index = prepare(["ffhq", "--src", str(zpath), "--out", str(tmp_path / "out"), "--resize", "32", "--no-progress"])
    assert index["num_samples"] == 5 and index["num_classes"] == 0
    for sample in read_shards(tmp_path / "out" / "ffhq-train-index.json").values():
        assert "cls" not in sample and "png" in sample  # unconditional, re-encoded losslessly
        src = json.loads(sample["json"])["src"]
        stored = np.asarray(Image.open(io.BytesIO(sample["png"])))
        ref = np.asarray(Image.fromarray(originals[src]).resize((32, 32), Image.Resampling.BICUBIC))
        assert np.array_equal(stored, ref)


def test_imagenet_val_layout_with_labels(tmp_path: Path, mk) -> None:
    rng = np.random.default_rng(3)
    val = tmp_path / "val"
    val.mkdir()
    synsets = ["n01440764", "n01443537", "n01484850"]
    lines = ["ImageId,PredictionString"]
    for i in range(6):
        (val / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(mk.jpeg_bytes(mk.photo_like(rng, 32, 32)))
        lines.append(f"ILSVRC2012_val_{i + 1:08d},{synsets[(i * 2) % 3]} 1 2 3 4")
    (val / "ILSVRC2012_val_00000099.JPEG").write_bytes(mk.jpeg_bytes(mk.photo_like(rng, 32, 32)))  # unlabelled
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines))
    index = prepare(["imagenet", "--src", str(val), "--labels", str(tmp_path / "LOC_val_solution.csv"),
                     "--split", "val", "--out", str(tmp_path / "out"), "--no-progress"])
    assert index["num_samples"] == 6 and index["classes"] == synsets
    assert [s["reason"] for s in index["skipped"]] == ["no label for this file in the labels file"]
    for sample in read_shards(tmp_path / "out" / "imagenet-val-index.json").values():
        i = int(json.loads(sample["json"])["src"][15:23]) - 1
        assert int(sample["cls"]) == (i * 2) % 3


def test_a_folder_without_images_is_refused_naming_it_and_what_was_looked_for(tmp_path: Path) -> None:
    # Issue 20.10: an empty folder wrote 0 samples and exited 0.
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"--src {re.escape(str(empty))} holds no image.*looked for files in it.*"
                                         r"\.jpg.*holds no files"):
        prepare(["folder", "--src", str(empty), "--out", str(out), "--no-progress"])
    (empty / "cats").mkdir()
    (empty / "cats" / "readme.txt").write_text("no pictures here")
    with pytest.raises(SystemExit, match=r"class sub-folders \(cats\).*cats/readme\.txt \(not an image file name"):
        prepare(["folder", "--src", str(empty), "--out", str(out), "--no-progress"])
    assert not out.exists()  # refused before anything was written


def test_a_missing_source_says_it_does_not_exist(tmp_path: Path) -> None:
    # Issue 20.10: a missing ImageNet folder was reported as "has no synset folders".
    missing = tmp_path / "imagenet" / "train"
    for kind in ("imagenet", "folder", "ffhq"):
        with pytest.raises(SystemExit, match=rf"--src {re.escape(str(missing))} does not exist"):
            prepare([kind, "--src", str(missing), "--out", str(tmp_path / "out"), "--no-progress"])


def test_a_folder_of_only_unreadable_images_fails_after_listing_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"<html>404</html>")
    (src / "b.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"none of the 2 images .* could be written"):
        prepare(["folder", "--src", str(src), "--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"])
    index = json.loads((tmp_path / "out" / "src-train-index.json").read_text())
    assert index["num_samples"] == 0 and index["num_skipped"] == 2  # skipped and counted, as for any bad file
