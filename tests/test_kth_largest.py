"""novelty.kth_largest, the sort-free k-th largest the tflite export's novelty uses: the same
value as topk's k-th, with ties and with the rows same_class_only masks."""
import pytest
import torch

from imgclf.heads import novelty


def topk_kth(values, k):
    return values.topk(k, dim=1).values[:, -1]


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_kth_largest_is_topks_kth_value(k):
    values = torch.rand(7, 40, generator=torch.Generator().manual_seed(k)) * 2 - 1
    assert torch.equal(novelty.kth_largest(values, k), topk_kth(values, k))


def test_ties_count_once_each():
    values = torch.tensor([[0.5, 0.9, 0.9, 0.9, 0.1, 0.5],
                           [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
                           [0.3, 0.7, 0.7, 0.1, 0.7, 0.0]])
    for k in range(1, 7):
        assert torch.equal(novelty.kth_largest(values, k), topk_kth(values, k)), k
    assert novelty.kth_largest(values, 4).tolist() == pytest.approx([0.5, 0.2, 0.3])


def test_rows_masked_by_same_class_only():
    """Only a query's class counts; where fewer of its class than k are left, -2 (the mask)
    is the k-th, as with topk."""
    sims = torch.rand(6, 30, generator=torch.Generator().manual_seed(1)) * 2 - 1
    bank_classes = torch.arange(30) % 3
    bank_classes[bank_classes == 2] = 1   # class 2: no photo in the bank
    bank_classes[0] = 2                    # ... but one
    masked = novelty.same_class_only(sims, torch.tensor([0, 1, 2, 0, 1, 2]), bank_classes)
    for k in (1, 3, 10):
        assert torch.equal(novelty.kth_largest(masked, k), topk_kth(masked, k)), k
    assert novelty.kth_largest(masked, 3)[2] == -2.0  # one photo of class 2: the 3rd is masked


def test_the_scorer_gives_the_same_novelty_sort_free():
    gen = torch.Generator().manual_seed(0)
    dim, bank = 16, 50
    entry = {"mean": torch.zeros(dim), "scale": torch.ones(dim),
             "projection": torch.eye(dim)[:, :8], "bank": torch.randn(bank, 8, generator=gen),
             "bank_labels": torch.arange(bank) % 3, "k": 4,
             "z": torch.tensor([0.0, 1.0, -0.5, 0.1]), "threshold": 2.0}
    scorer = novelty.NoveltyScorer(entry)
    features, logits = torch.randn(9, dim, generator=gen), torch.randn(9, 3, generator=gen)
    expected = scorer(features, logits)
    scorer.sort_free = True
    assert torch.equal(scorer(features, logits), expected)
