"""Retrieval recall (Karpathy convention), ITM re-ranking and zero-shot accuracy on hand-built matrices."""

import pytest
import torch

from vlbridge.errors import InputError
from vlbridge.eval.retrieval import recall_at_k, repeated_captions, rerank_with_itm, zero_shot_accuracy

# 3 images, 2 captions each: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2]

SIM = torch.tensor(
    [
        # t0    t1    t2    t3    t4    t5
        [0.10, 0.90, 0.80, 0.20, 0.30, 0.00],  # image 0: own caption t1 ranks 1st       -> txt rank 0
        [0.95, 0.30, 0.60, 0.85, 0.10, 0.20],  # image 1: best own (t3, .85) behind t0   -> txt rank 1
        [0.99, 0.98, 0.97, 0.50, 0.05, 0.40],  # image 2: best own (t5, .40) behind 4    -> txt rank 4
    ]
)
# Text -> image (columns of SIM):
#   t0: own image 0 scores .10 < .95, .99 -> rank 2      t1: own 0 scores .90 < .98 -> rank 1
#   t2: own 1 scores .60 < .80, .97 -> rank 2            t3: own 1 scores .85, best  -> rank 0
#   t4: own 2 scores .05 < .30, .10 -> rank 2            t5: own 2 scores .40, best  -> rank 0


def test_recall_on_hand_built_matrix():
    result = recall_at_k(SIM, TEXT_TO_IMAGE, ks=(1, 2, 5))
    # txt ranks [0, 1, 4]: R@1 = 1/3, R@2 = 2/3, R@5 = 3/3
    assert result["txt_r1"] == pytest.approx(1 / 3)
    assert result["txt_r2"] == pytest.approx(2 / 3)
    assert result["txt_r5"] == pytest.approx(1.0)
    # img ranks [2, 1, 2, 0, 2, 0]: R@1 = 2/6, R@2 = 3/6, R@5 = 6/6
    assert result["img_r1"] == pytest.approx(2 / 6)
    assert result["img_r2"] == pytest.approx(3 / 6)
    assert result["img_r5"] == pytest.approx(1.0)
    assert result["txt_r_mean"] == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert result["img_r_mean"] == pytest.approx((2 / 6 + 3 / 6 + 1) / 3)
    assert result["r_mean"] == pytest.approx((result["txt_r_mean"] + result["img_r_mean"]) / 2)


def test_default_keys_and_fraction_scale():
    result = recall_at_k(SIM, TEXT_TO_IMAGE)
    expected = {f"{side}_r{k}" for side in ("txt", "img") for k in (1, 5, 10)}
    assert set(result) == expected | {"txt_r_mean", "img_r_mean", "r_mean"}
    assert all(0.0 <= value <= 1.0 for value in result.values())
    assert result["txt_r10"] == 1.0  # K beyond the number of texts: everything is a hit


def test_any_caption_counts_for_text_retrieval():
    # Image 0's first caption is ranked last, its second first: still a hit at 1.
    sim = torch.tensor([[0.0, 1.0, 0.5, 0.4], [0.3, 0.2, 0.9, 0.8]])
    result = recall_at_k(sim, [0, 0, 1, 1], ks=(1,))
    assert result["txt_r1"] == 1.0
    # Text 0 alone ranks image 1 first -> 3 of 4 texts hit at 1.
    assert result["img_r1"] == pytest.approx(3 / 4)


def test_ties_are_broken_by_sorted_order():
    # Karpathy rule: rank = position of the first ground truth in the stable descending sort.
    sim = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    result = recall_at_k(sim, [0, 1], ks=(1, 2))
    # Image 0's caption (text 0) comes first among the tied texts, image 1's (text 1) second.
    assert result["txt_r1"] == 0.5 and result["img_r1"] == 0.5
    assert result["txt_r2"] == 1.0 and result["img_r2"] == 1.0


def test_rank_matches_stable_argsort_on_random_ties():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 3, (7, 11), generator=g).float()  # many ties
    owner = torch.randint(0, 7, (11,), generator=g)
    owner[:7] = torch.arange(7)  # every image owns a text
    result = recall_at_k(sim, owner.tolist(), ks=(1, 2, 3))
    ranks = []
    for i in range(7):
        order = torch.argsort(-sim[i], stable=True).tolist()
        ranks.append(min(order.index(t) for t in range(11) if owner[t] == i))
    for k in (1, 2, 3):
        assert result[f"txt_r{k}"] == pytest.approx(sum(r < k for r in ranks) / 7)
    img = [torch.argsort(-sim[:, t], stable=True).tolist().index(int(owner[t])) for t in range(11)]
    for k in (1, 2, 3):
        assert result[f"img_r{k}"] == pytest.approx(sum(r < k for r in img) / 11)


def test_perfect_model_on_repeated_captions():
    # 4 images; images 0-2 share the caption "a red square", image 3 has its own. A perfect model scores every
    # image equally high against the shared text (it is true of all of them) and low against the others.
    texts = ["a red square", "a red square", "a red  Square", "a blue circle"]
    owner = [0, 1, 2, 3]
    sim = torch.tensor(
        [
            [1.0, 1.0, 1.0, 0.0],
            [1.0, 1.0, 1.0, 0.0],
            [1.0, 1.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    result = recall_at_k(sim, owner, ks=(1, 3))
    # Image i's caption is the (i+1)-th of three tied texts: ranks 0, 1, 2, and image 3 rank 0.
    assert result["txt_r1"] == pytest.approx(2 / 4)
    assert result["txt_r3"] == 1.0
    assert result["img_r1"] == pytest.approx(2 / 4)
    assert result["img_r3"] == 1.0
    assert repeated_captions(texts, owner) == {"a red square": 3}
    assert repeated_captions(["a", "a", "b"], [0, 0, 1]) == {}  # repeats within one image are not ambiguous


def test_separate_t2i_matrix_is_used():
    sim_t2i = SIM.T.clone()
    sim_t2i[0] = torch.tensor([1.0, 0.0, 0.0])  # now text 0 ranks its image first
    result = recall_at_k(SIM, TEXT_TO_IMAGE, ks=(1,), sim_t2i=sim_t2i)
    assert result["img_r1"] == pytest.approx(3 / 6)
    assert result["txt_r1"] == pytest.approx(1 / 3)  # unchanged


@pytest.mark.parametrize(
    ("sim", "owner", "kwargs"),
    [
        (SIM, [0, 0, 1, 1, 2], {}),  # wrong length
        (SIM, [0, 0, 1, 1, 2, 3], {}),  # out of range
        (SIM, [0, 0, 0, 1, 1, 1], {}),  # image 2 has no caption
        (SIM, TEXT_TO_IMAGE, {"ks": (0,)}),
        (SIM, TEXT_TO_IMAGE, {"sim_t2i": SIM}),  # wrong shape
        (torch.tensor([[float("nan"), 0.0]]), [0, 0], {}),
        (torch.zeros(3), [0, 0, 0], {}),
    ],
)
def test_recall_rejects_bad_input(sim, owner, kwargs):
    with pytest.raises(InputError):
        recall_at_k(sim, owner, **kwargs)


class _ItmTable:
    """An ITM scorer backed by a lookup table; records every call."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, images, texts):
        assert isinstance(images, list) and isinstance(texts, list)
        assert all(isinstance(i, int) for i in images + texts)
        self.calls.append((images, texts))
        return self.table[torch.tensor(images), torch.tensor(texts)]


def test_rerank_changes_ranking_when_itm_disagrees():
    itc = torch.tensor(
        [
            [0.9, 0.8, 0.1],  # ITC prefers text 0 for image 0, text 1 second
            [0.2, 0.3, 0.7],
        ]
    )
    itm = torch.tensor(
        [
            [-5.0, 5.0, 0.0],  # ITM strongly prefers text 1 for image 0
            [0.0, 0.0, 1.0],
        ]
    )
    scorer = _ItmTable(itm)
    i2t, t2i = rerank_with_itm(itc, scorer, k=2, batch_size=3)

    # Image 0 shortlist: texts 0, 1 -> 0.9-5, 0.8+5; text 2 is outside the top 2 -> -inf.
    assert i2t[0].tolist() == pytest.approx([-4.1, 5.8, float("-inf")])
    assert i2t[1].tolist() == pytest.approx([float("-inf"), 0.3, 1.7])
    assert i2t[0].argmax().item() == 1 and itc[0].argmax().item() == 0
    # t2i: k=2 >= 2 images, so every image is shortlisted for every text.
    assert torch.isfinite(t2i).all()
    assert t2i == pytest.approx((itc + itm).T)

    # Each distinct pair is scored once (6 pairs), in calls of at most 3 pairs, sorted by image.
    pairs = [(i, t) for images, texts in scorer.calls for i, t in zip(images, texts)]
    assert len(pairs) == len(set(pairs)) == 6
    assert all(len(images) <= 3 for images, _ in scorer.calls)
    assert pairs == sorted(pairs)

    # Recall computed on the re-ranked scores reflects ITM: texts 1 and 2 are the right ones.
    before = recall_at_k(itc, [1, 0, 1], ks=(1,))
    after = recall_at_k(i2t, [1, 0, 1], ks=(1,), sim_t2i=t2i)
    assert before["txt_r1"] == pytest.approx(1 / 2)
    assert after["txt_r1"] == pytest.approx(1.0)


def test_rerank_clips_k_to_the_number_of_candidates():
    torch.manual_seed(0)
    itc = torch.randn(3, 4)
    itm = torch.randn(3, 4)
    i2t, t2i = rerank_with_itm(itc, _ItmTable(itm), k=128, batch_size=5)
    assert i2t.shape == (3, 4) and t2i.shape == (4, 3)
    assert torch.allclose(i2t, itc + itm)
    assert torch.allclose(t2i, (itc + itm).T)


def test_rerank_outside_shortlist_is_minus_inf_and_misses():
    itc = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # image 0 owns only text 2, which is not in its ITC top 2
            [0.5, 0.6, 0.0, 0.7],  # image 1 owns texts 0, 1, 3; shortlist = texts 3, 1
        ]
    )
    itm = torch.tensor([[0.0, 0.0, 100.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # ITM loves (0, 2), too late
    i2t, t2i = rerank_with_itm(itc, _ItmTable(itm), k=2)
    assert i2t[0].tolist() == pytest.approx([0.9, 0.8, float("-inf"), float("-inf")])
    assert i2t[1].tolist() == pytest.approx([float("-inf"), 0.6, float("-inf"), 0.7])
    assert torch.isfinite(t2i).all()  # only two images: every text shortlists both
    # Image 0's caption sits at -inf behind texts 0, 1, tied with text 3 but first of the tie: rank 2 (0-based).
    # It misses at K=2 (the shortlist size) and hits once K reaches past the shortlist.
    result = recall_at_k(i2t, [1, 1, 0, 1], ks=(1, 2, 3), sim_t2i=t2i)
    assert result["txt_r1"] == pytest.approx(1 / 2)  # image 1 hits (text 3 first), image 0 misses
    assert result["txt_r2"] == pytest.approx(1 / 2)
    assert result["txt_r3"] == 1.0


def test_rerank_rejects_bad_arguments():
    itc = torch.zeros(2, 2)
    with pytest.raises(InputError):
        rerank_with_itm(itc, lambda i, t: torch.zeros(len(i)), k=0)
    with pytest.raises(InputError):
        rerank_with_itm(itc, lambda i, t: torch.zeros(len(i)), batch_size=0)
    with pytest.raises(InputError):
        rerank_with_itm(itc, lambda i, t: torch.zeros(len(i), 2))  # two logits per pair, not one score


def test_zero_shot_accuracy():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 0
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # label 5: rank 5 -> miss at 5
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.0],  # label 2: rank 2 -> top-5 hit only
        ]
    )
    result = zero_shot_accuracy(sim, torch.tensor([0, 5, 2]))
    assert result["top1"] == pytest.approx(1 / 3)
    assert result["top5"] == pytest.approx(2 / 3)
    assert result["count"] == 3
    # Fewer classes than K: top-5 clips to every class.
    assert zero_shot_accuracy(sim[:, :3], [0, 1, 2])["top5"] == 1.0
    with pytest.raises(InputError):
        zero_shot_accuracy(sim, [0, 1])
    with pytest.raises(InputError):
        zero_shot_accuracy(sim, [0, 1, 6])
