"""A run folder is never silently reused, unwritable places give one line, and a full disk loses nothing."""

from __future__ import annotations

import csv
import errno
import json
import os

import pytest
from safetensors.torch import load_file

from reliability.faults import config, digest_tree, one_line_error
from vlbridge.config import save_yaml
from vlbridge.errors import StorageError
from vlbridge.training import checkpoint as ckpt
from vlbridge.training.loop import train
from vlbridge.utils import io as vio


def steps_in_log(run):
    with open(run / "log.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) and its YAML; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = config(world, out)
    train(cfg)
    save_yaml(cfg, out.parent / "run.yaml")
    return out


def copy_run(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "run", symlinks=True)
    yaml = tmp_path / "run.yaml"
    yaml.write_text((finished.parent / "run.yaml").read_text().replace(str(finished), str(tmp_path / "run")))
    return tmp_path / "run", yaml


def test_reusing_a_run_folder_is_refused_and_touches_nothing(finished, tmp_path, capsys):
    run, yaml = copy_run(finished, tmp_path)
    before = digest_tree(run)
    line = one_line_error(capsys, ["train", str(yaml)])
    assert "--resume" in line and "--overwrite" in line
    assert digest_tree(run) == before


def test_overwrite_replaces_the_run_and_leaves_no_stale_checkpoint(finished, tmp_path, capsys):
    run, yaml = copy_run(finished, tmp_path)
    assert main_ok(["train", str(yaml), "run.max_steps=2", "--overwrite"], capsys)
    assert [p.name for p in ckpt.step_folders(run)] == ["step-0000002"]
    assert (run / "latest").read_text() == "step-0000002"
    assert steps_in_log(run) == [1, 2]


def main_ok(argv, capsys) -> bool:
    from vlbridge.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code == 0


def test_resuming_a_finished_run_keeps_its_summary_and_log(finished, tmp_path, capsys):
    run, yaml = copy_run(finished, tmp_path)
    final = json.loads((run / "summary.json").read_text())["final"]
    assert main_ok(["train", str(yaml), "--resume"], capsys)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"] == final and summary["final"]["loss"] > 0
    assert steps_in_log(run) == [1, 2, 3, 4]


def test_resume_after_a_kill_drops_the_rows_logged_after_the_checkpoint(finished, tmp_path, capsys):
    run, yaml = copy_run(finished, tmp_path)
    # The state a kill at step 3 leaves: checkpoint 2 is the newest; log rows 3 and 4 were written after it;
    # a half-written checkpoint folder was being saved.
    import shutil

    shutil.rmtree(run / "step-0000004")
    (run / "latest").write_text("step-0000002")
    (run / ".step-0000004.abc123").mkdir()
    (run / ".step-0000004.abc123" / "trainable.safetensors").write_bytes(b"half")
    (run / "summary.json").unlink()
    assert main_ok(["train", str(yaml), "--resume"], capsys)
    assert steps_in_log(run) == [1, 2, 3, 4]  # each step once, the resumed values
    assert not list(run.glob(".step-*"))  # the orphan is gone
    with open(run / "log.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["time"]) > 0 and float(row["samples_per_s"]) > 0


def test_output_dir_that_is_a_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    save_yaml(config(world, tmp_path / "file"), tmp_path / "c.yaml")
    assert "is a file" in one_line_error(capsys, ["train", str(tmp_path / "c.yaml")])


def test_unwritable_output_dir_is_one_line(world, tmp_path, capsys):
    if os.geteuid() == 0:  # root ignores folder permissions; /sys refuses new folders even to root
        target = "/sys/vlbridge-test/run"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        target = tmp_path / "ro" / "run"
    try:
        save_yaml(config(world, target), tmp_path / "c.yaml")
        line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml")])
        assert "vlbridge-test" in line or "ro/run" in line
        assert "not permitted" in line or "Permission denied" in line or "Read-only" in line, line
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o700)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(finished, tmp_path, capsys, monkeypatch):
    run, yaml = copy_run(finished, tmp_path)
    kept = digest_tree(run / "step-0000004")
    calls = {"n": 0}
    real = ckpt.save_file

    def fail_second(*args, **kwargs):  # the trainable weights are written, then the disk is full
        calls["n"] += 1
        if calls["n"] == 2:
            enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fail_second)
    line = one_line_error(capsys, ["train", str(yaml), "run.max_steps=6", "--resume", "--allow-changed"])
    assert "No space left on device" in line
    assert digest_tree(run / "step-0000004") == kept
    assert (run / "latest").read_text() == "step-0000004"
    assert not list(run.glob(".step-*"))  # the partial folder was removed
    monkeypatch.undo()
    assert main_ok(["train", str(yaml), "run.max_steps=6", "--resume", "--allow-changed"], capsys)
    assert steps_in_log(run) == [1, 2, 3, 4, 5, 6]


def test_full_disk_while_saving_the_model_keeps_the_old_model(finished, tmp_path, monkeypatch):
    from vlbridge.interop import native

    run, _ = copy_run(finished, tmp_path)
    before = digest_tree(run / "model")
    monkeypatch.setattr(native, "save_file", enospc)
    import vlbridge

    model = vlbridge.load(run / "model")
    with pytest.raises(StorageError, match="No space left"):
        model.save(run / "model", format="native")
    assert digest_tree(run / "model") == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".model")] == []


def test_a_kill_between_the_two_renames_of_the_final_save_loses_no_model(finished, tmp_path, monkeypatch, capsys):
    run, yaml = copy_run(finished, tmp_path)
    weights = load_file(str(run / "model" / "model.safetensors"))
    monkeypatch.setattr(vio, "_exchange", lambda a, b: False)  # a file system without an atomic swap
    real_rename = os.rename

    def killed_after_first(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".model.old"):
            raise KeyboardInterrupt  # stands for the kill: the old model is set aside, the new one not yet in place

    monkeypatch.setattr(vio.os, "rename", killed_after_first)
    import vlbridge

    model = vlbridge.load(run / "model")
    with pytest.raises(KeyboardInterrupt):
        model.save(run / "model", format="native")
    monkeypatch.undo()
    assert not (run / "model").exists() and (run / ".model.old").is_dir()
    assert main_ok(["train", str(yaml), "--resume"], capsys)  # the next start puts the old model back first
    assert (run / "model" / "vlbridge.json").is_file() and not (run / ".model.old").exists()
    assert load_file(str(run / "model" / "model.safetensors")).keys() == weights.keys()


def test_atomic_dir_never_leaves_the_target_missing(tmp_path):
    target = tmp_path / "out"
    vio.atomic_dir(target, lambda tmp: (tmp / "a").write_text("1"))
    seen = []

    def write(tmp):
        (tmp / "a").write_text("2")
        seen.append((target / "a").read_text())  # the old version is in place while the new one is written

    vio.atomic_dir(target, write)
    assert seen == ["1"] and (target / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_full_disk_while_writing_the_summary_is_one_line_and_keeps_the_model(world, tmp_path, capsys, monkeypatch):
    from vlbridge.training import loop

    real = vio.write_json

    def full_at_summary(path, obj, **kwargs):
        if path.name == "summary.json":
            raise vio.storage_error(OSError(errno.ENOSPC, "No space left on device"), path)
        real(path, obj, **kwargs)

    monkeypatch.setattr(loop, "write_json", full_at_summary)
    save_yaml(config(world, tmp_path / "run"), tmp_path / "c.yaml")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml")])
    assert "summary.json" in line and "No space left" in line
    import vlbridge

    assert vlbridge.load(tmp_path / "run" / "model") is not None  # saved before, intact


def test_full_disk_while_building_a_feature_cache_leaves_no_partial_cache(world, tmp_path, capsys, monkeypatch):
    from vlbridge.data import feature_cache as fc

    monkeypatch.setattr(fc._ShardWriter, "write", enospc)
    save_yaml(config(world, tmp_path / "run", **{"data.feature_cache": str(tmp_path / "cache")}), tmp_path / "c.yaml")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml")])
    assert "No space left" in line
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary build folder was removed
