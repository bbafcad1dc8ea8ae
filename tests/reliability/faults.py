"""Helpers for the fault-injection tests: configs, and the check of the promise — a user error is one line on
stderr with a non-zero exit and no traceback."""

from __future__ import annotations

import hashlib
from pathlib import Path

from training_data import stage1_config
from vlbridge.cli import main


def config(world: Path, out: Path, **overrides):
    """The tiny stage-1 config writing to `out` (4 steps of batch 8, checkpoints every 2 steps)."""
    base = {"run.output_dir": str(out), "run.max_steps": 4, "run.save_every": 2, "optim.warmup_steps": 2}
    return stage1_config(world, **{**base, **overrides})


def one_line_error(capsys, argv: list[str], *, code: int = 1) -> str:
    """Run the CLI in-process; assert exit `code` and exactly one `vlbridge: error:` line; return that line."""
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("vlbridge: error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


def digest_tree(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path (to check that nothing saved was touched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
