import torch
import torch.nn.functional as F

from bench.losses import masked_cross_entropy, rank_in_groups


def test_masked_cross_entropy_is_the_mean_over_valid_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    target = torch.randint(0, 4, (2, 5, 5), generator=g)
    target[0, :2] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(masked_cross_entropy(logits, target, 255), expected)


def test_masked_cross_entropy_of_an_all_ignore_crop_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((1, 4, 4), 255), 255)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_rank_in_groups():
    assert rank_in_groups(torch.tensor([0, 0, 0, 2, 2, 3]), 4).tolist() == [0, 1, 2, 0, 1, 0]
