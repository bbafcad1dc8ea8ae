"""Captioning speed: vlbridge against transformers' `Blip2ForConditionalGeneration.generate` on one checkpoint.

Both sides load the same random checkpoint at a realistic size (ViT-B/16-like vision encoder, a 12-layer
Q-Former with 32 queries, an OPT-125M-sized LLM) and caption the same preprocessed pixel tensors (image
decoding is excluded), so the numbers compare the model + generation paths only. For every setting in
{batch 1, batch 8} x {greedy, beam 5} x {fp32, bf16} the two sides are timed alternately, several times
after a warm-up, and the median is reported together with whether the decoded texts are identical.

    python benchmarks/generation.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/generation.py --quick    # smoke run: small model, one repeat (< 1 minute)

The checkpoint is written once to a cache folder under the temp dir and reused by later runs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import vlbridge


@dataclass(frozen=True)
class Sizes:
    """Model sizes; the defaults are ViT-B/16 + BLIP-2's Q-Former + OPT-125M."""

    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_ffn: int = 3072
    image_size: int = 224
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
    vocab: int = 50272  # LLM embedding rows (OPT pads its 50265-token vocabulary to 50272)
    std: float = 0.05  # spread of the re-drawn weights (smaller ones make random LLMs repeat one token)


QUICK = Sizes(
    vision_width=192,
    vision_layers=2,
    vision_heads=3,
    vision_ffn=384,
    image_size=64,
    q_width=192,
    q_layers=2,
    q_heads=3,
    q_ffn=384,
    queries=8,
    llm_width=192,
    llm_layers=2,
    llm_heads=3,
    llm_ffn=384,
    vocab=4096,
    std=0.05,
)

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: pad 1, bos = eos = 2 ("</s>")


# ------------------------------------------------------------------------------------------------ checkpoint
def tokenizer(vocab_rows: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer covering every LLM row but the last 7: each id decodes to its own word.

    `<image>` is added after the words (id vocab_rows - 7, as in real BLIP-2 OPT checkpoints), so all ids stay
    below the LLM's vocabulary size and any generated token decodes to a distinct word (or a special).
    """
    words = SPECIALS + [f"w{i}" for i in range(vocab_rows - 7 - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_tokens(["<image>"], special_tokens=True)
    return fast


def randomize(model: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Re-draw every weight (norms around 1) so logits are well separated and generation does not stop early."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def build_checkpoint(s: Sizes) -> Path:
    """Write (once) a random transformers BLIP-2 OPT checkpoint with tokenizer and image processor."""
    key = hashlib.sha1(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"vlbridge-bench-{key}"
    if (folder / "done").exists():
        return folder
    tok = tokenizer(s.vocab)
    vision = dict(
        hidden_size=s.vision_width,
        intermediate_size=s.vision_ffn,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch,
    )
    qformer = dict(
        hidden_size=s.q_width,
        num_hidden_layers=s.q_layers,
        num_attention_heads=s.q_heads,
        intermediate_size=s.q_ffn,
        cross_attention_frequency=s.cross_freq,
    )
    text = dict(
        model_type="opt",
        vocab_size=s.vocab,
        hidden_size=s.llm_width,
        ffn_dim=s.llm_ffn,
        num_hidden_layers=s.llm_layers,
        num_attention_heads=s.llm_heads,
        word_embed_proj_dim=s.llm_width,
        max_position_embeddings=2048,
        bos_token_id=2,
        pad_token_id=1,
        eos_token_id=2,
    )
    cfg = transformers.Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=s.queries,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(cfg)
    randomize(model, s.std)
    model.eval()
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    transformers.BlipImageProcessor(size={"height": s.image_size, "width": s.image_size}).save_pretrained(partial)
    (partial / "done").touch()
    partial.rename(folder)
    return folder


# ------------------------------------------------------------------------------------------------ both sides
def hf_inputs(ours, batch: int) -> dict[str, torch.Tensor]:
    """transformers' prefix for the default (empty) prompt: `<image>` x Q, then the prompt's tokens (`</s>`)."""
    tok = ours.tokenizer
    Q = ours.config.qformer.num_query_tokens
    prompt = tok(ours.config.prompts.caption_prompt).input_ids
    row = [tok.convert_tokens_to_ids("<image>")] * Q + prompt
    ids = torch.tensor([row] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_ours(model, pixels: torch.Tensor, beams: int, new: int) -> list[str]:
    return model.caption(pixels, num_beams=beams, max_new_tokens=new, batch_size=len(pixels))


def run_theirs(model, tok, inputs: dict, pixels: torch.Tensor, beams: int, new: int) -> list[str]:
    with torch.inference_mode():
        out = model.generate(pixel_values=pixels, num_beams=beams, max_new_tokens=new, do_sample=False, **inputs)
    out = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def load_pair(folder: Path, dtype: torch.dtype):
    ours = vlbridge.load(folder, dtype=dtype)
    theirs = transformers.Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    return ours, theirs


def timed(fn: Callable[[], list[str]]) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclass
class Row:
    setting: str
    ours: list[float]  # seconds per call, one per timed repeat
    theirs: list[float]
    images: int
    identical: bool
    words: float  # mean generated words per image (ours)

    def rate(self, side: str, stat: Callable = min) -> float:
        """Images per second from the fastest (default) or the median call."""
        return self.images / stat(getattr(self, side))

    def ratio(self, stat: Callable = min) -> float:
        return self.rate("ours", stat) / self.rate("theirs", stat)


def measure(ours, theirs, pixels: torch.Tensor, beams: int, new: int, repeats: int, label: str) -> Row:
    """Alternate ours / theirs (the order flips every repeat) after one warm-up each; `repeats` timed calls each."""
    B = len(pixels)
    inputs = hf_inputs(ours, B)
    a = lambda: run_ours(ours, pixels, beams, new)  # noqa: E731
    b = lambda: run_theirs(theirs, ours.tokenizer, inputs, pixels, beams, new)  # noqa: E731
    ours_text, theirs_text = a(), b()
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = [("ours", a), ("theirs", b)] if r % 2 == 0 else [("theirs", b), ("ours", a)]
        for name, fn in order:
            t, _ = timed(fn)
            times[name].append(t)
    words = sum(len(t.split()) for t in ours_text) / B
    return Row(label, times["ours"], times["theirs"], B, ours_text == theirs_text, words)


# ------------------------------------------------------------------------------------------------ breakdown
class Breakdown:
    """Wall time inside the vision encoder, Q-Former and LLM (first call: prefill, later calls: decode steps)."""

    def __init__(self, parts: dict[str, torch.nn.Module], llm: torch.nn.Module) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.handles = []
        self.llm_calls = 0
        for name, module in parts.items():
            self._hook(module, lambda _n=name: _n)
        self._hook(llm, self._llm_name)

    def _llm_name(self) -> str:
        self.llm_calls += 1
        return "LLM prefill" if self.llm_calls == 1 else "LLM decode steps"

    def _hook(self, module: torch.nn.Module, name: Callable[[], str]) -> None:
        state: dict[str, object] = {}

        def pre(*_):
            state["t"], state["name"] = time.perf_counter(), name()

        def post(*_):
            self.totals[state["name"]] += time.perf_counter() - state["t"]

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def run(self, fn: Callable[[], object]) -> dict[str, float]:
        self.totals.clear()
        self.llm_calls = 0
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
        out = dict(self.totals)
        out["other (search, masks, cache, decode)"] = total - sum(out.values())
        out["total"] = total
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def breakdown(ours, theirs, pixels: torch.Tensor, beams: int, new: int, repeats: int) -> dict[str, dict[str, float]]:
    inputs = hf_inputs(ours, len(pixels))
    sides = {
        "ours": (
            Breakdown({"vision encoder": ours.vision, "Q-Former": ours.qformer}, ours.language_model),
            lambda: run_ours(ours, pixels, beams, new),
        ),
        "transformers": (
            Breakdown({"vision encoder": theirs.vision_model, "Q-Former": theirs.qformer}, theirs.language_model),
            lambda: run_theirs(theirs, ours.tokenizer, inputs, pixels, beams, new),
        ),
    }
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for _ in range(repeats):
        for side, (bd, fn) in sides.items():
            runs[side].append(bd.run(fn))
    for bd, _ in sides.values():
        bd.remove()
    return {side: min(rs, key=lambda r: r["total"]) for side, rs in runs.items()}  # the least disturbed call


# ------------------------------------------------------------------------------------------------ main
def print_table(rows: list[Row], new: int, threads: int) -> None:
    print(f"\nmax_new_tokens={new}, {threads} threads; images/s of the fastest timed call (interference from other")
    print("processes only ever adds time); the median-based ratio is shown too")
    header = (
        f"{'setting':<26} {'ours img/s':>10} {'HF img/s':>9} {'ours/HF':>8} {'(median)':>9}  {'identical':<9}"
        f"  {'words/img':>9}  runs"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.setting:<26} {r.rate('ours'):>10.2f} {r.rate('theirs'):>9.2f} {r.ratio():>7.2f}x"
            f" {r.ratio(statistics.median):>8.2f}x  {'yes' if r.identical else 'no':<9}  {r.words:>9.1f}"
            f"  {len(r.ours)}"
        )


def print_breakdown(profile: dict[str, dict[str, float]], label: str) -> None:
    print(f"\nwhere the time goes: {label} (seconds in the fastest of the profiled calls)\n")
    print(f"{'part':<38} {'ours':>8} {'transformers':>13}")
    for k in profile["ours"]:
        print(f"{k:<38} {profile['ours'][k]:>8.3f} {profile['transformers'][k]:>13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, fewer repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side at batch 8 (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    repeats = args.repeats or (2 if args.quick else 3)
    new = args.max_new_tokens
    start = time.perf_counter()

    folder = build_checkpoint(sizes)
    print(f"checkpoint: {folder} (ready after {time.perf_counter() - start:.0f}s)")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, sizes.image_size, sizes.image_size, generator=g)  # already-normalised pixels

    rows: list[Row] = []
    profile: dict[str, dict[str, float]] = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours, theirs = load_pair(folder, dtype)
        for batch in (1, 8):
            for beams in (1, 5):
                label = f"batch {batch}, {'greedy' if beams == 1 else f'beam {beams}'}, {dtype_name}"
                n = repeats if batch > 1 else 2 * repeats  # batch 1 is cheap: more calls, less noise
                rows.append(measure(ours, theirs, images[:batch], beams, new, n, label))
                r = rows[-1]
                print(
                    f"  {label}: ours {r.rate('ours'):.2f} img/s, transformers {r.rate('theirs'):.2f} img/s"
                    f" ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
        if dtype == torch.float32:
            profile = breakdown(ours, theirs, images[:8], 5, new, repeats)
        del ours, theirs
        gc.collect()

    print_table(rows, new, torch.get_num_threads())
    print_breakdown(profile, "batch 8, beam 5, fp32")
    print(f"\nfull run: {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
