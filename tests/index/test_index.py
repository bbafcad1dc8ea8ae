"""The image index: build, search against exact ITC scores, incremental updates, resume after a kill, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlbridge
from vlbridge import cli
from vlbridge.errors import InputError
from vlbridge.index import AnnSettings, ImageIndex, build_index
from vlbridge.index.store import IndexStore

from factory import build_checkpoint

TEXTS = ["a red circle", "a blue square on the left", "two green objects", "a photo of a star"]


def noise_image(path: Path, seed: int, size: int = 24) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def retrieval_dir(tmp_path_factory) -> str:
    return str(build_checkpoint(tmp_path_factory.mktemp("retrieval"), family="retrieval", seed=3))


@pytest.fixture(scope="module")
def model(retrieval_dir):
    return vlbridge.load(retrieval_dir)


@pytest.fixture()
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(7):
        noise_image(root / ("sub" if i % 3 == 0 else ".") / f"img{i}.png", seed=i)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"not a jpeg either")
    return root


def all_images(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("img*.png"))


def exact_ranking(model, root: Path, text: str) -> list[str]:
    """Every image ranked by exact ITC similarity (Blip2.itc: max over queries), best first."""
    paths = all_images(root)
    sims = model.itc([str(root / p) for p in paths], [text])[:, 0]
    order = sorted(range(len(paths)), key=lambda i: (-float(sims[i]), i))
    return [paths[i] for i in order], sims


def test_build_then_search_matches_exact_itc(model, photos, tmp_path):
    report = build_index(photos, model, tmp_path / "idx", batch_size=3, progress=False)
    assert (report.added, report.images, report.ann["kind"]) == (7, 7, "flat")
    assert [p for p, _ in report.skipped] == ["broken.jpg"]
    index = ImageIndex(tmp_path / "idx", model)
    for text in TEXTS:
        expected, sims = exact_ranking(model, photos, text)
        hits = index.search(text, k=7)
        assert [h.path for h in hits] == expected
        by_path = dict(zip(all_images(photos), sims.tolist()))
        for h in hits:
            assert h.itc == pytest.approx(by_path[h.path], abs=1e-5)


def test_image_query_finds_itself_first(model, photos, tmp_path):
    build_index(photos, model, tmp_path / "idx", progress=False)
    index = ImageIndex(tmp_path / "idx", model)
    for rel in all_images(photos):
        hits = index.search(image=str(photos / rel), k=3)
        assert hits[0].path == rel
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[1].score < hits[0].score


def test_rerank_orders_the_shortlist_by_itm(model, photos, tmp_path):
    build_index(photos, model, tmp_path / "idx", progress=False)
    index = ImageIndex(tmp_path / "idx", model)
    hits = index.search(TEXTS[0], k=4, rerank=True, shortlist=6)
    assert len(hits) == 4
    probs = model.itm([str(photos / h.path) for h in hits], [TEXTS[0]] * 4)
    assert [h.itm for h in hits] == pytest.approx(probs, abs=1e-6)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    shortlist = {h.path for h in index.search(TEXTS[0], k=6)}
    assert {h.path for h in hits} <= shortlist
    with pytest.raises(InputError, match="text query"):
        index.search(image=str(photos / "img1.png"), rerank=True)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_kinds_agree_with_flat_on_self_queries(model, photos, tmp_path, kind):
    # IVF with every cell probed and HNSW on a handful of vectors are exact: same top hit as flat.
    report = build_index(photos, model, tmp_path / "idx", ann=AnnSettings(kind=kind, nlist=2), progress=False)
    assert report.ann["kind"] == kind
    index = ImageIndex(tmp_path / "idx", model, ann=AnnSettings(nprobe=2))
    for rel in all_images(photos):
        assert index.search(image=str(photos / rel), k=1)[0].path == rel


def test_incremental_build(model, photos, tmp_path):
    out = tmp_path / "idx"
    build_index(photos, model, out, progress=False)
    ids_before = {r.path: r.id for r in IndexStore(out).rows().values()}
    (photos / "img1.png").unlink()  # deleted
    noise_image(photos / "img2.png", seed=99)  # changed content
    os.utime(photos / "img4.png", ns=(1, 10**18))  # touched, same content
    noise_image(photos / "sub" / "new.png", seed=42)  # new (not img*: checked separately below)
    report = build_index(photos, model, out, progress=False)
    assert (report.added, report.updated, report.deleted, report.unchanged) == (1, 1, 1, 5)
    rows = IndexStore(out).rows()
    assert set(rows) == {*all_images(photos), "sub/new.png"}
    assert rows["img2.png"].id == ids_before["img2.png"]  # re-embedded under its id
    index = ImageIndex(out, model)
    assert index.search(image=str(photos / "img2.png"), k=1)[0].path == "img2.png"
    assert index.search(image=str(photos / "sub" / "new.png"), k=1)[0].path == "sub/new.png"
    again = build_index(photos, model, out, progress=False)
    assert (again.added, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 7)


def test_resume_after_a_fault_mid_build(model, photos, tmp_path):
    out = tmp_path / "idx"

    def fail_after_two(done: int) -> None:
        if done >= 4:
            raise RuntimeError("injected fault")

    with pytest.raises(RuntimeError, match="injected"):
        build_index(photos, model, out, batch_size=2, on_batch=fail_after_two, progress=False)
    assert IndexStore(out).count() == 3  # two committed batches survive: broken.jpg, img0..img2 (less broken.jpg)
    with pytest.raises(InputError, match="did not finish"):
        ImageIndex(out, model)
    report = build_index(photos, model, out, batch_size=2, progress=False)
    assert (report.added, report.unchanged, report.images) == (4, 3, 7)
    fresh = tmp_path / "fresh"
    build_index(photos, model, fresh, progress=False)
    resumed, clean = ImageIndex(out, model), ImageIndex(fresh, model)
    for text in TEXTS:
        a, b = resumed.search(text, k=7), clean.search(text, k=7)
        assert [h.path for h in a] == [h.path for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-6)


def test_resume_after_the_process_is_killed(retrieval_dir, model, photos, tmp_path):
    """A real kill: the build process dies with os._exit in the middle of its batches (no cleanup runs)."""
    out = tmp_path / "idx"
    script = (
        "import os, sys, vlbridge\n"
        "from vlbridge.index import build_index\n"
        "m = vlbridge.load(sys.argv[1])\n"
        "build_index(sys.argv[2], m, sys.argv[3], batch_size=2, progress=False,\n"
        "            on_batch=lambda done: os._exit(9) if done >= 4 else None)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, retrieval_dir, str(photos), str(out)], env=env)
    assert proc.returncode == 9
    assert IndexStore(out).count() == 3
    report = build_index(photos, model, out, batch_size=2, progress=False)
    assert (report.added, report.unchanged) == (4, 3)
    assert ImageIndex(out, model).search(image=str(photos / "sub" / "img6.png"), k=1)[0].path == "sub/img6.png"


def test_another_model_is_refused(model, photos, tmp_path):
    build_index(photos, model, tmp_path / "idx", progress=False)
    other = vlbridge.load(build_checkpoint(tmp_path / "other", family="retrieval", seed=11))
    with pytest.raises(InputError, match="another model"):
        ImageIndex(tmp_path / "idx", other)
    with pytest.raises(InputError, match="another model"):
        build_index(photos, other, tmp_path / "idx", progress=False)


def test_generation_model_cannot_index(photos, tmp_path):
    opt = vlbridge.load(build_checkpoint(tmp_path / "opt", family="opt"))
    with pytest.raises(InputError, match="ITM/ITC heads"):
        build_index(photos, opt, tmp_path / "idx", progress=False)


def test_cli_build_and_search(capsys, retrieval_dir, model, photos, tmp_path):
    out = tmp_path / "idx"
    code = cli.main(["index", "build", str(photos), "--model", retrieval_dir, "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["added"] == 7
    assert "skipped broken.jpg" in captured.err
    code = cli.main(["index", "search", str(out), TEXTS[1], "-k", "3", "--json"])  # the model recorded at build
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [json.loads(line) for line in captured.out.splitlines()]
    expected, _ = exact_ranking(model, photos, TEXTS[1])
    assert [r["path"] for r in rows] == expected[:3]
    assert rows[0]["file"] == str(photos.resolve() / expected[0])
    code = cli.main(["index", "search", str(tmp_path / "nowhere"), "x"])
    captured = capsys.readouterr()
    assert code == 1 and "not an image index" in captured.err


def test_embeddings_agree_with_itc(model, photos):
    paths = [str(photos / p) for p in all_images(photos)]
    images, texts = model.embed_images(paths), model.embed_texts(TEXTS)
    assert images.shape[:2] == (7, model.qformer.query_tokens.shape[1])
    assert torch.allclose(images.norm(dim=-1), torch.ones(images.shape[:2]), atol=1e-5)
    expected = torch.einsum("iqe,te->iqt", images, texts).amax(1)
    assert torch.allclose(model.itc(paths, TEXTS), expected)
