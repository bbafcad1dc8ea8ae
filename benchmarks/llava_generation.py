"""Captioning speed: vlbridge against transformers' `LlavaForConditionalGeneration.generate` on one checkpoint.

Both sides load the same random LLaVA checkpoint at a realistic size (a CLIP ViT-B/16-like vision tower at 224
read at its penultimate layer, [CLS] dropped: 196 image tokens; LLaVA's 2-layer GELU projector; a Llama of about
125M parameters with a 32000-row vocabulary) and caption the same preprocessed pixel tensors with the same
LLaVA-1.5 prompt (image decoding is excluded), so the numbers compare the model + generation paths only. For
every setting in {batch 1, batch 8} x {greedy, beam 3} (fp32) the two sides are timed alternately, several times
after a warm-up; the table gives images/s of each side's fastest call, the speed ratio, the ratio from CPU time,
and whether the decoded texts are identical. A breakdown shows where the time goes in one setting.

On a shared machine other processes steal cores at random, and a descheduled OpenMP thread makes its
partner spin: the same call can take 2-10x longer. Interference only ever adds time, hence the fastest call;
and the script runs with `OMP_WAIT_POLICY=PASSIVE` (waiting threads sleep; `--spin` keeps the default),
so process CPU time counts only work and gives a second, much steadier ratio.

    python benchmarks/llava_generation.py            # full run (about 6 minutes on 2 CPU cores)
    python benchmarks/llava_generation.py --quick    # smoke run: small model, 2 repeats (< 1 minute)

The checkpoint is written once to a cache folder under the temp dir and reused by later runs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
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

PROMPT = "USER: <image>\nwhat is this? ASSISTANT:"


@dataclass(frozen=True)
class Sizes:
    """Model sizes; the defaults are CLIP ViT-B/16 at 224 + LLaVA's projector + a ~125M Llama."""

    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_ffn: int = 3072
    image_size: int = 224
    patch: int = 16
    llm_width: int = 768
    llm_layers: int = 12
    llm_heads: int = 12
    llm_kv_heads: int = 4
    llm_ffn: int = 2048
    vocab: int = 32000  # LLM embedding rows (Llama's); the tokenizer's words fill all but the last one
    std: float = 0.06  # spread of the re-drawn weights (norms around 1); at 0.02-0.04 the LLM repeats one word


QUICK = Sizes(
    vision_width=192,
    vision_layers=2,
    vision_heads=3,
    vision_ffn=384,
    image_size=64,
    llm_width=192,
    llm_layers=2,
    llm_heads=4,
    llm_kv_heads=2,
    llm_ffn=384,
    vocab=4096,
    std=0.1,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # Llama's ids: unk 0, bos 1, eos 2; pad 3
PROMPT_WORDS = ["USER:", "ASSISTANT:", "what", "is", "this?"]


# ------------------------------------------------------------------------------------------------ checkpoint
def tokenizer(vocab_rows: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer covering every LLM row but the last: each id decodes to its own word.

    `<image>` is added after the words (id vocab_rows - 1), so all ids stay below the LLM's vocabulary size and
    any generated token decodes to a distinct word (or a special); the prompt's words are in the vocabulary.
    """
    words = SPECIALS + PROMPT_WORDS
    words += [f"w{i}" for i in range(vocab_rows - 1 - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
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


def patches(s: Sizes) -> int:
    """Image tokens per image: the patch grid ([CLS] dropped by the "default" strategy)."""
    return (s.image_size // s.patch) ** 2


def build_checkpoint(s: Sizes) -> Path:
    """Write (once) a random transformers LLaVA (CLIP + Llama) checkpoint with tokenizer and image processor."""
    key = hashlib.sha1(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"vlbridge-bench-llava-{key}"
    if (folder / "done").exists():
        return folder
    tok = tokenizer(s.vocab)
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=s.vision_width,
        intermediate_size=s.vision_ffn,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch,
        projection_dim=512,
    )
    text = dict(
        model_type="llama",
        vocab_size=s.vocab,
        hidden_size=s.llm_width,
        intermediate_size=s.llm_ffn,
        num_hidden_layers=s.llm_layers,
        num_attention_heads=s.llm_heads,
        num_key_value_heads=s.llm_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=patches(s),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg)
    randomize(model, s.std)
    model.generation_config.pad_token_id = 3
    model.eval()
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    transformers.BlipImageProcessor(size={"height": s.image_size, "width": s.image_size}).save_pretrained(partial)
    (partial / "done").touch()
    partial.rename(folder)
    return folder


# ------------------------------------------------------------------------------------------------ both sides
def hf_inputs(tok, image_tokens: int, batch: int) -> dict[str, torch.Tensor]:
    """transformers' input for PROMPT: its `<image>` expanded to the image's token count (what its processor does)."""
    image = tok.convert_tokens_to_ids("<image>")
    row: list[int] = []
    for t in tok(PROMPT).input_ids:
        row.extend([image] * image_tokens if t == image else [t])
    ids = torch.tensor([row] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_ours(model, pixels: torch.Tensor, beams: int, new: int) -> list[str]:
    return model.caption(pixels, prompt=PROMPT, num_beams=beams, max_new_tokens=new, batch_size=len(pixels))


def run_theirs(model, tok, inputs: dict, pixels: torch.Tensor, beams: int, new: int) -> list[str]:
    with torch.inference_mode():
        out = model.generate(pixel_values=pixels, num_beams=beams, max_new_tokens=new, do_sample=False, **inputs)
    out = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def load_pair(folder: Path):
    """Ours and transformers' model, both fp32."""
    ours = vlbridge.load(folder)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


def first_difference(a: list[str], b: list[str]) -> str:
    """Where two lists of texts first differ: image index and word position."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            xs, ys = x.split(), y.split()
            j = next((k for k, (u, v) in enumerate(zip(xs, ys)) if u != v), min(len(xs), len(ys)))
            return f"image {i}, word {j}: ours {xs[j : j + 3]} vs transformers {ys[j : j + 3]}"
    return f"lengths {len(a)} vs {len(b)}"


@dataclass
class Row:
    """Timed calls of one setting: (wall seconds, process CPU seconds) per call and side."""

    setting: str
    images: int
    calls: dict[str, list[tuple[float, float]]]  # "ours" / "theirs" -> [(wall, cpu), ...]
    identical: bool
    words: float  # mean generated words per image (ours)
    distinct: float  # mean distinct words per image (ours): random LLMs that repeat one token show ~1
    difference: str = ""  # where the texts first differ, if they do

    def rate(self, side: str) -> float:
        """Images per second of the fastest call (interference from other processes only ever adds time)."""
        return self.images / min(w for w, _ in self.calls[side])

    def ratio(self) -> float:
        return self.rate("ours") / self.rate("theirs")

    def cpu_ratio(self) -> float:
        """Speed ratio from the least CPU time per call: robust on a busy machine when threads wait passively."""
        return min(c for _, c in self.calls["theirs"]) / min(c for _, c in self.calls["ours"])


def measure(ours, theirs, pixels: torch.Tensor, beams: int, new: int, repeats: int, label: str) -> Row:
    """One warm-up call each, then `repeats` timed calls each, alternating (the order flips every repeat)."""
    B = len(pixels)
    inputs = hf_inputs(ours.tokenizer, ours.num_visual_tokens, B)
    sides = {
        "ours": lambda: run_ours(ours, pixels, beams, new),
        "theirs": lambda: run_theirs(theirs, ours.tokenizer, inputs, pixels, beams, new),
    }
    texts = {name: fn() for name, fn in sides.items()}
    calls: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
    for r in range(repeats):
        for name in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            w, c = time.perf_counter(), time.process_time()
            sides[name]()
            calls[name].append((time.perf_counter() - w, time.process_time() - c))
    words = sum(len(t.split()) for t in texts["ours"]) / B
    distinct = sum(len(set(t.split())) for t in texts["ours"]) / B
    same = texts["ours"] == texts["theirs"]
    diff = "" if same else first_difference(texts["ours"], texts["theirs"])
    return Row(label, B, calls, same, words, distinct, diff)


# ------------------------------------------------------------------------------------------------ breakdown
class Breakdown:
    """CPU time inside the vision tower, projector, LM head and the LLM's decoder (first call: prefill, later
    calls: decode steps)."""

    def __init__(self, parts: dict[str, torch.nn.Module], llm: torch.nn.Module) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.handles = []
        self.llm_calls = 0
        for name, module in parts.items():
            self._hook(module, lambda _n=name: _n)
        self._hook(llm, self._llm_name)

    def _llm_name(self) -> str:
        self.llm_calls += 1
        return "LLM decoder prefill" if self.llm_calls == 1 else "LLM decoder decode steps"

    def _hook(self, module: torch.nn.Module, name: Callable[[], str]) -> None:
        state: dict[str, object] = {}

        def pre(*_):
            state["t"], state["name"] = time.process_time(), name()

        def post(*_):
            self.totals[state["name"]] += time.process_time() - state["t"]

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def run(self, fn: Callable[[], object]) -> dict[str, float]:
        self.totals.clear()
        self.llm_calls = 0
        t0 = time.process_time()
        fn()
        total = time.process_time() - t0
        out = dict(self.totals)
        out["rest (search, masks, cache, text)"] = total - sum(out.values())
        out["total"] = total
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


PARTS = ["vision tower", "projector", "LLM decoder prefill", "LLM decoder decode steps", "LM head"]


def breakdown(ours, theirs, pixels: torch.Tensor, beams: int, new: int, repeats: int) -> dict[str, dict[str, float]]:
    inputs = hf_inputs(ours.tokenizer, ours.num_visual_tokens, len(pixels))
    lm = ours.language_model
    sides = {
        "ours": (
            Breakdown(
                {"vision tower": ours.vision, "projector": ours.bridge, "LM head": lm.get_output_embeddings()},
                lm.base_model,
            ),
            lambda: run_ours(ours, pixels, beams, new),
        ),
        "transformers": (
            Breakdown(
                {
                    "vision tower": theirs.model.vision_tower,
                    "projector": theirs.model.multi_modal_projector,
                    "LM head": theirs.lm_head,
                },
                theirs.model.language_model,
            ),
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
def print_table(rows: list[Row]) -> None:
    w = max(len(r.setting) for r in rows)
    header = (
        f"{'setting':<{w}} {'ours img/s':>10} {'HF img/s':>9} {'ours/HF':>8} {'(by CPU)':>9}  {'identical':<9}"
        f"  {'words/img':>9} {'distinct':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.setting:<{w}} {r.rate('ours'):>10.2f} {r.rate('theirs'):>9.2f} {r.ratio():>7.2f}x"
            f" {r.cpu_ratio():>8.2f}x  {'yes' if r.identical else 'no':<9}  {r.words:>9.1f} {r.distinct:>8.1f}"
        )
    for r in rows:
        if not r.identical:
            print(f"  texts differ in '{r.setting}': {r.difference}")


def print_breakdown(profile: dict[str, dict[str, float]], label: str) -> None:
    print(f"\nwhere the time goes: {label}, CPU seconds per call (the least disturbed profiled call)\n")
    print(f"{'part':<36} {'ours':>8} {'transformers':>13}")
    keys = [k for k in PARTS if k in profile["ours"] or k in profile["transformers"]]
    for k in [*keys, "rest (search, masks, cache, text)", "total"]:
        print(f"{k:<36} {profile['ours'].get(k, 0.0):>8.2f} {profile['transformers'].get(k, 0.0):>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, fewer repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side at batch 8 (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled call (batch 8, beam 3)")
    parser.add_argument("--spin", action="store_true", help="keep OpenMP's default (spinning) waits")
    args = parser.parse_args()
    if not args.spin and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP reads this when torch loads: run again with it set (see the module docstring).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    repeats = args.repeats or (2 if args.quick else 3)
    new = args.max_new_tokens
    start = time.perf_counter()
    load = os.getloadavg()[0]

    folder = build_checkpoint(sizes)
    print(f"checkpoint: {folder} (ready after {time.perf_counter() - start:.0f}s)")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, sizes.image_size, sizes.image_size, generator=g)  # already-normalised pixels

    ours, theirs = load_pair(folder)
    n_params = sum(p.numel() for p in theirs.parameters()) / 1e6
    n_llm = sum(p.numel() for p in theirs.model.language_model.parameters()) / 1e6
    n_llm += theirs.lm_head.weight.numel() / 1e6
    print(f"{n_params:.0f}M parameters, LLM {n_llm:.0f}M; {ours.num_visual_tokens} image tokens per image")
    rows: list[Row] = []
    for batch in (1, 8):
        for beams in (1, 3):
            label = f"batch {batch}, {'greedy' if beams == 1 else f'beam {beams}'}, fp32"
            n = repeats if batch > 1 else repeats + 2  # batch 1 is cheap: more calls, less noise
            rows.append(measure(ours, theirs, images[:batch], beams, new, n, label))
            r = rows[-1]
            print(
                f"  {label}: ours {r.rate('ours'):.2f} img/s, transformers {r.rate('theirs'):.2f} img/s,"
                f" identical {'yes' if r.identical else 'no'} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    profile = None if args.no_breakdown else breakdown(ours, theirs, images[:8], 3, new, 2)
    del ours, theirs
    gc.collect()

    print(
        f"\nmax_new_tokens={new}, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')},"
        f" {repeats} timed calls per side at batch 8 ({repeats + 2} at batch 1) after a warm-up;"
        f"\nimg/s and ours/HF from the fastest call of each side, (by CPU) from the least CPU time per call;"
        f"\nload average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (on {os.cpu_count()} CPUs)\n"
    )
    print_table(rows)
    if profile:
        print_breakdown(profile, "batch 8, beam 3, fp32")
    print(f"\nfull run: {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
