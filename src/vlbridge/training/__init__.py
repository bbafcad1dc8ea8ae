"""Training: the stage-1 loop and the `vlbridge train` / `vlbridge eval` entry points."""

from __future__ import annotations

import argparse


def train_main(args: argparse.Namespace) -> int:
    """`vlbridge train CONFIG.yaml [key=value ...] [--resume [--allow-changed] | --overwrite]`."""
    from vlbridge.config import load_yaml
    from vlbridge.training.loop import train
    from vlbridge.training.recipe import TrainConfig
    from vlbridge.utils.io import dumps

    cfg = load_yaml(TrainConfig, args.config, args.overrides)
    summary = train(
        cfg,
        resume=args.resume,
        overwrite=getattr(args, "overwrite", False),
        allow_changed=getattr(args, "allow_changed", False),
    )
    print(dumps({k: summary[k] for k in ("steps", "final", "output_dir", "model", "eval") if k in summary}))
    return 0


def eval_main(args: argparse.Namespace) -> int:
    """`vlbridge eval CONFIG.yaml [key=value ...]`."""
    from vlbridge.config import load_yaml
    from vlbridge.eval.run import EvalConfig, evaluate, summary_text

    cfg = load_yaml(EvalConfig, args.config, args.overrides)
    report = evaluate(cfg)
    print(summary_text(report))  # the headline numbers; the whole report is the JSON file at cfg.output
    return 0
