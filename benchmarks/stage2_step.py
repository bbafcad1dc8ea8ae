"""Stage-2 training step: vlbridge's ``Stage2Module`` against transformers' ``Blip2ForConditionalGeneration``.

One random checkpoint (written once by ``transformers`` itself: its own initialisers, fixed seed, except the
vision encoder's ``initializer_range``, 0.02 instead of BLIP-2's 1e-10, so that image features are O(1)) is loaded
by both sides: ours with ``vlbridge.load(folder)``, theirs with ``Blip2ForConditionalGeneration.from_pretrained``.
Sizes (the defaults): a ViT-B/16-like ``Blip2VisionConfig`` (768 wide, 12 layers, 12 heads, FFN 3072, 224 px,
patch 16: 197 tokens; ``--vision-layers`` makes it shallower), a BLIP-2 Q-Former (12 x 768, 12 heads, FFN 3072,
32 queries, cross-attention every 2 layers) and an OPT-125M-sized LLM (12 x 768, 12 heads, FFN 3072, vocabulary
50272). Batch 8, a 5-token prompt (BOS included) and captions of 14-26 tokens (mean 20, EOS included), padded on
the right: [32 queries | prompt | caption | pad].

A step is what ``vlbridge.training.loop`` does: forward (fp32, or under CPU bf16 autocast), backward, gradient
clipping at 1.0, ``AdamW`` (``make_optimizer``: the same optimiser, built the same way, on both sides) over the
trainable parts only — queries, Q-Former, the vision LayerNorm (``ln_vision``; transformers' ``post_layernorm``)
and the projection — then ``zero_grad``. The vision encoder and the LLM are frozen on both sides
(``requires_grad_(False)``, eval mode: no dropout there); Q-Former dropout is on.

- vlbridge: ``Stage2Module(model)(batch)`` with ``pixel_values``, ``prompt_ids`` and ``target_ids``;
  the LLM's hidden states go through the LM head at the target positions only.
- transformers: ``forward(pixel_values, input_ids=[<image>] * 32 + prompt + caption, attention_mask,
  labels=-100 except the caption)``: logits over the whole sequence, then its causal-LM loss.
- bf16: the frozen vision encoder and LLM are stored in bf16 (ours: ``vlbridge.load(folder,
  dtype=torch.bfloat16)``; theirs: ``from_pretrained`` in fp32, then its vision embeddings + encoder and its LLM
  cast to bf16, the same rounding); the bridge (queries, Q-Former, ``post_layernorm``, projection) keeps its
  exact fp32 weights on both sides and the step runs under bf16 autocast.
- ``--cached`` adds ``vlbridge-cached``: the same step reading frozen image features (fp16, as ``FeatureCache``
  stores them) instead of pixels (``batch["vision_feats"]``): what stage-2 training costs with the feature cache.
  transformers has no such path, so that row is the bridge + LLM cost alone, not a like-for-like ratio.

Every (implementation, precision) runs in its own worker process, so that its peak resident memory is its own
(``--quick``: one worker per implementation serves both precisions). A worker's first step is the loss check (eval
mode, no dropout, on a check batch; it also allocates the optimiser state: the warm-up); the workers of both sides
take it at once, untimed, while the next precision's workers load. Then the timed steps: the implementations take
turns (the order flips every round; other processes share the CPU), as many rounds as the budget allows (2 to
``--rounds``), medians. Round 1 of each side runs under ``torch.profiler`` (its overhead is about 1%). Peak memory
is the worker's ``VmHWM`` over the timed steps (reset with ``/proc/self/clear_refs`` after the warm-up), in total
and above the RSS before them (the step's activations and gradients). ``--threads`` defaults to 2, or 1 when the
machine is already busy (1-minute load average at least the number of cores): two OpenMP threads on an
oversubscribed machine wait for each other at every op (2-3x slower steps, and much noisier).

Printed:
1. the loss check: each side's loss, fp32 and bf16, their difference, and in fp32 the largest gradient
   difference relative to the largest gradient (parameters matched by name through the loader's table);
2. the timing table: wall seconds per step, samples/s, ratio to transformers, CPU seconds per step and that ratio
   (CPU time stops while the worker is descheduled: steadier on a shared machine), peak memory;
3. where the time goes: the profiled steps, split by part (forward and backward separately; a backward op is
   charged to the part whose forward op created it) and the top ops.

    python benchmarks/stage2_step.py            # full size (about 7 minutes on 2 busy cores)
    python benchmarks/stage2_step.py --quick    # small model, batch 4 (about 30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

PRECISIONS = ("fp32", "bf16")
SIDES = ("vlbridge", "transformers", "vlbridge-cached")
BOS = EOS = 2  # OPT's </s>
PAD = 1


@dataclass(frozen=True)
class Sizes:
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_ffn: int = 3072
    image: int = 224
    patch: int = 16
    q_width: int = 768
    q_layers: int = 12
    q_heads: int = 12
    q_ffn: int = 3072
    queries: int = 32
    cross_freq: int = 2
    llm_width: int = 768
    llm_layers: int = 12
    llm_heads: int = 12
    llm_ffn: int = 3072
    vocab: int = 50272
    batch: int = 8
    prompt: int = 5  # BOS included
    caption: int = 20  # mean, EOS included; lengths caption - 6 .. caption + 6

    def describe(self) -> str:
        n = (self.image // self.patch) ** 2 + 1
        return (
            f"B={self.batch}; vision {self.vision_layers}x{self.vision_width} ({self.image} px / {self.patch}: "
            f"{n} tokens, frozen); Q-Former {self.q_layers}x{self.q_width}, {self.queries} queries, xattn every "
            f"{self.cross_freq}; LLM {self.llm_layers}x{self.llm_width} FFN {self.llm_ffn} V={self.vocab} (frozen); "
            f"prompt {self.prompt} + caption ~{self.caption} tokens"
        )


QUICK = Sizes(
    vision_width=128, vision_layers=2, vision_heads=4, vision_ffn=512, image=64, q_width=128, q_layers=2,
    q_heads=4, q_ffn=512, queries=8, llm_width=128, llm_layers=2, llm_heads=4, llm_ffn=512, vocab=8192, batch=4,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------- set-up
def build_checkpoint(folder: Path, s: Sizes, seed: int = 0) -> Path:
    """A random transformers BLIP-2 OPT checkpoint (transformers' own initialisers), written with save_pretrained."""
    torch.manual_seed(seed)
    vision = dict(
        hidden_size=s.vision_width, intermediate_size=s.vision_ffn, num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads, image_size=s.image, patch_size=s.patch,
        initializer_range=0.02,  # Blip2VisionConfig's default 1e-10 gives features of ~1e-8 (0 in fp16)
    )  # fmt: skip
    qformer = dict(
        hidden_size=s.q_width, num_hidden_layers=s.q_layers, num_attention_heads=s.q_heads,
        intermediate_size=s.q_ffn, cross_attention_frequency=s.cross_freq, encoder_hidden_size=s.vision_width,
    )  # fmt: skip
    text = dict(
        model_type="opt", vocab_size=s.vocab, hidden_size=s.llm_width, ffn_dim=s.llm_ffn,
        num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_heads, word_embed_proj_dim=s.llm_width,
        max_position_embeddings=2048, bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    config = transformers.Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=s.queries,
        image_token_index=image_token(s),
    )  # fmt: skip
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def image_token(s: Sizes) -> int:
    return s.vocab - 7  # a spare row past the text vocabulary (BLIP-2 OPT: 50265 of 50272)


@dataclass
class Batch:
    pixel_values: Tensor  # [B, 3, H, W]
    prompts: list[list[int]]  # BOS first
    targets: list[list[int]]  # EOS last


def make_batch(s: Sizes, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(s.batch, 3, s.image, s.image, generator=g)
    low = 3
    high = image_token(s)  # random ids never hit the <image> placeholder

    def ids(n: int) -> list[int]:
        return torch.randint(low, high, (n,), generator=g).tolist()

    lengths = torch.randint(s.caption - 6, s.caption + 7, (s.batch,), generator=g).tolist()
    lengths[0] = s.caption + 6  # one full-length row, as a real batch has
    return Batch(pixels, [[BOS, *ids(s.prompt - 1)] for _ in range(s.batch)], [[*ids(n - 1), EOS] for n in lengths])


def hf_inputs(b: Batch, s: Sizes) -> dict[str, Tensor]:
    """transformers' layout: `<image>` x Q, prompt, caption, padding; labels only on the caption."""
    rows = [p + t for p, t in zip(b.prompts, b.targets)]
    Q, width = s.queries, max(map(len, rows))
    ids = torch.full((len(rows), Q + width), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (r, p) in enumerate(zip(rows, b.prompts)):
        ids[i, :Q] = image_token(s)
        ids[i, Q : Q + len(r)] = torch.tensor(r)
        mask[i, : Q + len(r)] = 1
        labels[i, Q + len(p) : Q + len(r)] = torch.tensor(r[len(p) :])
    return {"pixel_values": b.pixel_values, "input_ids": ids, "attention_mask": mask, "labels": labels}


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class Side:
    """One implementation at one precision: its model, its optimiser, how it computes the loss of a batch."""

    def __init__(self, name: str, folder: Path, precision: str, s: Sizes) -> None:
        from vlbridge.training.optim import make_optimizer
        from vlbridge.training.recipe import OptimConfig

        self.name, self.precision, self.s = name, precision, s
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if name.startswith("vlbridge"):
            import vlbridge
            from vlbridge.training.stage2 import Stage2Module

            self.model = vlbridge.load(folder, dtype=dtype)
            self.module: nn.Module = Stage2Module(self.model)
            self.regions = {
                "vision (frozen)": [self.model.vision],
                "ln_vision + Q-Former": [self.model.ln_vision, self.model.qformer],
                "projection": [self.model.language_projection],
                "LLM decoder (frozen)": [self.model.language_model.model.decoder],
                "LM head (frozen)": [self.model.language_model.lm_head],
            }
        else:
            hf = transformers.Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
            hf.requires_grad_(False)
            # bf16: the frozen parts only, as vlbridge.load does; the bridge keeps its exact fp32 weights
            for part in (hf.vision_model.embeddings, hf.vision_model.encoder, hf.language_model):
                part.to(dtype)
            for part in (hf.qformer, hf.language_projection, hf.vision_model.post_layernorm):
                part.requires_grad_(True)
            hf.query_tokens.requires_grad_(True)
            self.model = self.module = hf
            self.regions = {
                "vision (frozen)": [hf.vision_model.embeddings, hf.vision_model.encoder],
                "ln_vision + Q-Former": [hf.vision_model.post_layernorm, hf.qformer],
                "projection": [hf.language_projection],
                "LLM decoder (frozen)": [hf.language_model.model.decoder],
                "LM head (frozen)": [hf.language_model.lm_head],
            }
        # Weights may still be views of the checkpoint's memory-mapped file (how much depends on the load path):
        # copy them into ordinary memory on both sides, so that resident memory compares like with like.
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                t.data = t.data.clone()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, OptimConfig())
        self.grad_clip = OptimConfig().grad_clip
        self.train(True)

    def train(self, mode: bool) -> None:
        self.module.train(mode)
        if self.name == "transformers":  # frozen parts: never dropout (ours does this itself)
            self.model.vision_model.eval()
            self.model.language_model.eval()

    def inputs(self, b: Batch) -> dict[str, Any]:
        if self.name == "transformers":
            return hf_inputs(b, self.s)
        batch: dict[str, Any] = {"prompt_ids": b.prompts, "target_ids": b.targets}
        if self.name == "vlbridge-cached":
            batch["vision_feats"] = self.cached_features(b)
        else:
            batch["pixel_values"] = b.pixel_values
        return batch

    def cached_features(self, b: Batch) -> Tensor:
        """Frozen features as the feature cache would hand them over (fp16), computed once per batch."""
        key = id(b)
        if getattr(self, "_cache_key", None) != key:
            with torch.no_grad():
                self._cache = self.model.vision(b.pixel_values).to(torch.float16)
            self._cache_key = key
        return self._cache

    def loss(self, inputs: dict[str, Any]) -> Tensor:
        return self.module(**inputs).loss if self.name == "transformers" else self.module(inputs).loss

    def step(self, inputs: dict[str, Any], grads_to: str | None = None) -> float:
        """What the training loop does for one optimiser step; returns the loss. With `grads_to`, the gradients
        (before clipping) are saved there first."""
        with record_function("forward"), autocast(self.precision):
            loss = self.loss(inputs)
        with record_function("backward"):
            loss.backward()
        if grads_to:
            torch.save(self.named_grads(), grads_to)
        with record_function("optimizer"):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def named_grads(self) -> dict[str, Tensor]:
        """Gradients under our parameter names (transformers' names mapped with the loader's table)."""
        from vlbridge.interop.hf import hf_to_ours

        out = {}
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            key = name if self.name.startswith("vlbridge") else hf_to_ours(name)
            out[key] = p.grad.detach().float().clone()
        return out


# ------------------------------------------------------------------------------------------------- memory
def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset this process's resident high-water mark (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- profile
class Regions:
    """Forward hooks that open a `region::<part>` profiler range around each part's modules."""

    def __init__(self, regions: dict[str, list[nn.Module]]) -> None:
        self.handles = []
        self.open: list[Any] = []
        for name, modules in regions.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._enter(name)))
                self.handles.append(m.register_forward_hook(self._exit))

    def _enter(self, name: str):
        def hook(module, args):
            rf = record_function(f"region::{name}")
            rf.__enter__()
            self.open.append(rf)

        return hook

    def _exit(self, module, args, output):
        self.open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


BACKWARD = "autograd::engine::evaluate_function: "


def attribute(events) -> dict[tuple[str, str], float]:
    """Self CPU seconds by (part, forward|backward|optimizer); backward ops go to the part of their forward op."""

    def enclosing(e) -> Any:
        p = e
        while p is not None:
            if p.name.startswith(("region::", BACKWARD)) or p.name in ("forward", "backward", "optimizer"):
                return p
            p = p.cpu_parent
        return None

    # Every forward op records the autograd sequence number current when it starts; the op that creates the
    # autograd node numbered n is the last one (in time) to record n, and that node's backward records n too.
    seq_region: dict[int, str] = {}
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not e.name.startswith(BACKWARD):
            r = enclosing(e)
            if r is None or not r.name.startswith(BACKWARD):
                in_region = r is not None and r.name.startswith("region::")
                seq_region[e.sequence_nr] = r.name[len("region::") :] if in_region else "loss + glue"
    out: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        r = enclosing(e)
        if r is None:
            key = ("other", "-")
        elif r.name.startswith("region::"):
            key = (r.name[len("region::") :], "forward")
        elif r.name.startswith(BACKWARD):
            key = (seq_region.get(r.sequence_nr, "loss + glue"), "backward")
        elif r.name == "optimizer":
            key = ("clip + AdamW", "optimizer")
        else:
            key = ("loss + glue", r.name)
        out[key] += e.self_cpu_time_total / 1e6
    return out


def profiled_step(side: Side, inputs: dict[str, Any], top: int) -> tuple[float, float, float, list[str]]:
    """One training step under torch.profiler: (wall seconds, CPU seconds, loss, report lines)."""
    regions = Regions(side.regions)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t, cpu = time.perf_counter(), time.process_time()
            loss = side.step(inputs)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    finally:
        regions.remove()
    return wall, cpu, loss, profile_report(side, prof, wall, top)


def profile_report(side: Side, prof: Any, wall: float, top: int) -> list[str]:
    parts = attribute(prof.events())
    total = sum(parts.values())
    lines = [
        f"{side.name} {side.precision}: a timed step under the profiler, {wall:.2f} s wall ({total:.2f} s self CPU)"
    ]
    lines.append(f"  {'part':<22} {'forward s':>9} {'backward s':>10} {'other s':>8} {'share':>6}")
    names = [*side.regions, "loss + glue", "clip + AdamW", "other"]
    for name in names:
        f, b = parts.get((name, "forward"), 0.0), parts.get((name, "backward"), 0.0)
        o = sum(v for (n, k), v in parts.items() if n == name and k not in ("forward", "backward"))
        if f + b + o > 0:
            lines.append(f"  {name:<22} {f:>9.2f} {b:>10.2f} {o:>8.2f} {(f + b + o) / total:>6.1%}")
    ops = sorted(
        (e for e in prof.key_averages() if e.key.startswith("aten::")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    lines.append(f"  {'top op':<34} {'self CPU s':>10} {'share':>6} {'calls':>6}")
    for e in ops[:top]:
        sec = e.self_cpu_time_total / 1e6
        lines.append(f"  {e.key:<34} {sec:>10.2f} {sec / total:>6.1%} {e.count:>6}")
    return lines


# ------------------------------------------------------------------------------------------------- worker
def send(obj: dict[str, Any]) -> None:
    print("@@" + json.dumps(obj), flush=True)


def worker(args: argparse.Namespace) -> None:
    """Serve one implementation at one or more precisions over stdin/stdout: check, step, reset, peak, quit."""
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    s = sizes_of(args)
    t = time.perf_counter()
    sides = {p: Side(args.worker, Path(args.checkpoint), p, s) for p in args.precision.split(",")}
    check, timed = make_batch(s, seed=1), make_batch(s, seed=0)
    timed_inputs = {p: side.inputs(timed) for p, side in sides.items()}
    any_side = next(iter(sides.values()))
    send({"ready": time.perf_counter() - t, "trainable": sum(p.numel() for p in any_side.trainable)})
    before: dict[str, int] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op, precision = cmd["op"], cmd.get("precision")
        side = sides.get(precision, any_side)
        if op == "check":  # the first step: eval mode (no dropout) on the check batch, the weights as loaded
            side.train(False)
            t = time.perf_counter()
            loss = side.step(side.inputs(check), grads_to=cmd.get("grads"))
            side.train(True)
            send({"loss": loss, "seconds": time.perf_counter() - t})
        elif op == "step":
            if cmd.get("profile"):
                seconds, cpu, loss, lines = profiled_step(side, timed_inputs[precision], cmd.get("top", 10))
            else:
                t, cpu = time.perf_counter(), time.process_time()  # CPU: all threads, stops while descheduled
                loss, lines = side.step(timed_inputs[precision]), []
                seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
            send({"seconds": seconds, "cpu": cpu, "loss": loss, "lines": lines})
        elif op == "reset":  # from here on, VmHWM is the peak of what follows
            before = {k: proc_status_kib(k) for k in ("VmRSS", "RssAnon", "RssFile")}
            before["reset"] = int(reset_peak())
            send(before)
        elif op == "peak":
            send({"VmHWM": proc_status_kib("VmHWM"), **before})
        elif op == "quit":
            send({"bye": True})
            return


class Worker:
    """A worker process; its constructor does not wait for it to load (`ready` does)."""

    def __init__(self, side: str, precisions: list[str], folder: Path, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", side, "--precision", ",".join(precisions),
               "--checkpoint", str(folder), "--threads", str(args.threads)]  # fmt: skip
        cmd += ["--quick"] if args.quick else []
        cmd += ["--vision-layers", str(args.vision_layers)] if args.vision_layers else []
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close); shown if the worker fails
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )
        self.side = side
        self.info: dict[str, Any] = {}

    def ready(self) -> dict[str, Any]:
        if not self.info:
            self.info = self.read()
        return self.info

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.stderr.seek(0)
        raise RuntimeError(f"worker {self.side} exited with {self.proc.wait()}:\n{self.stderr.read()[-4000:]}")

    def tell(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        self.tell(op, **kw)
        return self.read()

    def close(self) -> None:
        self.ask("quit")
        self.proc.wait()
        self.stderr.close()


# ------------------------------------------------------------------------------------------------- main
def log(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, batch 4: a smoke run under a minute")
    parser.add_argument("--rounds", type=int, default=None, help="most timed rounds per precision (default 5; quick 2)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 440; quick 45)")
    parser.add_argument("--vision-layers", type=int, default=None, help="depth of the frozen vision encoder (12)")
    parser.add_argument("--cached", action="store_true", help="add the vlbridge row on cached (fp16) vision features")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: 2, or 1 on a machine already busy)",
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    start = time.perf_counter()
    threads_note = ""
    if args.threads is None:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        args.threads = min(2, cores) if load < cores else 1
        threads_note = f" (auto: 1-minute load average {load:.1f} on {cores} cores; --threads N to choose)"
    s = sizes_of(args)
    budget = args.budget or (45.0 if args.quick else 440.0)
    max_rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    sides = [n for n in SIDES if args.cached or n != "vlbridge-cached"]
    print(f"stage-2 training step: {s.describe()}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.threads} thread(s) per worker{threads_note}")  # fmt: skip

    checks: dict[tuple[str, str], float] = {}
    grad_lines: list[str] = []
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    cpu_times: dict[tuple[str, str], list[float]] = defaultdict(list)
    losses: dict[tuple[str, str], list[float]] = defaultdict(list)
    profiled: dict[tuple[str, str], int] = {}  # which round was profiled
    peaks: dict[tuple[str, str], dict[str, Any]] = {}
    trainable: dict[str, int] = {}
    profiles: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stage2_step_") as tmp:
        folder = build_checkpoint(Path(tmp) / "ckpt", s)
        log(start, "checkpoint written")
        # Full size: one worker per (implementation, precision); the bf16 ones load while the fp32 ones take their
        # untimed first step, and wait. --quick: one worker per implementation serving both precisions.
        phases = [list(PRECISIONS)] if args.quick else [[p] for p in PRECISIONS]
        spawned = [{n: Worker(n, phase, folder, args) for n in sides} for phase in phases[:1]]
        for pi, phase in enumerate(phases):
            workers = spawned[pi]
            for n, w in workers.items():
                trainable[n] = w.ready()["trainable"]
            log(start, f"workers ready: {', '.join(phase)}")
            if pi + 1 < len(phases):
                spawned.append({n: Worker(n, phases[pi + 1], folder, args) for n in sides})
            for qi, precision in enumerate(phase):
                # (1) the loss check: each worker's first step, eval mode, before any optimiser step; it is also
                # the warm-up (allocates the optimiser state)
                for n, w in workers.items():  # untimed: all workers at once
                    grads = str(Path(tmp) / f"{n}.pt") if precision == "fp32" and n != "vlbridge-cached" else None
                    w.tell("check", precision=precision, grads=grads)
                for n, w in workers.items():
                    checks[precision, n] = w.read()["loss"]
                if precision == "fp32":
                    grad_lines.append(compare_grads(Path(tmp) / "vlbridge.pt", Path(tmp) / "transformers.pt"))
                if len(spawned) > pi + 1:  # nothing else loads while steps are timed
                    for w in spawned[pi + 1].values():
                        w.ready()
                for w in workers.values():
                    w.ask("reset")
                log(start, f"{precision}: loss check / warm-up done")
                # (2) timed rounds (the order flips every round), within this precision's share of the budget;
                # round 1 of vlbridge and transformers runs under the profiler (its overhead is well under 1%)
                share = (pi * len(phase) + qi + 1) / len(PRECISIONS)
                share_end = start + budget * (0.55 if share < 1 else 1.0)
                while len(times[precision, "vlbridge"]) < max_rounds:
                    rounds = len(times[precision, "vlbridge"])
                    round_time = sum(statistics.median(times[precision, n]) for n in sides) if rounds else 0.0
                    if rounds >= 2 and time.perf_counter() + round_time > share_end:
                        break
                    for n in sides if rounds % 2 == 0 else sides[::-1]:
                        profile_it = rounds == 1 and not args.no_profile and n != "vlbridge-cached"
                        r = workers[n].ask("step", precision=precision, profile=profile_it, top=10)
                        times[precision, n].append(r["seconds"])
                        cpu_times[precision, n].append(r["cpu"])
                        losses[precision, n].append(r["loss"])
                        if profile_it:
                            profiled[precision, n] = rounds
                            profiles += r["lines"]
                for n, w in workers.items():
                    peaks[precision, n] = w.ask("peak")
                    if qi + 1 < len(phase):  # the next precision's peak, from the same process
                        w.ask("reset")
                log(start, f"{precision}: {len(times[precision, 'vlbridge'])} rounds timed")
            for w in workers.values():
                w.close()

    print("\n(1) loss check: eval mode (no dropout), the same batch and weights, before any optimiser step")
    extra = "vlbridge-cached" in sides
    print(
        f"  {'precision':<9} {'vlbridge':>12} {'transformers':>12} {'|difference|':>12}"
        + (f" {'vlbridge-cached (fp16 features)':>32}" if extra else "")
    )
    for precision in PRECISIONS:
        a, b = checks[precision, "vlbridge"], checks[precision, "transformers"]
        c = f" {checks[precision, 'vlbridge-cached']:>32.6f}" if extra else ""
        print(f"  {precision:<9} {a:>12.6f} {b:>12.6f} {abs(a - b):>12.2e}{c}")
    for line in grad_lines:
        print("  " + line)
    print("  trainable parameters: " + ", ".join(f"{n} {v / 1e6:.2f} M" for n, v in trainable.items()))

    n_rounds = {p: len(times[p, "vlbridge"]) for p in PRECISIONS}
    print(
        "\n(2) training step (forward + backward + clip + AdamW), medians of "
        + ", ".join(f"{n_rounds[p]} rounds ({p})" for p in PRECISIONS)
        + "\n  wall s: per step; ratio: transformers' median / this one; CPU s: the worker's CPU time per step (all"
        "\n  threads; does not advance while descheduled, so less sensitive to the other processes on the machine);"
        "\n  peak MiB: the worker's VmHWM over its timed steps; step Δ: that minus its RSS before them; before:"
        "\n  that RSS, anonymous + file-backed (the weights were copied out of the checkpoint's mapped file)"
    )
    header = (
        f"{'precision':<9} {'implementation':<16} {'wall s':>7} {'samples/s':>9} {'ratio':>6} {'CPU s':>7} "
        f"{'ratio':>6} {'loss':>7} {'peak MiB':>8} {'step Δ':>7} {'before: anon + file':>19}"
    )
    if not all(pk["reset"] for pk in peaks.values()):
        print("  (/proc/self/clear_refs refused: peak MiB is since the worker started, loading included)")
    print(header)
    print("-" * len(header))
    for precision in PRECISIONS:
        base = statistics.median(times[precision, "transformers"])
        base_cpu = statistics.median(cpu_times[precision, "transformers"])
        for n in sides:
            dt, cpu = statistics.median(times[precision, n]), statistics.median(cpu_times[precision, n])
            pk = {k: v / 1024 for k, v in peaks[precision, n].items()}
            print(
                f"{precision:<9} {n:<16} {dt:>7.2f} {s.batch / dt:>9.3f} {base / dt:>5.2f}x {cpu:>7.2f} "
                f"{base_cpu / cpu:>5.2f}x {statistics.median(losses[precision, n]):>7.3f} {pk['VmHWM']:>8.0f} "
                f"{pk['VmHWM'] - pk['VmRSS']:>7.0f} {pk['RssAnon']:>9.0f} + {pk['RssFile']:>7.0f}"
            )
    raw = []
    for p in PRECISIONS:
        for n in sides:
            marks = ["*" if profiled.get((p, n)) == i else "" for i in range(len(times[p, n]))]
            steps = zip(times[p, n], cpu_times[p, n], marks)
            raw.append(f"{p} {n} " + ", ".join(f"{t:.1f}/{c:.1f}{m}" for t, c, m in steps))
    print("raw step times (wall/CPU s; * = under the profiler): " + "; ".join(raw))
    if profiles:
        print("\n(3) where the time goes (torch.profiler, self CPU time; backward ops charged to their forward's part)")
        for line in profiles:
            print(line)
    print(f"\ntotal run time {time.perf_counter() - start:.0f} s")


def sizes_of(args: argparse.Namespace) -> Sizes:
    s = QUICK if args.quick else Sizes()
    return replace(s, vision_layers=args.vision_layers) if args.vision_layers else s


def compare_grads(ours_file: Path, theirs_file: Path) -> str:
    a, b = torch.load(ours_file), torch.load(theirs_file)
    shared = sorted(a.keys() & b.keys())
    scale = max(float(g.abs().max()) for g in a.values())
    diff = max(float((a[k] - b[k]).abs().max()) for k in shared)
    return (
        f"fp32 gradients: max |difference| / max |gradient| = {diff / scale:.2e} over {len(shared)} tensors "
        f"(with a gradient: vlbridge {len(a)}, transformers {len(b)})"
    )


if __name__ == "__main__":
    main()
