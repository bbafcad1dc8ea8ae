"""Stage-1 training step: vlbridge's ITC + ITM + ITG against the LAVIS way of computing them, on the same model.

Both sides train the same vlbridge ``Blip2`` (a BLIP-2-size Q-Former: 12 layers x 768, 12 heads, 32 queries,
cross-attention every 2 layers, FFN 3072, vocabulary 30523, ITC width 256) on the same random frozen image
features ``[16, 257, 1024]`` (ViT-L-like; the frozen encoder is not in the loop: its cost is what
``benchmarks/feature_cache.py`` measures) and the same captions (T = 32 with padding, ids of one image each).
A step is what ``vlbridge.training.loop`` does: forward (optionally under bf16 autocast), backward, gradient
clipping at 1.0, ``AdamW`` (``make_optimizer``, the paper's recipe) and ``zero_grad``. Dropout is on.

- vlbridge: :func:`vlbridge.objectives.stage1.stage1_losses` (cross-attention K/V projected once per image and
  indexed for the 3B ITM pairs, ITG over the cached query K/V, one vectorised negative draw);
- LAVIS-style: :func:`lavis_style.lavis_stage1_losses` (K/V projected inside every Q-Former call, so 4B image
  projections, per-sample ``multinomial(...).item()`` loop, ``torch.stack`` re-stacking; ITG reuses the query
  K/V as LAVIS does). ``--eager`` adds a column with LAVIS's eager attention instead of vlbridge's SDPA.

Printed:
1. a loss check: eval mode (no dropout), identical negatives, fp32 and bf16: each loss of both sides and their
   difference, and the largest gradient difference (fp32) relative to the largest gradient;
2. the timing table: the implementations alternate within each round (the order flips every round; other
   processes share the CPU), medians over the rounds; pairs/s, speed-up, FLOPs per step (matmul FLOPs of
   forward + backward counted with ``FlopCounterMode`` at three small batch sizes and extrapolated exactly: they
   are a quadratic in B), achieved GFLOP/s, and the fraction of this machine's matmul peak, a ``torch.mm`` of
   2048^3 (fp32 and bf16, best of 3) measured in every round next to the steps it is compared with;
3. where the time goes: ``torch.profiler`` over one vlbridge step per precision, by phase and top ops.

    python benchmarks/stage1_step.py            # full size (about 8-10 minutes on 2 busy cores)
    python benchmarks/stage1_step.py --quick    # small Q-Former, batch 4 (under a minute)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from vlbridge.bridges.qformer import QFormerConfig
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.models.blip2 import Blip2, Blip2Config
from vlbridge.objectives.itm import sample_negatives
from vlbridge.objectives.stage1 import stage1_losses
from vlbridge.training.optim import make_optimizer
from vlbridge.training.recipe import OptimConfig

sys.path.insert(0, str(Path(__file__).parent))
from lavis_style import lavis_stage1_losses  # noqa: E402

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Sizes:
    """The defaults are BLIP-2's stage 1 (BERT-base Q-Former) over ViT-L-sized features."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    queries: int = 32
    cross_freq: int = 2
    image_tokens: int = 257
    vision_width: int = 1024
    batch: int = 16
    text: int = 32
    vocab: int = 30523
    embed_dim: int = 256
    dropout: float = 0.1

    def describe(self) -> str:
        return (
            f"B={self.batch} pairs, Q-Former {self.layers}x{self.hidden} ({self.heads} heads, {self.queries} queries, "
            f"xattn every {self.cross_freq}, FFN {self.ffn}), image {self.image_tokens}x{self.vision_width}, "
            f"T={self.text}, V={self.vocab}, E={self.embed_dim}"
        )


QUICK = Sizes(
    hidden=128, layers=2, heads=4, ffn=512, queries=8, image_tokens=50, vision_width=192, batch=6, text=16, vocab=2000
)


# ------------------------------------------------------------------------------------------------- set-up
def build_model(s: Sizes, seed: int = 0) -> Blip2:
    """A stage-1 BLIP-2 with random weights; the (frozen, unused) vision encoder is a 1-block stand-in."""
    torch.manual_seed(seed)
    vcfg = transformers.Blip2VisionConfig(
        hidden_size=s.vision_width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
        image_size=32, patch_size=16,
    )  # fmt: skip
    qcfg = QFormerConfig(
        hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads, intermediate_size=s.ffn,
        num_query_tokens=s.queries, cross_attention_frequency=s.cross_freq, encoder_hidden_size=s.vision_width,
        vocab_size=s.vocab, dropout=s.dropout, attention_dropout=s.dropout,
    )  # fmt: skip
    config = Blip2Config(qformer=qcfg, vision=vcfg.to_dict(), embed_dim=s.embed_dim)
    return Blip2(config=config, vision=FrozenVisionEncoder(transformers.Blip2VisionModel(vcfg)))


@dataclass
class Batch:
    feats: Tensor  # [B, N, Dv] frozen features
    input_ids: Tensor  # [B, T], [CLS] first, 0-padded
    attention_mask: Tensor  # [B, T]
    ids: Tensor  # [B] image-id codes (one image per caption)


def make_batch(s: Sizes, batch: int | None = None, seed: int = 0) -> Batch:
    """Caption lengths between T/2 and T (one of full length, as a max_length-padded batch would have)."""
    B, T = batch or s.batch, s.text
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, s.image_tokens, s.vision_width, generator=g)
    ids = torch.randint(1000 % s.vocab, s.vocab - 1, (B, T), generator=g)
    ids[:, 0] = 101 % s.vocab  # [CLS]
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return Batch(feats, ids.masked_fill(mask == 0, 0), mask, torch.arange(B))


LossFn = Callable[[Blip2, Batch, int], object]  # (model, batch, seed) -> output with .loss


def ours(model: Blip2, b: Batch, seed: int):
    g = torch.Generator().manual_seed(seed)
    return stage1_losses(
        model, b.feats, b.input_ids, b.attention_mask, b.ids, dec_token_id=dec_id_of(model), generator=g
    )


def lavis(model: Blip2, b: Batch, seed: int, attention: str = "sdpa"):
    torch.manual_seed(seed)  # the per-sample multinomial loop draws from the global generator, as in LAVIS
    return lavis_stage1_losses(
        model, b.feats, b.input_ids, b.attention_mask, dec_token_id=dec_id_of(model), attention=attention
    )


def lavis_eager(model: Blip2, b: Batch, seed: int):
    return lavis(model, b, seed, attention="eager")


def dec_id_of(model: Blip2) -> int:
    return model.config.qformer.vocab_size - 1


IMPLS: dict[str, LossFn] = {"vlbridge": ours, "lavis-style": lavis, "lavis-eager": lavis_eager}


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def train_step(model: Blip2, optimizer: torch.optim.Optimizer, fn: LossFn, b: Batch, precision: str, seed: int):
    """What the training loop does for one optimiser step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with record_function("forward"), autocast(precision):
        out = fn(model, b, seed)
    with record_function("backward"):
        out.loss.backward()
    with record_function("clip_grad_norm"):
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    with record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------------- checks
def loss_check(model: Blip2, b: Batch) -> list[str]:
    """Eval mode, identical negatives: both sides' losses (fp32, bf16) and gradients (fp32)."""
    model.eval()
    seed = 4
    lines = [
        "precision  loss  vlbridge     lavis-style  |difference|",
    ]
    grads: dict[str, list[Tensor]] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    for precision in PRECISIONS:
        outs = {}
        for name in ("vlbridge", "lavis-style"):
            model.zero_grad(set_to_none=True)
            with autocast(precision):
                if name == "vlbridge":
                    out = ours(model, b, seed)
                else:

                    def same_draw(sim: Tensor) -> tuple[Tensor, Tensor]:
                        return sample_negatives(sim, b.ids, generator=torch.Generator().manual_seed(seed))

                    out = lavis_stage1_losses(
                        model, b.feats, b.input_ids, b.attention_mask, dec_token_id=dec_id_of(model),
                        draw_negatives=same_draw,
                    )  # fmt: skip
            if precision == "fp32":
                out.loss.backward()
                grads[name] = [p.grad.clone() for p in params]
            outs[name] = {k: float(getattr(out, f"{k}_loss")) for k in ("itc", "itm", "itg")}
        for k in ("itc", "itm", "itg"):
            a, c = outs["vlbridge"][k], outs["lavis-style"][k]
            lines.append(f"{precision:<10} {k:<5} {a:<12.6f} {c:<12.6f} {abs(a - c):.2e}")
    scale = max(float(g.abs().max()) for g in grads["vlbridge"])
    diff = max(float((g1 - g2).abs().max()) for g1, g2 in zip(grads["vlbridge"], grads["lavis-style"]))
    lines.append(f"fp32 gradients: max |difference| / max |gradient| = {diff / scale:.2e} over {len(params)} tensors")
    model.zero_grad(set_to_none=True)
    model.train()
    return lines


def count_flops(model: Blip2, optimizer: torch.optim.Optimizer, fn: LossFn, s: Sizes) -> float:
    """Matmul FLOPs of one fp32 training step at batch s.batch, from exact counts at B = 2, 3, 4.

    Every matmul's size is linear in B except ITC's B x B similarity (quadratic), so three points fix it. The
    small steps also warm up the optimiser state and the kernels.
    """
    xs = (2, 3, 4)
    ys = []
    for B in xs:
        counter = FlopCounterMode(display=False)
        with counter:
            train_step(model, optimizer, fn, make_batch(s, B, seed=B), "fp32", seed=B)
        ys.append(counter.get_total_flops())
    x = s.batch
    total = 0.0
    for i, (xi, yi) in enumerate(zip(xs, ys)):  # Lagrange interpolation through the three points
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (x - xj) / (xi - xj)
        total += w * yi
    return total


def matmul_peak(precision: str, n: int, repeats: int = 3) -> float:
    """GFLOP/s of the best of `repeats` n^3 `torch.mm`s (after one warm-up)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------------------- profile
def profile_step(model: Blip2, optimizer: torch.optim.Optimizer, b: Batch, precision: str, top: int) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        train_step(model, optimizer, ours, b, precision, seed=123)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    phases = {
        e.key: e.cpu_time_total / 1e6 for e in events if e.key in ("forward", "backward", "clip_grad_norm", "optimizer")
    }
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    lines = [f"vlbridge {precision} step under the profiler: {wall:.1f} s wall; by phase (s): "
             + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())]  # fmt: skip
    lines.append(f"  {'op':<34} {'self CPU s':>10} {'share':>6} {'calls':>6}")
    for e in ops[:top]:
        s = e.self_cpu_time_total / 1e6
        lines.append(f"  {e.key:<34} {s:>10.2f} {s / total:>6.1%} {e.count:>6}")
    return lines


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small Q-Former, batch 6: a smoke run under a minute")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="most timed rounds (each: every impl x precision)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 560; quick 50)")
    parser.add_argument("--eager", action="store_true", help="also time LAVIS-style with LAVIS's eager attention")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    s = QUICK if args.quick else Sizes()
    if args.batch:
        s = replace(s, batch=args.batch)
    budget = args.budget or (50.0 if args.quick else 560.0)
    mm_n = 512 if args.quick else 2048
    torch.set_num_threads(args.threads)
    impls = ["vlbridge", "lavis-style"] + (["lavis-eager"] if args.eager or args.quick else [])

    print(f"stage-1 training step: {s.describe()}; {args.threads} threads, torch {torch.__version__}")
    model = build_model(s)
    model.train()
    optimizer = make_optimizer(model, OptimConfig())
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {n_params / 1e6:.1f} M")

    print("\n(1) loss check: eval mode, identical negatives (B=4)")
    for line in loss_check(model, make_batch(s, min(4, s.batch), seed=1)):
        print("  " + line)

    flops = {name: count_flops(model, optimizer, IMPLS[name], s) for name in impls}  # + warm-up (fp32)
    for name in impls:  # warm-up (bf16)
        train_step(model, optimizer, IMPLS[name], make_batch(s, 2, seed=2), "bf16", seed=2)

    batch = make_batch(s, seed=0)
    times: dict[tuple[str, str], list[float]] = {(p, n): [] for p in PRECISIONS for n in impls}
    losses: dict[tuple[str, str], list[float]] = {(p, n): [] for p in PRECISIONS for n in impls}
    peaks: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    fractions: dict[tuple[str, str], list[float]] = {(p, n): [] for p in PRECISIONS for n in impls}
    profile_estimate = 0.0
    rounds = 0
    while rounds < args.rounds:
        elapsed = time.perf_counter() - start
        round_time = sum(statistics.median(v) for v in times.values()) if rounds else 0.0
        if rounds and elapsed + round_time + profile_estimate > budget:
            break
        order = impls if rounds % 2 == 0 else impls[::-1]
        for precision in PRECISIONS:
            peak = matmul_peak(precision, mm_n)
            peaks[precision].append(peak)
            for name in order:
                t = time.perf_counter()
                out = train_step(model, optimizer, IMPLS[name], batch, precision, seed=rounds)
                dt = time.perf_counter() - t
                times[precision, name].append(dt)
                losses[precision, name].append(float(out.loss.detach()))
                fractions[precision, name].append(flops[name] / dt / 1e9 / peak)
        rounds += 1
        profile_estimate = 1.1 * sum(statistics.median(times[p, "vlbridge"]) for p in PRECISIONS)

    print(f"\n(2) training step, median of {rounds} round(s), implementations alternating (seconds per step)")
    header = (
        f"{'precision':<9} {'implementation':<14} {'step s':>7} {'pairs/s':>8} {'speed-up':>8} {'loss':>8} "
        f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'mm peak':>8} {'% peak':>7}"
    )
    print(header)
    for precision in PRECISIONS:
        base = statistics.median(times[precision, "lavis-style"])
        for name in impls:
            dt = statistics.median(times[precision, name])
            print(
                f"{precision:<9} {name:<14} {dt:>7.2f} {s.batch / dt:>8.3f} {base / dt:>7.2f}x "
                f"{statistics.median(losses[precision, name]):>8.4f} {flops[name] / 1e9:>10.1f} "
                f"{flops[name] / dt / 1e9:>8.1f} {statistics.median(peaks[precision]):>8.1f} "
                f"{statistics.median(fractions[precision, name]):>7.1%}"
            )
    print(
        f"FLOP ratio lavis-style / vlbridge: {flops['lavis-style'] / flops['vlbridge']:.2f}x; "
        f"mm peak = torch.mm {mm_n}^3, best of 3, measured each round; "
        f"raw step times: " + "; ".join(f"{p} {n} " + ",".join(f"{t:.1f}" for t in v) for (p, n), v in times.items())
    )

    if not args.no_profile:
        elapsed = time.perf_counter() - start
        if elapsed + profile_estimate <= budget or args.quick:
            print("\n(3) where the time goes (torch.profiler, one vlbridge step, self CPU time)")
            for precision in PRECISIONS:
                for line in profile_step(model, optimizer, batch, precision, top=12):
                    print(line)
        else:
            print(f"\n(3) profile skipped: {elapsed:.0f} s elapsed, about {profile_estimate:.0f} s more needed")
    print(f"\ntotal run time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
