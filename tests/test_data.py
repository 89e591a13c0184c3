"""The data package: generated shapes (determinism, held-out combinations), folder/JSONL/CSV and tar-shard sources
(bad metadata raises naming the file; bad images are skipped and counted, in-process and from worker processes),
the grain pipeline (batch format, determinism, exact resume at a step) and the caption tokenizer."""

import io
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from big_vision_lite.checkpoints.tokenizer import load_tokenizer
from big_vision_lite.data import (
    CaptionFileSource,
    ShapesSpec,
    TarShardSource,
    all_captions,
    decode_image,
    folder_source,
    held_out_combinations,
    held_out_pairs,
    make_eval_batches,
    make_train_loader,
    open_source,
    shapes_batch,
    shapes_example,
    shapes_source,
    tar_source,
    tokenize_fixed,
    train_caption_tokenizer,
)
from big_vision_lite.data.pipeline import permute

SPEC = ShapesSpec()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_caption_tokenizer(all_captions(SPEC), tmp_path_factory.mktemp("tok"))


# --- shapes ---------------------------------------------------------------------------------------------------


def test_shapes_deterministic_and_random_access():
    a, b = shapes_example(SPEC, "train", 123), shapes_example(SPEC, "train", 123)
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"]
    # An example does not depend on what it is rendered with.
    batch = shapes_batch(SPEC, "train", [7, 123, 5])
    np.testing.assert_array_equal(batch[1]["image"], a["image"])
    assert not np.array_equal(shapes_example(SPEC, "train", 124)["image"], a["image"])
    other = shapes_example(ShapesSpec(seed=1), "train", 123)
    assert not np.array_equal(other["image"], a["image"])
    big = shapes_example(ShapesSpec(image_size=64), "test", 0)
    assert big["image"].shape == (64, 64, 3)
    attrs = a["attributes"]
    assert a["caption"].startswith(f"a {attrs['size']} {attrs['colour']} {attrs['shape']} ")
    with pytest.raises(IndexError):
        shapes_example(SPEC, "test", len(held_out_combinations(SPEC)))


def test_shapes_held_out_never_in_train_and_every_value_is():
    held = set(held_out_pairs(SPEC))
    assert len(held) == round(0.25 * len(SPEC.colours) * len(SPEC.shapes))
    train = shapes_batch(SPEC, "train", np.arange(20_000))
    pairs = {(e["attributes"]["colour"], e["attributes"]["shape"]) for e in train}
    assert not pairs & held
    assert len(pairs) == len(SPEC.colours) * len(SPEC.shapes) - len(held)  # all other pairs are drawn
    for field, values in (
        ("colour", SPEC.colours),
        ("shape", SPEC.shapes),
        ("size", SPEC.sizes),
        ("position", ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom")),
    ):
        assert {e["attributes"][field] for e in train} >= set(values), field

    combos = held_out_combinations(SPEC)
    test = [shapes_example(SPEC, "test", i) for i in range(len(combos))]
    assert len(combos) == len(held) * len(SPEC.sizes) * 9
    assert [e["attributes"] for e in test] == combos
    captions = [e["caption"] for e in test]
    assert len(set(captions)) == len(captions)
    assert set(captions) <= set(all_captions(SPEC))
    assert not set(captions) & {e["caption"] for e in train}
    # Another seed holds out other pairs.
    assert set(held_out_pairs(ShapesSpec(seed=3))) != held


def test_shapes_spec_errors():
    with pytest.raises(ValueError, match="colours"):
        ShapesSpec(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="holdout_fraction"):
        ShapesSpec(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="too many"):
        held_out_pairs(ShapesSpec(holdout_fraction=0.9))


# --- tokenizer ------------------------------------------------------------------------------------------------


def test_caption_tokenizer_roundtrip(tmp_path, tokenizer):
    captions = all_captions(SPEC)
    start = time.perf_counter()
    tok = train_caption_tokenizer(captions, tmp_path / "a")
    assert time.perf_counter() - start < 2.0
    train_caption_tokenizer(captions, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "b/tokenizer.model").read_bytes()
    loaded = load_tokenizer(tmp_path / "a")
    assert (tok.pad_id, tok.eos_ids, tok.bos_id) == (0, (1,), 2) == (loaded.pad_id, loaded.eos_ids, loaded.bos_id)
    assert loaded.encode_batch(captions, add_bos=False) == tokenizer.encode_batch(captions, add_bos=False)
    assert tok.vocab_size < 300  # the ~30 caption words, each one piece, plus characters
    assert len(tok.encode("a small red circle at the top left", add_bos=False)) == 8
    assert loaded.decode(loaded.encode(captions[5])) == captions[5]

    ids = tokenize_fixed(loaded, ["a small red circle at the top left", "red " * 20], max_len=12)
    assert ids.dtype == np.int32 and ids.shape == (2, 12)
    assert ids[0, 8] == 1 and (ids[0, 9:] == 0).all()  # 8 words, EOS, padding
    assert ids[1, -1] == 1 and (ids[1] != 0).all()  # truncated, EOS kept last
    with pytest.raises(ValueError, match="no \\(non-empty\\) captions"):
        train_caption_tokenizer(["", " "], tmp_path / "c")


# --- sources --------------------------------------------------------------------------------------------------


def _image_bytes(colour: tuple[int, int, int], fmt: str, size: tuple[int, int] = (20, 12), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(out, format=fmt)
    return out.getvalue()


GOOD = [("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255)), ("white", (255, 255, 255))]


def _write_folder(root: Path) -> list[dict[str, str]]:
    """4 readable images (PNG, JPEG, greyscale, palette), one corrupted, one missing; returns the rows."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i, (name, colour) in enumerate(GOOD):
        fmt, mode = [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "P"), ("PNG", "L")][i]  # white survives "L"
        path = f"img/{name}.{fmt.lower()}"
        (root / path).write_bytes(_image_bytes(colour, fmt, mode=mode))
        rows.append({"image": path, "caption": f"a {name} picture"})
    (root / "img/broken.png").write_bytes(_image_bytes((9, 9, 9), "PNG")[:40])  # truncated: header only
    rows.insert(2, {"image": "img/broken.png", "caption": "a broken picture"})
    rows.append({"image": "img/missing.png", "caption": "a missing picture"})
    return rows


def _write_jsonl(root: Path) -> Path:
    rows = _write_folder(root)
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_caption_file_sources(tmp_path):
    jsonl = _write_jsonl(tmp_path / "j")
    source = open_source(jsonl.parent)  # the folder's one captions file
    assert isinstance(source, CaptionFileSource) and len(source) == 6
    assert source[0]["caption"] == "a red picture" and source[0]["image"][:4] == b"\x89PNG"
    assert source[5]["image"] is None and "missing.png" in source[5]["error"]

    rows = _write_folder(tmp_path / "c")
    lines = ["image,caption,extra"] + [f'{r["image"]},"{r["caption"]}, quoted",x' for r in rows]
    (tmp_path / "c/captions.csv").write_text("\n".join(lines) + "\n")
    csv_source = folder_source(tmp_path / "c")
    assert len(csv_source) == 6 and csv_source[1]["caption"] == "a green picture, quoted"


def test_bad_metadata_names_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "fine"}\n{"image": "b.png", "caption": \n')
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}:2: not valid JSON"):
        CaptionFileSource(bad)
    bad.write_text('{"image": "a.png", "caption": "fine"}\n\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}:3: missing field 'caption'"):
        CaptionFileSource(bad)
    csv = tmp_path / "bad.csv"
    csv.write_text("image,text\na.png,hello\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(csv))}: missing column 'caption'"):
        CaptionFileSource(csv)
    csv.write_text("image,caption\na.png,hello\nb.png\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(csv))}:3: missing field 'caption'"):
        CaptionFileSource(csv)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'nope.jsonl'))}: no such captions file"):
        CaptionFileSource(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no such file or folder"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*.tar shards and no"):
        open_source(tmp_path / "empty")

    shard = tmp_path / "bad.tar"
    _write_tar(shard, [("k1.png", _image_bytes((1, 2, 3), "PNG")), ("k1.json", b"{not json")])
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}:k1.json: not valid JSON"):
        TarShardSource(shard)
    _write_tar(shard, [("k1.png", _image_bytes((1, 2, 3), "PNG"))])
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}: sample 'k1' has an image but no caption"):
        TarShardSource(shard)
    shard.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}"):
        TarShardSource(shard)
    with pytest.raises(ValueError, match="no such tar shard"):
        TarShardSource([tmp_path / "missing.tar"])


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_shards(root: Path) -> None:
    """Two shards: 4 readable samples (jpg+txt, png+json, ...), one corrupted jpg, one caption without image."""
    root.mkdir()
    _write_tar(
        root / "shard-000.tar",
        [
            ("000.jpg", _image_bytes(GOOD[0][1], "JPEG")),
            ("000.txt", b"a red picture\n"),
            ("001.png", _image_bytes(GOOD[1][1], "PNG")),
            ("001.json", json.dumps({"caption": "a green picture", "id": 1}).encode()),
            ("001.cls", b"3"),
            ("002.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
            ("002.txt", b"a broken picture"),
        ],
    )
    _write_tar(
        root / "shard-001.tar",
        [
            ("sub/003.txt", b"a missing picture"),
            ("sub/004.jpeg", _image_bytes(GOOD[2][1], "JPEG")),
            ("sub/004.txt", b"a blue picture"),
            ("005.png", _image_bytes(GOOD[3][1], "PNG", mode="P")),
            ("005.txt", b"a white picture"),
        ],
    )


def test_tar_shards_random_access(tmp_path):
    _write_shards(tmp_path / "shards")
    source = open_source(tmp_path / "shards")
    assert isinstance(source, TarShardSource) and len(source) == 6
    assert source.captions() == [f"a {c} picture" for c in ("red", "green", "broken", "missing", "blue", "white")]
    for i in (4, 0, 5, 1):  # any order
        record = source[i]
        pixels = decode_image(record["image"], 8)
        colour = dict(GOOD)[record["caption"].split()[1]]
        assert np.abs(pixels.astype(int) - colour).max() < 12, record["key"]
    assert source[3]["image"] is None and "sub/003: no image member" in source[3]["error"]
    glob_source = tar_source(str(tmp_path / "shards" / "shard-00*.tar"))
    assert glob_source.captions() == source.captions()


# --- pipeline -------------------------------------------------------------------------------------------------


def _caption_of_rows(tokenizer, batch) -> list[str]:
    return [tokenizer.decode(row) for row in batch["text"]]


@pytest.mark.parametrize(("layout", "worker_count"), [("jsonl", 0), ("jsonl", 1), ("tar", 0), ("tar", 2)])
def test_bad_images_are_skipped_and_counted(tmp_path, tokenizer, layout, worker_count):
    if layout == "jsonl":
        source = open_source(_write_jsonl(tmp_path))
    else:
        _write_shards(tmp_path / "shards")
        source = open_source(tmp_path / "shards")
    # 4 steps of 3 = 12 positions = exactly 2 epochs of the 6 examples: each bad image is met twice.
    with make_train_loader(
        source, batch_size=3, image_size=16, tokenizer=tokenizer, max_len=8, seed=0, num_steps=4,
        worker_count=worker_count,
    ) as loader:
        batches = list(loader)
    assert len(batches) == 4
    assert loader.skipped_total == 4 == sum(int(b["skipped"]) for b in batches)
    report = loader.skipped_report()
    assert report.startswith("skipped 4 unreadable image(s), e.g. ")
    assert ("broken.png" in report or "missing.png" in report) if layout == "jsonl" else ":002: " in report
    for batch in batches:
        assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["text"].shape == (3, 8) and batch["text"].dtype == np.int32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        for caption, image in zip(_caption_of_rows(tokenizer, batch), batch["image"], strict=True):
            colour = dict(GOOD)[caption.split()[1]]  # only readable examples, each with its own caption
            expected = np.array(colour, dtype=np.float32) / 127.5 - 1
            assert np.abs(image.mean(axis=(0, 1)) - expected).max() < 0.1

    with make_eval_batches(
        source, batch_size=4, image_size=16, tokenizer=tokenizer, max_len=8, worker_count=worker_count
    ) as loader:
        evals = list(loader)
    assert len(evals) == len(loader) == 2 and loader.skipped_total == loader.skipped == 2
    mask = np.concatenate([b["mask"] for b in evals])
    index = np.concatenate([b["index"] for b in evals])
    bad = [2, 5] if layout == "jsonl" else [2, 3]
    assert mask.tolist() == [i not in bad for i in range(6)] + [False, False]  # bad images and padding masked
    assert index.tolist() == [-1 if i in bad else i for i in range(6)] + [-1, -1]
    captions = [c for b in evals for c in b["caption"].tolist()]
    assert captions == ["" if i in bad else c for i, c in enumerate(source.captions())] + ["", ""]


def test_train_loader_deterministic_and_resumes(tokenizer):
    source = shapes_source(SPEC, "train")
    kwargs = dict(batch_size=8, image_size=32, tokenizer=tokenizer, max_len=12, seed=5)
    with make_train_loader(source, **kwargs, num_steps=6) as loader:
        fresh = list(loader)
    with make_train_loader(source, **kwargs, num_steps=6) as loader:
        again = list(loader)
    with make_train_loader(source, **kwargs, start_step=4, num_steps=6) as loader:
        resumed = list(loader)
    assert next(loader, None) is None  # a closed loader does not silently restart
    with make_train_loader(source, **{**kwargs, "seed": 6}, num_steps=1) as loader:
        other = next(loader)
    for a, b in zip(fresh, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["text"], b["text"])
    assert len(resumed) == 2
    for a, b in zip(fresh[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["text"], b["text"])
    assert not np.array_equal(other["text"], fresh[0]["text"])
    # Captions describe the images: step 0 with no shuffling is examples 0..7 of the split.
    with make_train_loader(source, **kwargs, shuffle=False, num_steps=1) as loader:
        plain = next(loader)
    expected = shapes_batch(SPEC, "train", range(8))
    assert _caption_of_rows(tokenizer, plain) == [e["caption"] for e in expected]
    np.testing.assert_allclose(plain["image"], np.stack([e["image"] for e in expected]) / 127.5 - 1, atol=1e-6)


def test_resume_with_bad_images_across_epochs_and_workers(tmp_path, tokenizer):
    source = open_source(_write_jsonl(tmp_path))
    kwargs = dict(batch_size=4, image_size=8, tokenizer=tokenizer, max_len=8, seed=1, num_steps=7)
    with make_train_loader(source, **kwargs) as loader:
        fresh = list(loader)
    with make_train_loader(source, **kwargs, start_step=3, worker_count=2) as loader:
        resumed = list(loader)
    for a, b in zip(fresh[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["text"], b["text"])
        assert a["skipped"] == b["skipped"]
    # Each epoch visits each example once: over epochs 0-3 (steps 0..5 = 24 positions) every caption 4 times,
    # the bad ones' slots filled by replacements.
    assert sum(int(b["skipped"]) for b in fresh[:6]) == 8


def test_permute_is_a_seeded_bijection():
    for n in (1, 2, 7, 1000, 4097):
        p = permute(np.arange(n), n, (0, 0))
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, (0, 0)), permute(np.arange(100), 100, (0, 1)))
    big = permute(np.arange(10), 2**40, (3, 0))
    assert (big >= 0).all() and (big < 2**40).all() and len(set(big.tolist())) == 10


def test_loader_argument_errors(tokenizer):
    source = shapes_source(SPEC, "test")
    with pytest.raises(ValueError, match="batch_size"):
        make_train_loader(source, batch_size=0, image_size=8, tokenizer=tokenizer, max_len=8, seed=0)
    with pytest.raises(ValueError, match="max_len"):
        make_eval_batches(source, batch_size=4, image_size=8, tokenizer=tokenizer, max_len=1)
    with pytest.raises(ValueError, match="start_step"):
        make_train_loader(source, batch_size=4, image_size=8, tokenizer=tokenizer, max_len=8, seed=0, start_step=-1)
    with make_eval_batches(source, batch_size=50, image_size=32, tokenizer=None, max_len=8) as loader:
        batches = list(loader)
    assert [int(b["mask"].sum()) for b in batches] == [50, 50, 8]
    captions = [c for b in batches for c, m in zip(b["caption"].tolist(), b["mask"], strict=True) if m]
    assert captions == [shapes_example(SPEC, "test", i)["caption"] for i in range(108)]
