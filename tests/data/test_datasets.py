"""Manifest readers, map-style datasets with skip reporting, and webdataset shard streaming."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlbridge.data import webdataset
from vlbridge.data.datasets import (
    CaptionDataset,
    CaptionRecord,
    SkippedSample,
    SkipReport,
    VqaDataset,
    collate_skipping,
    read_caption_manifest,
    read_coco_karpathy,
    read_vqa_manifest,
)
from vlbridge.data.images import ImageProcessorConfig
from vlbridge.data.transforms import EvalTransform, TrainTransform
from vlbridge.data.webdataset import WebDatasetShards, expand_braces
from vlbridge.errors import InputError

CONFIG = ImageProcessorConfig(image_size=(16, 16))


def _image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------


def test_caption_manifest_relative_paths_and_ids(tmp_path: Path) -> None:
    sub = tmp_path / "set"
    sub.mkdir()
    manifest = _write_jsonl(
        sub / "captions.jsonl",
        [
            {"image": "img/a.jpg", "caption": " a cat ", "image_id": "cat-1"},
            "",  # blank lines are ignored
            {"image": "img/b.jpg", "caption": "a dog", "image_id": 7},
            {"image": "img/c.jpg", "caption": ["one", "two"]},
        ],
    )
    records = read_caption_manifest(manifest)
    assert records == [
        CaptionRecord(image=sub / "img/a.jpg", caption="a cat", image_id="cat-1"),
        CaptionRecord(image=sub / "img/b.jpg", caption="a dog", image_id="7"),
        CaptionRecord(image=sub / "img/c.jpg", caption="one", image_id="img/c.jpg"),
        CaptionRecord(image=sub / "img/c.jpg", caption="two", image_id="img/c.jpg"),
    ]


def test_caption_manifest_bad_line_names_file_and_line(tmp_path: Path) -> None:
    manifest = _write_jsonl(
        tmp_path / "m.jsonl", [{"image": "a.jpg", "caption": "x"}, "", '{"image": "b.jpg", "caption": ']
    )
    with pytest.raises(InputError, match=r"m\.jsonl:3: invalid JSON"):
        read_caption_manifest(manifest)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "a.jpg"}, "missing required key 'caption'"),
        ({"caption": "x"}, "missing required key 'image'"),
        ({"image": "a.jpg", "caption": 5}, "'caption' must be"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_caption_manifest_missing_keys(tmp_path: Path, row: object, message: str) -> None:
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"image": "ok.jpg", "caption": "fine"}, row])
    with pytest.raises(InputError, match=rf"m\.jsonl:2: .*{message}"):
        read_caption_manifest(manifest)


def test_caption_manifest_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_caption_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no records"):
        read_caption_manifest(tmp_path / "empty.jsonl")


def test_vqa_manifest(tmp_path: Path) -> None:
    manifest = _write_jsonl(
        tmp_path / "vqa.jsonl",
        [
            {"image": "i/1.png", "question": "What color? ", "answers": ["red", "red", "orange"]},
            {
                "image": "i/2.png",
                "question": "How many?",
                "answers": [{"answer": "2"}, {"answer": "two"}],
                "question_type": "how many",
                "image_id": 42,
                "question_id": 420,
            },
        ],
    )
    first, second = read_vqa_manifest(manifest)
    assert first.image == tmp_path / "i/1.png" and first.question == "What color?"
    assert first.answers == ("red", "red", "orange") and first.image_id == "i/1.png" and first.question_type is None
    assert second.answers == ("2", "two") and second.image_id == "42" and second.question_id == "420"
    assert second.question_type == "how many"
    _write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "question": "q?"}])
    with pytest.raises(InputError, match=r"bad\.jsonl:1: missing required key 'answers'"):
        read_vqa_manifest(tmp_path / "bad.jsonl")


def test_coco_karpathy_format(tmp_path: Path) -> None:
    def entry(split: str, cocoid: int, *captions: str) -> dict[str, object]:
        return {
            "filepath": "val2014",
            "filename": f"COCO_{cocoid}.jpg",
            "split": split,
            "cocoid": cocoid,
            "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
        }

    data = {
        "images": [
            entry("train", 1, "a cat.", "a small cat"),
            entry("restval", 2, "a dog"),
            entry("val", 3, "a bird"),
            entry("test", 4, "a horse ", "two horses"),
        ]
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    root = tmp_path / "coco"
    train = read_coco_karpathy(path, root, "train")  # train + restval, the BLIP-2/LAVIS convention
    assert [(r.caption, r.image_id) for r in train] == [("a cat.", "1"), ("a small cat", "1"), ("a dog", "2")]
    assert train[0].image == root / "val2014" / "COCO_1.jpg"
    assert [r.caption for r in read_coco_karpathy(path, root, ["train"])] == ["a cat.", "a small cat"]
    test = read_coco_karpathy(path, root, "test")
    assert [(r.caption, r.image_id) for r in test] == [("a horse", "4"), ("two horses", "4")]
    with pytest.raises(InputError, match="no captions for split 'tset'"):
        read_coco_karpathy(path, root, "tset")


def test_coco_lavis_formats(tmp_path: Path) -> None:
    train = tmp_path / "coco_karpathy_train.json"
    train.write_text(
        json.dumps(
            [
                {"image": "val2014/a.jpg", "caption": "a cat", "image_id": "coco_1"},
                {"image": "val2014/a.jpg", "caption": "the cat", "image_id": "coco_1"},
                {"image": "train2014/b.jpg", "caption": "a dog", "image_id": 2},
            ]
        )
    )
    records = read_coco_karpathy(train, tmp_path / "imgs", "train")
    assert [(r.image, r.caption, r.image_id) for r in records] == [
        (tmp_path / "imgs/val2014/a.jpg", "a cat", "coco_1"),
        (tmp_path / "imgs/val2014/a.jpg", "the cat", "coco_1"),
        (tmp_path / "imgs/train2014/b.jpg", "a dog", "2"),
    ]
    test = tmp_path / "coco_karpathy_test.json"
    test.write_text(json.dumps([{"image": "val2014/c.jpg", "caption": ["x one", "x two"]}]))
    records = read_coco_karpathy(test, tmp_path, "test")
    assert [(r.caption, r.image_id) for r in records] == [("x one", "val2014/c.jpg"), ("x two", "val2014/c.jpg")]
    (tmp_path / "weird.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(InputError, match="unknown format"):
        read_coco_karpathy(tmp_path / "weird.json", tmp_path, "train")


# ---------------------------------------------------------------------------------------------------------------
# Map-style datasets and skip reporting
# ---------------------------------------------------------------------------------------------------------------


def _manifest_with_bad_images(tmp_path: Path, good: int = 8) -> tuple[Path, Path, Path]:
    img = tmp_path / "img"
    img.mkdir()
    rows: list[object] = []
    for i in range(good):
        (img / f"{i}.jpg").write_bytes(_image_bytes(i))
        rows.append({"image": f"img/{i}.jpg", "caption": f"caption {i}"})
    corrupt = img / "corrupt.jpg"
    corrupt.write_bytes(_image_bytes(99)[:40])  # a truncated JPEG
    rows.insert(3, {"image": "img/corrupt.jpg", "caption": "corrupt"})
    rows.insert(6, {"image": "img/missing.jpg", "caption": "missing"})
    return _write_jsonl(tmp_path / "m.jsonl", rows), corrupt, img / "missing.jpg"


def test_caption_dataset_skips_and_reports_through_workers(tmp_path: Path) -> None:
    manifest, corrupt, missing = _manifest_with_bad_images(tmp_path)
    dataset = CaptionDataset(read_caption_manifest(manifest), TrainTransform(CONFIG))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_skipping)
    report = SkipReport()
    texts, indices = [], []
    for batch in loader:
        report.update(batch)
        if batch["batch_size"]:
            assert batch["pixel_values"].shape == (batch["batch_size"], 3, 16, 16)
            texts += batch["text"]
            indices += batch["index"].tolist()
    assert sorted(texts) == sorted(f"caption {i}" for i in range(8))
    assert len(set(indices)) == 8
    assert report.count == 2 and report.samples == 8
    assert set(report.paths) == {str(corrupt), str(missing)}
    summary = report.summary()
    assert "skipped 2 samples" in summary and str(corrupt) in summary and str(missing) in summary


def test_caption_dataset_item_and_views(tmp_path: Path) -> None:
    manifest, _, _ = _manifest_with_bad_images(tmp_path, good=2)
    records = read_caption_manifest(manifest)
    dataset = CaptionDataset(records, TrainTransform(CONFIG), views=2, seed=5)
    item = dataset[0]
    assert isinstance(item, dict)
    assert item["pixel_values"].shape == (2, 3, 16, 16)
    assert not torch.equal(item["pixel_values"][0], item["pixel_values"][1])  # two different views
    assert item["text"] == "caption 0" and item["image_id"] == "img/0.jpg" and item["index"] == 0
    assert torch.equal(dataset[0]["pixel_values"], item["pixel_values"])  # reproducible per (epoch, sample, view)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["pixel_values"], item["pixel_values"])  # a new epoch, new augmentation
    bad = dataset[[r.caption for r in records].index("corrupt")]
    assert isinstance(bad, SkippedSample) and bad.path.endswith("corrupt.jpg") and "ImageError" in bad.reason
    eval_set = CaptionDataset(records, EvalTransform(CONFIG))
    assert eval_set[0]["pixel_values"].shape == (3, 16, 16)
    plain = CaptionDataset(records, lambda image: torch.zeros(3, 2, 2))  # transforms without a generator work too
    assert plain[1]["pixel_values"].shape == (3, 2, 2)


def test_collate_all_skipped_and_none() -> None:
    batch = collate_skipping([SkippedSample("a.jpg", "ImageError: bad"), None])
    assert batch == {"skipped": [("a.jpg", "ImageError: bad"), ("<unknown>", "dataset returned None")], "batch_size": 0}
    report = SkipReport()
    report.update(batch)
    report.update([("b.jpg", "OSError: x"), SkippedSample("a.jpg", "ImageError: bad")])
    assert report.count == 4 and report.paths == ["a.jpg", "<unknown>", "b.jpg"]
    assert "... and 1 more" in report.summary(max_items=2)
    assert SkipReport().summary() == "skipped 0 samples (of 0)"


def test_vqa_dataset(tmp_path: Path) -> None:
    (tmp_path / "1.png").write_bytes(_image_bytes(1, "PNG"))
    manifest = _write_jsonl(tmp_path / "v.jsonl", [{"image": "1.png", "question": "q?", "answers": ["a", "b"]}] * 2)
    dataset = VqaDataset(read_vqa_manifest(manifest), EvalTransform(CONFIG))
    batch = collate_skipping([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["answers"] == [["a", "b"], ["a", "b"]] and batch["question"] == ["q?", "q?"]
    assert batch["index"].tolist() == [0, 1] and batch["question_id"] == [None, None]


# ---------------------------------------------------------------------------------------------------------------
# Webdataset shards
# ---------------------------------------------------------------------------------------------------------------


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shards(tmp_path: Path, n_shards: int = 2, per_shard: int = 3) -> list[str]:
    """Even shards hold jpg+txt, odd ones png+json; keys are globally unique."""
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}_{i:04d}"
            if s % 2 == 0:
                members += [(f"{key}.jpg", _image_bytes(s * 100 + i)), (f"{key}.txt", f"text {key}".encode())]
            else:
                meta = {"caption": f"text {key}", "image_id": f"id-{key}"}
                members += [
                    (f"{key}.png", _image_bytes(s * 100 + i, "PNG")),
                    (f"{key}.json", json.dumps(meta).encode()),
                ]
        paths.append(str(_write_tar(tmp_path / f"shard-{s:03d}.tar", members)))
    return paths


def test_expand_braces() -> None:
    assert expand_braces("shard-{000..002}.tar") == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(InputError):
        expand_braces("x-{5..1}.tar")
    with pytest.raises(InputError):
        expand_braces("x-{oops}.tar")


def test_webdataset_reads_in_order_with_brace_expansion(tmp_path: Path) -> None:
    _shards(tmp_path)
    dataset = WebDatasetShards([str(tmp_path / "shard-{000..001}.tar")], EvalTransform(CONFIG))
    samples = list(dataset)
    assert [s["text"] for s in samples] == [f"text s{s}_{i:04d}" for s in range(2) for i in range(3)]
    assert [s["image_id"] for s in samples] == [f"s0_000{i}" for i in range(3)] + [f"id-s1_000{i}" for i in range(3)]
    assert all(s["pixel_values"].shape == (3, 16, 16) for s in samples)
    assert samples[0]["shard"].endswith("shard-000.tar") and samples[3]["key"] == "s1_0000"
    with pytest.raises(InputError, match="not found"):
        WebDatasetShards(str(tmp_path / "shard-{000..005}.tar"), EvalTransform(CONFIG))


def test_webdataset_two_workers_no_duplicates(tmp_path: Path) -> None:
    shards = _shards(tmp_path, n_shards=4, per_shard=3)
    dataset = WebDatasetShards(shards, TrainTransform(CONFIG), shuffle_buffer=4, seed=1)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skipping)
    keys = [key for batch in loader for key in batch["key"]]
    assert sorted(keys) == sorted(f"s{s}_{i:04d}" for s in range(4) for i in range(3))


def test_webdataset_augmentation_is_reproducible_per_epoch(tmp_path: Path) -> None:
    dataset = WebDatasetShards(_shards(tmp_path, n_shards=1, per_shard=2), TrainTransform(CONFIG), views=2)
    first = [s["pixel_values"] for s in dataset]
    assert first[0].shape == (2, 3, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, (s["pixel_values"] for s in dataset)))
    dataset.set_epoch(1)
    assert not any(torch.equal(a, s["pixel_values"]) for a, s in zip(first, dataset))


def test_webdataset_splits_shards_across_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = _shards(tmp_path, n_shards=4, per_shard=1)
    dataset = WebDatasetShards(shards, EvalTransform(CONFIG))
    seen = []
    for rank in range(2):
        monkeypatch.setattr(webdataset, "_rank_world", lambda rank=rank: (rank, 2))
        assert dataset.worker_shards() == shards[rank::2]
        seen += [s["key"] for s in dataset]
    assert sorted(seen) == ["s0_0000", "s1_0000", "s2_0000", "s3_0000"]


def test_webdataset_corrupt_members_are_skipped_and_reported(tmp_path: Path) -> None:
    members = [
        ("a/000.jpg", _image_bytes(0)),
        ("a/000.txt", b"good zero"),
        ("a/001.jpg", b"\xff\xd8 definitely not a jpeg"),
        ("a/001.txt", b"corrupt"),
        ("a/002.jpg", _image_bytes(2)),  # no caption
        ("a/003.jpg", _image_bytes(3)),
        ("a/003.txt", b"good three"),
    ]
    shard = _write_tar(tmp_path / "bad.tar", members)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(_write_tar(tmp_path / "full.tar", members[:4] + members[:2]).read_bytes()[:2000])
    loader = DataLoader(
        WebDatasetShards([str(shard)], EvalTransform(CONFIG)), batch_size=8, collate_fn=collate_skipping
    )
    report = SkipReport()
    texts = []
    for batch in loader:
        report.update(batch)
        texts += batch["text"]
    assert texts == ["good zero", "good three"]
    assert report.paths == [f"{shard}#a/001", f"{shard}#a/002"]
    assert "no caption" in report.entries[1][1]
    # A shard that breaks off mid-stream is reported once and iteration goes on.
    items = list(WebDatasetShards([str(truncated)], EvalTransform(CONFIG)))
    assert isinstance(items[-1], SkippedSample) and "unreadable shard" in items[-1].reason
