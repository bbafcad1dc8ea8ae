"""`kill -9` at random moments of a real `vlbridge train` process, then `--resume`: the run ends exactly where an
uninterrupted one does (same weights, same log), with every step logged once and `latest` never dangling."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from reliability.faults import config
from vlbridge.config import save_yaml
from vlbridge.training import checkpoint as ckpt
from vlbridge.training.loop import train
from vlbridge.utils.threads import torch_threads

STEPS = 8
TIMING = ("time", "samples_per_s")


def log_rows(run):
    if not (run / "log.csv").exists():
        return []
    with open(run / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def start(yaml, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as the in-process reference
    argv = [sys.executable, "-m", "vlbridge.cli", "train", str(yaml), *(["--resume"] if resume else [])]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after_rows(proc: subprocess.Popen, run, rows: int, delay: float) -> bool:
    """SIGKILL once log.csv has `rows` rows (plus `delay` seconds); False if the process finished first."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(log_rows(run)) >= rows:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def test_random_kills_then_resume_match_an_uninterrupted_run(world, tmp_path):
    common = {"run.max_steps": STEPS, "run.save_every": 2, "run.log_every": 1}
    with torch_threads(1):  # as the subprocesses (OMP_NUM_THREADS=1): reductions sum in the same order
        train(config(world, tmp_path / "reference", **common))
    run = tmp_path / "run"
    save_yaml(config(world, run, **common), tmp_path / "c.yaml")
    rng = random.Random(os.environ.get("VLBRIDGE_KILL_SEED", 10))
    kills = 0
    for target in sorted(rng.sample(range(1, STEPS), 2)):
        proc = start(tmp_path / "c.yaml", resume=bool(ckpt.step_folders(run)))
        kills += kill_after_rows(proc, run, target, rng.uniform(0, 0.05))
        pointer = run / "latest"
        assert not pointer.exists() or (run / pointer.read_text()).is_dir()  # never dangles
    assert kills >= 1
    proc = start(tmp_path / "c.yaml", resume=bool(ckpt.step_folders(run)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert log_rows(run) == log_rows(tmp_path / "reference")  # every step once, the same values
    final = f"step-{STEPS:07d}"
    a = load_file(str(tmp_path / "reference" / final / "trainable.safetensors"))
    b = load_file(str(run / final / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run.glob(".step-*")) and (run / "model" / "vlbridge.json").is_file()
