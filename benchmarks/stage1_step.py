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
2b. one round on COCO-like captions (about 13 of the 32 tokens real) with ``stage1_losses(trim_padding=True)``;
3. where the time goes: ``torch.profiler`` over one vlbridge step per precision, by phase and top ops.

Rounds continue (up to ``--rounds``) while the ``--budget`` (560 s) leaves time for (2b) and (3); those are skipped
when it does not. CPU seconds are printed next to wall seconds: when other processes share the cores, wall times
swing by 2x and more between rounds, and the FLOP ratio is the steadier statement of the speed-up.

    python benchmarks/stage1_step.py            # full size: about 8 minutes on 2 otherwise idle cores
    python benchmarks/stage1_step.py --quick    # small Q-Former, batch 6: seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
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

    def __getitem__(self, rows: slice) -> Batch:
        return Batch(self.feats[rows], self.input_ids[rows], self.attention_mask[rows], self.ids[rows])


def make_batch(s: Sizes, batch: int | None = None, seed: int = 0, coco: bool = False) -> Batch:
    """Captions padded to T = s.text, the longest first (so every prefix of the batch has the same longest one).

    Lengths (with [CLS] and [SEP]): uniform in [T/2, T] with one of length T (`coco=False`, no column is padding
    in every caption), or COCO-like, about N(13.5, 2.5) tokens (`coco=True`, BERT-tokenised COCO captions).
    """
    B, T = batch or s.batch, s.text
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, s.image_tokens, s.vision_width, generator=g)
    ids = torch.randint(1000 % s.vocab, s.vocab - 1, (B, T), generator=g)
    ids[:, 0] = 101 % s.vocab  # [CLS]
    if coco:
        mean = 13.5 * T / 32
        lengths = (torch.randn(B, generator=g) * mean / 5.4 + mean).round().long().clamp(3, T)
    else:
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        lengths[0] = T
    lengths = lengths.sort(descending=True).values
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return Batch(feats, ids.masked_fill(mask == 0, 0), mask, torch.arange(B))


LossFn = Callable[[Blip2, Batch, int], object]  # (model, batch, seed) -> output with .loss


def ours(model: Blip2, b: Batch, seed: int, trim: bool = False):
    g = torch.Generator().manual_seed(seed)
    return stage1_losses(
        model, b.feats, b.input_ids, b.attention_mask, b.ids, dec_token_id=dec_id_of(model), generator=g,
        trim_padding=trim,
    )  # fmt: skip


def ours_trim(model: Blip2, b: Batch, seed: int):
    return ours(model, b, seed, trim=True)


def lavis(model: Blip2, b: Batch, seed: int, attention: str = "sdpa"):
    torch.manual_seed(seed)  # the per-sample multinomial loop draws from the global generator, as in LAVIS
    return lavis_stage1_losses(
        model, b.feats, b.input_ids, b.attention_mask, dec_token_id=dec_id_of(model), attention=attention
    )


def lavis_eager(model: Blip2, b: Batch, seed: int):
    return lavis(model, b, seed, attention="eager")


def dec_id_of(model: Blip2) -> int:
    return model.bridge.config.qformer.vocab_size - 1


IMPLS: dict[str, LossFn] = {
    "vlbridge": ours, "vlbridge+trim": ours_trim, "lavis-style": lavis, "lavis-eager": lavis_eager
}  # fmt: skip


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


PHASES = ("forward", "backward", "clip_grad_norm", "optimizer")


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
    """Eval mode, identical negatives: each side's losses (fp32, bf16) and gradients (fp32) against LAVIS-style."""
    model.eval()
    seed = 4
    names = ("vlbridge", "vlbridge+trim", "lavis-style")

    def same_draw(sim: Tensor) -> tuple[Tensor, Tensor]:  # the draw vlbridge makes, from the same generator state
        return sample_negatives(sim, b.ids, generator=torch.Generator().manual_seed(seed))

    lines = [
        f"{'precision':<10} {'loss':<5} " + " ".join(f"{n:<13}" for n in names) + "|vlbridge - lavis|  |trim - lavis|"
    ]
    grads: dict[str, list[Tensor]] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    for precision in PRECISIONS:
        outs = {}
        for name in names:
            model.zero_grad(set_to_none=True)
            with autocast(precision), torch.no_grad() if precision == "bf16" else nullcontext():
                if name == "lavis-style":
                    out = lavis_stage1_losses(
                        model, b.feats, b.input_ids, b.attention_mask, dec_token_id=dec_id_of(model),
                        draw_negatives=same_draw,
                    )  # fmt: skip
                else:
                    out = ours(model, b, seed, trim=name == "vlbridge+trim")
            if precision == "fp32":
                out.loss.backward()
                grads[name] = [p.grad.clone() for p in params]
            outs[name] = {k: float(getattr(out, f"{k}_loss").detach()) for k in ("itc", "itm", "itg")}
        for k in ("itc", "itm", "itg"):
            v = [outs[n][k] for n in names]
            lines.append(
                f"{precision:<10} {k:<5} " + " ".join(f"{x:<13.6f}" for x in v) + f"{abs(v[0] - v[2]):<18.2e}"
                f"{abs(v[1] - v[2]):.2e}"
            )
    scale = max(float(g.abs().max()) for g in grads["lavis-style"])
    for name in names[:2]:
        diff = max(float((g1 - g2).abs().max()) for g1, g2 in zip(grads[name], grads["lavis-style"]))
        lines.append(
            f"fp32 gradients, {name} vs lavis-style: max |difference| / max |gradient| = {diff / scale:.2e} "
            f"({len(params)} tensors)"
        )
    model.zero_grad(set_to_none=True)
    model.train()
    return lines


def count_flops(model: Blip2, fn: LossFn, b: Batch) -> float:
    """Matmul FLOPs of forward + backward over batch `b`, from exact counts over its first 2, 3 and 4 rows.

    Every matmul's size is linear in B except ITC's B x B similarity (quadratic), so three points fix the count
    (the longest caption is row 0, so trimmed lengths agree). Also a warm-up. The optimiser has no matmuls.
    """
    xs = (2, 3, 4)
    ys = []
    for B in xs:
        counter = FlopCounterMode(display=False)
        with counter:
            fn(model, b[:B], B).loss.backward()
        model.zero_grad(set_to_none=True)
        ys.append(counter.get_total_flops())
    x = len(b.ids)
    total = 0.0
    for i, (xi, yi) in enumerate(zip(xs, ys)):  # Lagrange interpolation through the three points
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (x - xj) / (xi - xj)
        total += w * yi
    return total


def matmul_peak(precision: str, n: int, repeats: int = 3) -> tuple[float, float]:
    """GFLOP/s of the best of `repeats` n^3 `torch.mm`s (after one warm-up): per wall second, per CPU second."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


CATEGORIES = {  # aten op -> what it is, for the profile summary
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash"),
    "copy / cast / cat / index": ("aten::copy_", "aten::cat", "aten::index", "aten::_index_put", "aten::clone"),
    "dropout RNG": ("aten::bernoulli_",),
    "layer norm": ("aten::native_layer_norm",),
    "softmax": ("aten::_softmax", "aten::_safe_softmax", "aten::_log_softmax"),
}


def category(op: str) -> str:
    return next((c for c, prefixes in CATEGORIES.items() if op.startswith(prefixes)), "other (elementwise, reductions)")


def profile_step(model: Blip2, optimizer: torch.optim.Optimizer, b: Batch, precision: str, top: int) -> list[str]:
    """One vlbridge step under torch.profiler: time by phase, by kind of op, and the top ops by self time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        train_step(model, optimizer, ours, b, precision, seed=123)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    kinds: dict[str, float] = {}
    for e in ops:
        kinds[category(e.key)] = kinds.get(category(e.key), 0.0) + e.self_cpu_time_total / 1e6
    lines = [
        f"vlbridge {precision}: {wall:.1f} s under the profiler; by phase: "
        + ", ".join(f"{k} {v:.2f} s ({v / wall:.0%})" for k, v in phases.items()),
        "  by kind of op: "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])),
        f"  {'op':<40} {'self s':>7} {'share':>6} {'calls':>6}",
    ]
    for e in ops[:top]:
        sec = e.self_cpu_time_total / 1e6
        lines.append(f"  {e.key:<40} {sec:>7.2f} {sec / total:>6.1%} {e.count:>6}")
    return lines


# ------------------------------------------------------------------------------------------------- main
Times = dict[tuple[str, str], list[float]]


def timed_round(
    model: Blip2, optimizer: torch.optim.Optimizer, b: Batch, impls: list[str], seed: int, mm_n: int, record: Record,
) -> None:  # fmt: skip
    """Every precision x implementation once (order flipped on odd rounds), next to a matmul-peak reading."""
    order = impls if seed % 2 == 0 else impls[::-1]
    for precision in PRECISIONS:
        peak_wall, peak_cpu = matmul_peak(precision, mm_n)
        record.peaks.setdefault(precision, []).append((peak_wall, peak_cpu))
        for name in order:
            t, c = time.perf_counter(), time.process_time()
            out = train_step(model, optimizer, IMPLS[name], b, precision, seed=seed)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            record.steps.setdefault((precision, name), []).append((wall, cpu, peak_wall, peak_cpu))
            record.losses.setdefault((precision, name), []).append(float(out.loss.detach()))


@dataclass
class Record:
    steps: dict[tuple[str, str], list[tuple[float, float, float, float]]] = field(default_factory=dict)
    losses: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    peaks: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def median_wall(self, precision: str, name: str) -> float:
        return statistics.median(w for w, *_ in self.steps[precision, name])


def table(record: Record, flops: dict[str, float], batch: int) -> list[str]:
    """One row per precision x implementation: medians over rounds (wall time; CPU time of this process)."""
    med = statistics.median
    lines = [
        f"{'precision':<9} {'implementation':<14} {'wall s':>7} {'pairs/s':>8} {'speed-up':>8} {'cpu s':>7} "
        f"{'cpu speed-up':>12} {'loss':>7} {'GFLOP/step':>10} {'GFLOP/s':>8} {'mm peak':>8} {'% peak':>7} "
        f"{'% peak (cpu)':>12}"
    ]
    for (precision, name), steps in record.steps.items():
        base = record.steps[precision, "lavis-style"]
        wall, cpu = med(s[0] for s in steps), med(s[1] for s in steps)
        gflop = flops[name] / 1e9
        lines.append(
            f"{precision:<9} {name:<14} {wall:>7.2f} {batch / wall:>8.3f} {med(s[0] for s in base) / wall:>7.2f}x "
            f"{cpu:>7.2f} {med(s[1] for s in base) / cpu:>11.2f}x {med(record.losses[precision, name]):>7.3f} "
            f"{gflop:>10.1f} {gflop / wall:>8.1f} {med(p[0] for p in record.peaks[precision]):>8.1f} "
            f"{med(gflop / w / pw for w, _, pw, _ in steps):>7.1%} "
            f"{med(gflop / c / pc for _, c, _, pc in steps):>12.1%}"
        )
    raw = "; ".join(f"{p} {n} " + ",".join(f"{s[0]:.3g}" for s in v) for (p, n), v in record.steps.items())
    lines.append(f"wall seconds per step, each round: {raw}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small Q-Former, batch 6: a smoke run under a minute")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="most timed rounds (each: every impl x precision)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 560; quick 45)")
    parser.add_argument("--eager", action="store_true", help="also time LAVIS-style with LAVIS's eager attention")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    s = QUICK if args.quick else Sizes()
    if args.batch:
        s = replace(s, batch=args.batch)
    budget = args.budget or (45.0 if args.quick else 560.0)
    mm_n = 512 if args.quick else 2048
    torch.set_num_threads(args.threads)
    impls = ["vlbridge", "lavis-style"] + (["lavis-eager"] if args.eager or args.quick else [])

    def left() -> float:
        return budget - (time.perf_counter() - start)

    print(f"stage-1 training step: {s.describe()}")
    load = os.getloadavg()[0]
    print(f"{args.threads} threads, torch {torch.__version__}, load average {load:.1f} on {os.cpu_count()} CPUs")
    model = build_model(s)
    model.train()
    optimizer = make_optimizer(model, OptimConfig())
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {n_params / 1e6:.1f} M; AdamW (make_optimizer), clip 1.0, dropout {s.dropout}")
    batch = make_batch(s, seed=0)
    coco = make_batch(s, seed=0, coco=True)

    print("\n(1) loss check: eval mode, identical negatives, B=3 COCO-like captions")
    for line in loss_check(model, coco[:3]):
        print("  " + line)

    flops = {name: count_flops(model, IMPLS[name], batch) for name in impls}  # also the fp32 warm-up
    train_step(model, optimizer, ours, batch[:2], "fp32", seed=2)  # optimiser state
    print(f"[{time.perf_counter() - start:.0f} s: loss check, FLOP counts and warm-up done]")

    record = Record()
    for r in range(args.rounds):
        if r:  # another round only if it leaves time for the COCO round and the profile
            round_time = sum(record.median_wall(p, n) for p in PRECISIONS for n in impls)
            ours_time = sum(record.median_wall(p, "vlbridge") for p in PRECISIONS)
            if round_time + 0.75 * (round_time - ours_time) + 1.8 * ours_time > left():
                break
        timed_round(model, optimizer, batch, impls, r, mm_n, record)
    rounds = len(next(iter(record.steps.values())))

    print(f"[{time.perf_counter() - start:.0f} s: timed rounds done]")
    print(f"\n(2) training step, median of {rounds} round(s), implementations alternating; {s.describe()}")
    for line in table(record, flops, s.batch):
        print(line)
    print(
        f"FLOPs: matmuls of forward + backward (FlopCounterMode; the optimiser has none); lavis-style / vlbridge = "
        f"{flops['lavis-style'] / flops['vlbridge']:.2f}x.\nmm peak: torch.mm {mm_n}^3, best of 3, measured in every "
        "round before the steps; % peak = median over rounds of achieved / that round's peak (per wall second; "
        "per CPU second of this process in '% peak (cpu)')"
    )

    estimate = 0.75 * sum(record.median_wall(p, n) for p in PRECISIONS for n in ("vlbridge", "lavis-style"))
    if estimate <= left() or args.quick:
        coco_flops = {"vlbridge+trim": count_flops(model, ours_trim, coco), "lavis-style": flops["lavis-style"]}
        coco_record = Record()
        timed_round(model, optimizer, coco, ["vlbridge+trim", "lavis-style"], 0, mm_n, coco_record)
        lengths = coco.attention_mask.sum(1)
        print(
            f"\n(2b) COCO-like captions: lengths {int(lengths.min())}-{int(lengths.max())} (mean "
            f"{float(lengths.float().mean()):.1f}) padded to {s.text}; stage1_losses(trim_padding=True) trims them to "
            f"{int(lengths.max())} (off by default; without it vlbridge's shapes and FLOPs are those of table (2)); "
            "one round"
        )
        for line in table(coco_record, coco_flops, s.batch):
            print(line)
    else:
        print(f"\n(2b) COCO-like captions skipped: about {estimate:.0f} s needed, {max(0, left()):.0f} s left")

    if not args.no_profile:
        estimate = 1.2 * sum(record.median_wall(p, "vlbridge") for p in PRECISIONS)
        if estimate <= left() or args.quick:
            print("\n(3) where the time goes: torch.profiler over one vlbridge step per precision (self time per op)")
            for precision in PRECISIONS:
                for line in profile_step(model, optimizer, batch, precision, top=10):
                    print(line)
        else:
            print(f"\n(3) profile skipped: about {estimate:.0f} s needed, {max(0, left()):.0f} s left")
    print(f"\ntotal run time {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
