"""The `vlbridge` command line, run in-process on tiny random checkpoints (plus two real subprocesses)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import vlbridge
from vlbridge import cli

from factory import build_checkpoint


# ------------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def images(root) -> list[str]:
    paths = []
    for i, (colour, box) in enumerate([("red", (5, 5, 30, 30)), ("blue", (20, 10, 45, 40)), ("green", (0, 0, 20, 47))]):
        image = Image.new("RGB", (48, 48), "black")
        ImageDraw.Draw(image).ellipse(box, fill=colour)
        path = root / f"img{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def opt_dir(root) -> str:
    return str(build_checkpoint(root / "opt", family="opt"))


@pytest.fixture(scope="module")
def retrieval_dir(root) -> str:
    return str(build_checkpoint(root / "retrieval", family="retrieval"))


@pytest.fixture(scope="module")
def opt_model(opt_dir):
    return vlbridge.load(opt_dir)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vlbridge: error: ")
    for needle in needles:
        assert needle in lines[0]


# ------------------------------------------------------------------------------------------------------------ caption
def test_caption_human(capsys, opt_dir, opt_model, images):
    code, out, err = run(capsys, "caption", "--model", opt_dir, *images[:2], "--max-new-tokens", "5")
    assert code == 0 and err == ""
    expected = opt_model.caption(images[:2], max_new_tokens=5)
    assert out.splitlines() == [f"{image}: {caption}" for image, caption in zip(images[:2], expected)]


def test_caption_json_batches_in_order(capsys, opt_dir, opt_model, images):
    options = ["--json", "--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "4"]
    options += ["--device", "cpu", "--dtype", "fp32"]
    code, out, err = run(capsys, "caption", "-m", opt_dir, *images, *options)
    assert code == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    expected = opt_model.caption(images, num_beams=2, max_new_tokens=4)
    assert rows == [{"image": image, "caption": caption} for image, caption in zip(images, expected)]


def test_caption_prompt_and_sampling(capsys, opt_dir, images):
    options = ["--sample", "--top-p", "0.9", "--temperature", "0.7", "--seed", "3", "--max-new-tokens", "4", "--json"]
    args = ("caption", "-m", opt_dir, images[0], "--prompt", "a photo of", *options)
    code, first, _ = run(capsys, *args)
    assert code == 0
    code, second, _ = run(capsys, *args)
    assert code == 0 and first == second  # --seed makes sampling repeatable
    assert json.loads(first)["image"] == images[0]


# ------------------------------------------------------------------------------------------------------------ ask
def test_ask_several_questions(capsys, opt_dir, opt_model, images):
    questions = ["what colour is the circle?", "how many objects?"]
    code, out, err = run(
        capsys, "ask", "-m", opt_dir, images[0], "-q", questions[0], "--question", questions[1], "--max-new-tokens", "4"
    )
    assert code == 0 and err == ""
    expected = opt_model.answer([images[0]] * 2, questions, max_new_tokens=4)
    assert out.splitlines() == [f"{images[0]}: Q: {q}  A: {a}" for q, a in zip(questions, expected)]

    argv = ["ask", "-m", opt_dir, images[0], "-q", questions[0], "-q", questions[1], "--max-new-tokens", "4"]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [{"image": images[0], "question": q, "answer": a} for q, a in zip(questions, expected)]


# ------------------------------------------------------------------------------------------------------------ match
def test_match_json_full_grid(capsys, retrieval_dir, images):
    texts = ["a red circle", "a blue circle", "green"]
    code, out, err = run(capsys, "match", "-m", retrieval_dir, "--image", *images[:2], "--text", *texts, "--json")
    assert code == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["image"], r["text"]) for r in rows] == [(i, t) for i in images[:2] for t in texts]
    model = vlbridge.load(retrieval_dir)
    sims = model.itc(images[:2], texts)
    probs = model.itm([i for i in images[:2] for _ in texts], [t for _ in images[:2] for t in texts])
    for k, row in enumerate(rows):
        assert set(row) == {"image", "text", "itm", "itc"}
        assert 0.0 <= row["itm"] <= 1.0
        assert row["itm"] == pytest.approx(probs[k], abs=1e-5)
        assert row["itc"] == pytest.approx(float(sims[k // len(texts), k % len(texts)]), abs=1e-5)


def test_match_table(capsys, retrieval_dir, images):
    code, out, err = run(capsys, "match", "-m", retrieval_dir, "-i", images[0], "-t", "a red circle", "-t", "two")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["image", "text", "itm", "itc"]
    assert len(lines) == 3
    assert all(line.startswith(images[0]) for line in lines[1:])
    assert "a red circle" in lines[1] and "two" in lines[2]


def test_match_on_generation_only_model(capsys, opt_dir, images):
    code, _, err = run(capsys, "match", "-m", opt_dir, "--image", images[0], "--text", "a circle")
    assert code == 1
    assert_one_line_error(err, "no ITM/ITC heads", opt_dir)


# ------------------------------------------------------------------------------------------------------------ errors
def test_missing_image_fails_before_loading_model(capsys, tmp_path, images):
    missing = str(tmp_path / "typo.jpg")
    # The model folder does not exist either: the image is checked first, so the error names the image.
    code, out, err = run(capsys, "caption", "--model", str(tmp_path / "no-model"), images[0], missing)
    assert code == 1 and out == ""
    assert_one_line_error(err, missing)


def test_text_file_named_jpg(capsys, tmp_path, opt_dir):
    fake = tmp_path / "notes.jpg"
    fake.write_text("not an image\n")
    code, _, err = run(capsys, "ask", "--model", opt_dir, str(fake), "--question", "what?")
    assert code == 1
    assert_one_line_error(err, str(fake))


def test_missing_model_folder(capsys, tmp_path, images):
    model = str(tmp_path / "nowhere")
    code, _, err = run(capsys, "caption", "--model", model, images[0])
    assert code == 1
    assert_one_line_error(err, model)


def test_empty_prompt_and_question(capsys, opt_dir, images):
    code, _, err = run(capsys, "caption", "--model", opt_dir, images[0], "--prompt", "")
    assert code == 1
    assert_one_line_error(err, "empty --prompt")
    code, _, err = run(capsys, "ask", "--model", opt_dir, images[0], "--question", "  ")
    assert code == 1
    assert_one_line_error(err, "empty --question")


@pytest.mark.parametrize(
    "argv",
    [
        ["caption", "--model", "m", "x.png", "--num-beams", "0"],
        ["caption", "--model", "m", "x.png", "--top-p", "1.5"],
        ["caption", "x.png"],  # --model missing
        ["ask", "--model", "m", "x.png"],  # --question missing
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, "--help")


def test_sample_with_beams(capsys, opt_dir, images):
    code, _, err = run(capsys, "caption", "-m", opt_dir, images[0], "--sample", "--num-beams", "3")
    assert code == 1
    assert_one_line_error(err, "--sample")


def test_unexpected_errors_keep_their_traceback(monkeypatch, opt_dir, images):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "load_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["caption", "--model", opt_dir, images[0]])


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and vlbridge.__version__ in out
    code, out, _ = run(capsys, "match", "--help")
    assert code == 0 and "--image" in out and "--text" in out


# ------------------------------------------------------------------------------------------------------------ deferred
def test_deferred_commands_not_implemented_yet(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vlbridge.training", types.ModuleType("vlbridge.training"))  # no train_main
    code, out, err = run(capsys, "train", "cfg.yaml", "lr=1e-4", "--resume")
    assert code == 2 and out == ""
    assert err.strip() == "vlbridge train: not implemented yet in this version"

    monkeypatch.setitem(cli.DEFERRED, "serve", ("vlbridge._no_such_module", "serve_main"))  # no module at all
    code, _, err = run(capsys, "serve", "--model", "m", "--port", "9000")
    assert code == 2
    assert err.strip() == "vlbridge serve: not implemented yet in this version"


def test_deferred_commands_are_picked_up(capsys, monkeypatch):
    seen = {}
    fake = types.ModuleType("vlbridge.training")
    fake.eval_main = lambda args: seen.setdefault("args", args) and 0
    monkeypatch.setitem(sys.modules, "vlbridge.training", fake)
    code, _, _ = run(capsys, "eval", "cfg.yaml", "data.split=val")
    assert code == 0
    assert seen["args"].config == "cfg.yaml" and seen["args"].overrides == ["data.split=val"]


# ------------------------------------------------------------------------------------------------------------ demo
def test_run_demo(capsys, tmp_path):
    from vlbridge.demo import run_demo

    result = run_demo(tmp_path)
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "random weights" in out
    assert result["untrained"] is True
    assert result["reloaded_outputs_match"] == {"native": True, "hf": True}
    assert len(result["captions"]) == 2 and all(Path(p).is_file() for p in result["images"])
    assert set(result["answers"]) == set(result["captions"])
    assert set(result["checkpoints"]) == {"random_init", "native", "hf"}
    assert all(Path(p).is_dir() for p in result["checkpoints"].values())
    assert json.loads((tmp_path / "summary.json").read_text()) == result


def test_demo_command(capsys, monkeypatch, tmp_path):
    import vlbridge.demo
    import vlbridge.recipes.world

    smoke, full = [], []
    monkeypatch.setattr(vlbridge.demo, "run_demo", lambda out_dir="runs/demo": smoke.append(out_dir) or {})
    monkeypatch.setattr(
        vlbridge.recipes.world, "run_world_recipe", lambda out, recipe, fresh: full.append((out, recipe, fresh))
    )
    assert run(capsys, "demo", "--smoke", "--out-dir", str(tmp_path))[0] == 0
    assert smoke == [str(tmp_path)] and not full
    assert run(capsys, "demo")[0] == 0
    assert run(capsys, "demo", "--fresh", "stage2.steps=7", "world.n_train=50")[0] == 0
    (out, recipe, fresh), (_, changed, fresh2) = full
    assert out == "runs/demo" and not fresh and recipe == vlbridge.recipes.world.WorldRecipe()
    assert fresh2 and changed.stage2.steps == 7 and changed.world.n_train == 50
    assert changed.stage2.lr == recipe.stage2.lr  # the rest of the section keeps its defaults
    assert run(capsys, "demo", "qformer.num_layers=3")[0] == 0
    assert full[-1][1].qformer == {**recipe.qformer, "num_layers": 3}
    code, _, err = run(capsys, "demo", "stage2.stepz=7")
    assert code == 1 and "stage2.stepz" in err


def test_world_command(capsys, tmp_path):
    code, out, _ = run(capsys, "world", str(tmp_path), "n_train=3", "n_val=1", "n_test=1", "n_compositional=1")
    assert code == 0 and "captions_train.jsonl" in out
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 3


# ------------------------------------------------------------------------------------------------------- entry points
def test_python_m_vlbridge(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vlbridge", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("vlbridge", run_name="__main__")
    assert exit_info.value.code == 0
    assert "caption" in capsys.readouterr().out


def test_console_script_user_error(tmp_path):
    """A real process: exit status 1 and one line on stderr, no traceback."""
    script = Path(sys.executable).parent / "vlbridge"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    missing = str(tmp_path / "missing.png")
    proc = subprocess.run(
        [str(script), "caption", "--model", str(tmp_path), missing], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_line_error(proc.stderr, missing)
