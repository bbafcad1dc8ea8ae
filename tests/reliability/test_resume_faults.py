"""`--resume` over damaged checkpoints: the newest intact one is used with a warning; a changed model or changed
settings are one clear line; nothing that was saved is lost."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from reliability.faults import config, one_line_error
from vlbridge.config import save_yaml
from vlbridge.training import checkpoint as ckpt
from vlbridge.training.loop import train


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):
    """A run stopped at step 4 of 6, with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(config(world, out, **{"run.max_steps": 4}))
    (out / "summary.json").unlink()
    shutil.rmtree(out / "model")
    return out


@pytest.fixture()
def run(base, world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    save_yaml(config(world, out, **{"run.max_steps": 4}), tmp_path / "c.yaml")
    return out


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_bytes(path):
    path.write_bytes(b"")


def flip_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def invalid_json(path):
    path.write_text("{not json")


def drop_rng(path):
    state = json.loads(path.read_text())
    del state["rng"]
    path.write_text(json.dumps(state))


FAULTS = [
    ("trainable.safetensors", truncate),
    ("trainable.safetensors", zero_bytes),
    ("trainable.safetensors", flip_middle),
    ("optimizer.safetensors", flip_middle),
    ("optimizer.json", invalid_json),
    ("state.json", drop_rng),
    ("checksums.json", invalid_json),
]


@pytest.mark.parametrize(("name", "fault"), FAULTS, ids=[f"{n}-{f.__name__}" for n, f in FAULTS])
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, tmp_path, name, fault, capsys):
    from vlbridge.cli import main

    fault(run / "step-0000004" / name)
    assert main(["train", str(tmp_path / "c.yaml"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "step-0000004 is damaged" in err and "Traceback" not in err
    assert (run / "step-0000004.damaged").is_dir()  # set aside, not deleted
    with open(run / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]  # steps 3-4 redone, once each
    assert (run / "latest").read_text() == "step-0000004" and (run / "model").is_dir()
    assert ckpt.check_checkpoint(run / "step-0000004") is None


def test_latest_pointing_nowhere_still_resumes(run, tmp_path, capsys):
    from vlbridge.cli import main

    (run / "latest").write_text("step-0009999")
    assert main(["train", str(tmp_path / "c.yaml"), "--resume"]) == 0
    assert (run / "model").is_dir()


def test_every_checkpoint_damaged_is_one_line(run, tmp_path, capsys):
    for folder in ckpt.step_folders(run):
        zero_bytes(folder / "trainable.safetensors")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), "--resume"])
    assert "no intact checkpoint" in line


def test_resume_without_a_run_is_one_line(world, tmp_path, capsys):
    save_yaml(config(world, tmp_path / "empty"), tmp_path / "e.yaml")
    assert "no training run" in one_line_error(capsys, ["train", str(tmp_path / "e.yaml"), "--resume"])


def test_a_model_shape_change_on_resume_is_one_line(run, tmp_path, capsys):
    line = one_line_error(
        capsys, ["train", str(tmp_path / "c.yaml"), "--resume", "--allow-changed", "model.num_query_tokens=6"]
    )
    assert "changed shape" in line or "does not fit" in line
    assert ckpt.check_checkpoint(run / "step-0000004") is None  # not mistaken for damage


def test_changed_settings_are_refused_on_resume_unless_allowed(run, tmp_path, capsys):
    from vlbridge.cli import main

    before = (run / "config.yaml").read_text()
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), "--resume", "optim.lr=0.5"])
    assert "optim.lr" in line and "--allow-changed" in line
    assert (run / "config.yaml").read_text() == before
    assert main(["train", str(tmp_path / "c.yaml"), "--resume", "optim.lr=0.002", "--allow-changed"]) == 0
    change = json.loads((run / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["step"] == 4 and change["changes"]["optim.lr"] == [0.001, 0.002]


def test_free_settings_may_change_on_resume(run, tmp_path, capsys):
    from vlbridge.cli import main

    assert main(["train", str(tmp_path / "c.yaml"), "--resume", "run.log_every=2", "data.num_workers=0"]) == 0
    assert not (run / "config_changes.jsonl").exists()
