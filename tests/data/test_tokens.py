"""Token shards (data/tokens.py) and the encoder job (data/encode.py, launch/encode_tokens.py), on real tar shards
and a real (tiny, untrained) tokenizer: codes equal the tokenizer's own, resumes are exact, lineage is enforced."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from functools import partial
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from vitvq.configs import from_dict, to_dict
from vitvq.data import (ShardError, TokenDataConfig, TokenLineageError, build_eval_loader, build_token_eval_loader,
                        build_token_stream, check_lineage, encode_tokens, token_grid, token_index, token_vocab_size)
from vitvq.data.shards import sha256_file
from vitvq.data.transforms import load_crop, square_box, to_float
from vitvq.data.verify import ShardMismatch
from vitvq.models.tokenizer import Tokenizer, TokenizerConfig

SIZE, GRID, VOCAB = 32, 4, 64  # the "debug" tokenizer preset: ViT at 32 px, patch 8, 64 codes
TV_TENCROP = [4, 0, 1, 2, 3, 9, 5, 6, 7, 8]  # our view k is torchvision ten_crop's view TV_TENCROP[k]


def members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a tar, keys split at the first dot as webdataset does."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def stored(index_path: Path) -> dict[str, np.ndarray]:
    """{key: (views, grid, grid) codes} as written in the token shards."""
    index = json.loads(index_path.read_text())
    out = {}
    for e in index["shards"]:
        for key, m in members(index_path.parent / e["name"]).items():
            out[key] = np.load(io.BytesIO(m["tokens.npy"]))
    return out


def take(stream, n: int) -> list[dict]:
    return list(islice(stream, n))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["label"], y["label"])
                                    and x["key"] == y["key"] for x, y in zip(a, b))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, mk) -> SimpleNamespace:
    """30 source images in 4 shards (8, 8, 8, 6; 3 classes), two tokenizer exports with different weights, and
    the source encoded with `center`, `flip` and `tencrop` (in this process)."""
    root = tmp_path_factory.mktemp("tokens")
    src = mk.make_shards(root, 30, shard_size=8)
    exports = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        exports.append(Tokenizer(from_dict(TokenizerConfig, "debug")).save_export(root / f"tok{seed}.pt"))
    tok = Tokenizer.load_export(exports[0])
    enc = {a: Path(encode_tokens(exports[0], str(src), root / a, augment=a, progress=False)["index_path"])
           for a in ("center", "flip", "tencrop")}
    images = {k: m["jpg"] for e in json.loads(src.read_text())["shards"] for k, m in members(src.parent / e["name"]).items()}
    return SimpleNamespace(root=root, src=src, tok_path=exports[0], other_path=exports[1], tok=tok, enc=enc,
                           images=images)


@torch.no_grad()
def codes_of(tok: Tokenizer, images: torch.Tensor) -> np.ndarray:
    """Codes of uint8 (B, 3, S, S) images computed directly by the tokenizer: (B, grid, grid)."""
    return tok.encode(to_float(images, "minus_one_one")).indices.numpy()


@pytest.fixture(scope="module")
def direct(env) -> dict[str, tuple[np.ndarray, int, torch.Tensor]]:
    """{key: (codes, label, center crop)} through the evaluation loader's centered crops, encoded directly."""
    out = {}
    for b in build_eval_loader(str(env.src), image_size=SIZE, batch_size=8, rank=0, world_size=1):
        with torch.no_grad():
            codes = env.tok.encode(b["image"]).indices.numpy()
        crops = ((b["image"] + 1) * 127.5).round().to(torch.uint8)
        for k, c, y, x in zip(b["key"], codes, b["label"].tolist(), crops):
            out[k] = (c, y, x)
    assert len(out) == 30
    return out


def test_round_trip_through_stream_and_eval_loader(env, direct) -> None:
    index = json.loads(env.enc["center"].read_text())
    src = json.loads(env.src.read_text())
    assert index["kind"] == "tokens" and index["complete"] and index["format"] == src["format"]
    assert index["num_samples"] == 30 and [e["samples"] for e in index["shards"]] == [8, 8, 8, 6]
    assert [e["name"] for e in index["shards"]] == [e["name"] for e in src["shards"]]  # one per source, same number
    assert index["num_classes"] == 3 and index["classes"] == src["classes"]
    t = index["tokens"]
    assert (t["grid"], t["vocab_size"], t["dtype"], t["views"], t["augment"]) == (GRID, VOCAB, "uint16", 1, "center")
    assert t["tokenizer"]["sha256"] == sha256_file(env.tok_path) and t["tokenizer"]["config"] == to_dict(env.tok.cfg)
    assert t["source"]["spec"] == str(env.src)
    assert token_grid(str(env.enc["center"])) == GRID and token_vocab_size(str(env.enc["center"])) == VOCAB
    m = next(iter(members(env.enc["center"].parent / index["shards"][0]["name"]).items()))
    arr = np.load(io.BytesIO(m[1]["tokens.npy"]))
    assert arr.dtype == np.uint16 and arr.shape == (1, GRID, GRID)
    assert json.loads(m[1]["json"]) == {"src_key": m[0], "src_shard": index["shards"][0]["name"]}

    cfg = TokenDataConfig(train_tokens=str(env.enc["center"]), num_workers=0, shuffle_buffer=7)
    stream = build_token_stream(cfg, batch_size=5, rank=0, world_size=1, seed=0)
    assert stream.batches_per_epoch == 6 and stream.grid == GRID and stream.vocab_size == VOCAB
    seen = set()
    for b in take(stream, 6):
        assert b["tokens"].dtype == torch.long and b["tokens"].shape == (5, GRID * GRID)
        for k, codes, y in zip(b["key"], b["tokens"], b["label"].tolist()):
            assert np.array_equal(codes.numpy(), direct[k][0].reshape(-1)) and y == direct[k][1]  # raster order
            seen.add(k)
    assert seen == set(direct)

    keys = []
    for rank in range(2):
        loader = build_token_eval_loader(str(env.enc["center"]), batch_size=4, rank=rank, world_size=2,
                                         num_workers=rank)  # rank 1 reads in a worker process
        for b in loader:
            keys += b["key"]
            for k, codes, y in zip(b["key"], b["tokens"], b["label"].tolist()):
                assert np.array_equal(codes.numpy(), direct[k][0].reshape(-1)) and y == direct[k][1]
    assert sorted(keys) == sorted(direct)  # every sample exactly once over the two ranks


def test_flip_and_tencrop_views_are_the_augmented_crops(env, direct) -> None:
    flip = stored(env.enc["flip"])
    keys = sorted(direct)
    centers = torch.stack([direct[k][2] for k in keys])  # (30, 3, S, S) uint8
    assert np.array_equal(np.stack([flip[k][0] for k in keys]), codes_of(env.tok, centers))
    assert np.array_equal(np.stack([flip[k][1] for k in keys]), codes_of(env.tok, centers.flip(-1)))

    ten = stored(env.enc["tencrop"])
    assert all(v.shape == (10, GRID, GRID) for v in ten.values())
    for k in keys[:6]:
        # LlamaGen: shorter side to int(1.1 * size), centered square, then torchvision's TenCrop at size.
        square = load_crop(env.images[k], int(SIZE * 1.1), partial(square_box, rng=None))
        tv = torch.stack(TF.ten_crop(square, SIZE))  # (10, 3, S, S) in torchvision's order
        assert np.array_equal(ten[k], codes_of(env.tok, tv[TV_TENCROP]))


def test_views_random_draws_per_position_views_first_takes_view_0(env) -> None:
    flip = stored(env.enc["flip"])
    assert sum(not np.array_equal(v[0], v[1]) for v in flip.values()) > 20  # mirrored crops give other codes
    chosen = {"random": [], "first": []}
    for views in chosen:
        cfg = TokenDataConfig(train_tokens=str(env.enc["flip"]), num_workers=0, shuffle_buffer=7, views=views)
        for b in take(build_token_stream(cfg, batch_size=5, rank=0, world_size=1, seed=0), 12):  # two epochs
            for k, codes in zip(b["key"], b["tokens"].numpy()):
                hits = [v for v in range(2) if np.array_equal(codes, flip[k][v].reshape(-1))]
                assert hits, k
                chosen[views].append(hits[-1])
    assert set(chosen["first"]) == {0}
    assert 15 < sum(chosen["random"]) < 45  # about half of the 60 positions show the mirror
    loader = build_token_eval_loader(str(env.enc["flip"]), batch_size=7, rank=0, world_size=1)
    got = {k: c for b in loader for k, c in zip(b["key"], b["tokens"].numpy())}
    assert got.keys() == flip.keys() and all(np.array_equal(got[k], flip[k][0].reshape(-1)) for k in got)  # view 0


def test_unconditional_source_gives_label_minus_one(env, tmp_path: Path, mk) -> None:
    from vitvq.data.shards import WriteOptions, write_shards
    from vitvq.data.sources import list_folder
    flat = tmp_path / "flat"  # no class folders: labels -1, no .cls members
    flat.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        (flat / f"im{i}.jpg").write_bytes(mk.jpeg_bytes(mk.photo_like(rng, 40, 30)))
    write_shards(list_folder(flat), tmp_path / "src", WriteOptions(name="flat", shard_size=4), progress=False)
    index = encode_tokens(env.tok_path, str(tmp_path / "src" / "flat-train-index.json"), tmp_path / "out",
                          progress=False)
    assert index["num_samples"] == 8 and index["num_classes"] == 0
    assert all("cls" not in m for e in index["shards"] for m in members(tmp_path / "out" / e["name"]).values())
    cfg = TokenDataConfig(train_tokens=index["index_path"], num_workers=0, shuffle_buffer=3)
    batch = next(iter(build_token_stream(cfg, batch_size=8, rank=0, world_size=1, seed=0)))
    assert batch["label"].tolist() == [-1] * 8 and batch["tokens"].shape == (8, GRID * GRID)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_restores_exactly_the_next_batches(env, mode: str) -> None:
    cfg = TokenDataConfig(train_tokens=str(env.enc["flip"]), num_workers=2, shuffle_buffer=7, mode=mode)
    kw = dict(batch_size=2, world_size=2, seed=5)
    # 30 // (2 ranks x 2 workers x 2) = 3 batches per worker: 6 per epoch per rank; 9 crosses into epoch 2.
    whole = {r: take(build_token_stream(cfg, rank=r, **kw), 9) for r in range(2)}
    first = build_token_stream(cfg, rank=0, **kw)
    head = take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as in a checkpoint
    assert state["batches"] == 4
    assert same(head + take(build_token_stream(cfg, rank=0, state=state, **kw), 5), whole[0])
    assert same(take(build_token_stream(cfg, rank=1, state=state, **kw), 5), whole[1][4:])  # any rank's state



def test_another_world_size_starts_every_rank_at_the_next_epoch(env) -> None:
    # The same policy as the image stream's (one TrainStream): 2 ranks -> 1 in the middle of epoch 1.
    cfg = TokenDataConfig(train_tokens=str(env.enc["flip"]), num_workers=0, shuffle_buffer=7, mode="epoch")
    old = build_token_stream(cfg, batch_size=2, rank=1, world_size=2, seed=5)  # 30 // 4 = 7 batches per epoch
    take(old, 9)
    new = build_token_stream(cfg, batch_size=2, rank=0, world_size=1, seed=5, state=old.state_dict())
    assert new.epoch == 2 and new.batches == 2 * new.batches_per_epoch
    keys = [k for b in take(new, new.batches_per_epoch) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 30  # 30 // 2 = 15 batches: every sample of the epoch once

def test_rerun_rewrites_only_the_missing_shard(env, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = encode_tokens(env.tok_path, str(env.src), out, progress=False)
    ipath = Path(first["index_path"])
    shards = sorted(out.glob("*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in shards}
    text = ipath.read_text()
    shards[1].unlink()
    again = encode_tokens(env.tok_path, str(env.src), out, progress=False)
    assert (again["written"], again["kept"]) == (1, 3)
    after = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in sorted(out.glob("*.tar"))}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != shards[1].name)  # untouched
    assert after[shards[1].name][1] == before[shards[1].name][1]  # rewritten, to the same bytes
    assert ipath.read_text() == text
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("*.lock"))
    other = encode_tokens(env.other_path, str(env.src), out, progress=False)  # another tokenizer: all re-encoded
    assert (other["written"], other["kept"]) == (4, 0)


def test_lineage_accepts_the_encoding_export_and_refuses_another(env) -> None:
    spec = str(env.enc["center"])
    assert check_lineage(spec, env.tok_path)["tokens"]["grid"] == GRID
    pattern = f"{env.enc['center'].parent}/syn-train-{{000000..000003}}.tar"  # the index is found beside the shards
    assert check_lineage(pattern, env.tok_path)["num_samples"] == 30
    with pytest.raises(TokenLineageError) as err:
        check_lineage(spec, env.other_path)
    msg = str(err.value)
    assert str(env.enc["center"]) in msg and str(env.tok_path) in msg and str(env.other_path) in msg
    assert f"launch/encode_tokens.py --tokenizer {env.other_path}" in msg
    with pytest.raises(ShardError, match=r"not token shards.*encode_tokens") as err:
        token_index(str(env.src))  # an image index
    assert str(env.src) in str(err.value)


def test_corrupt_source_image_is_skipped_and_counted(env, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(env.src.parent, src)
    shard = src / json.loads(env.src.read_text())["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar]
    bad_key = items[3][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for m, data in items:
            data = b"\xff\xd8garbage" if m.name == f"{bad_key}.jpg" else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ShardMismatch, match=shard.name):  # the shard is not what its index records
        encode_tokens(env.tok_path, str(src / env.src.name), tmp_path / "checked", progress=False)
    assert not list((tmp_path / "checked").glob("*.tar"))  # stopped before writing tokens of unchecked bytes
    # a trusted store (verify off): the undecodable image is skipped and counted, the rest encoded
    index = encode_tokens(env.tok_path, str(src / env.src.name), tmp_path / "out", progress=False, verify=False)
    assert index["complete"] and index["num_samples"] == 29 and index["num_skipped"] == 1
    assert index["skipped"][0]["src_key"] == bad_key and index["skipped"][0]["src_shard"] == shard.name
    assert index["shards"][0]["samples"] == 7
    cfg = TokenDataConfig(train_tokens=index["index_path"], num_workers=0, shuffle_buffer=7)
    keys = [k for b in take(build_token_stream(cfg, batch_size=1, rank=0, world_size=1, seed=0), 29) for k in b["key"]]
    assert len(set(keys)) == 29 and bad_key not in keys


def test_two_ray_workers_write_the_same_bytes(env, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    index = encode_tokens(env.tok_path, str(env.src), tmp_path / "ray", augment="flip", workers=2,
                          cpus_per_worker=0.5, progress=False)
    ours, ref = Path(index["index_path"]), env.enc["flip"]
    assert index["written"] == 4 and ours.read_bytes() == ref.read_bytes()
    for e in index["shards"]:
        assert (ours.parent / e["name"]).read_bytes() == (ref.parent / e["name"]).read_bytes()


def test_cli_end_to_end_and_refusals(env, tmp_path: Path, capsys, monkeypatch) -> None:
    from vitvq.launch.encode_tokens import main
    out = tmp_path / "cli"
    index = main(["--tokenizer", str(env.tok_path), "--shards", str(env.src), "--out", str(out), "--name", "toy",
                  "--limit", "10", "--batch-size", "3", "--no-progress"])
    printed = capsys.readouterr().out
    ipath = out / "toy-train-index.json"
    assert index["num_samples"] == 10 and [e["samples"] for e in index["shards"]] == [8, 2]
    assert f"index: {ipath}" in printed and f"tokens.train_tokens={ipath}" in printed
    assert f"stage-2 overrides: tokenizer={env.tok_path} " in printed
    assert stored(ipath).keys() <= stored(env.enc["center"]).keys()
    for k, v in stored(ipath).items():  # batch size 3 instead of 64: the same codes
        assert np.array_equal(v, stored(env.enc["center"])[k])

    residual = from_dict(TokenizerConfig, {"preset": "debug", "quantizer": {"kind": "residual", "l2_norm": False,
                                                                             "codebook_size": VOCAB, "code_dim": 8}})
    rq = Tokenizer(residual).save_export(tmp_path / "rq.pt")
    with pytest.raises(ValueError, match="residual quantizer.*one code per position"):
        main(["--tokenizer", str(rq), "--shards", str(env.src), "--out", str(tmp_path / "rq")])
    with pytest.raises(ValueError, match="would overwrite the source"):
        main(["--tokenizer", str(env.tok_path), "--shards", str(env.src), "--out", str(env.src.parent)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["--tokenizer", str(env.tok_path), "--shards", str(env.src), "--out", str(out)])
    assert "use --workers N" in capsys.readouterr().err
