"""Loss pieces shared by method files."""
import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels that are not ``ignore_index``.

    Sum / number of valid pixels rather than ``reduction="mean"``: a crop holding only ignore
    pixels gives 0 (with a graph), not NaN.
    """
    n_valid = (target != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / n_valid


def rank_in_groups(groups_sorted: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Position of each element within its group, for a tensor of group ids sorted ascending."""
    sizes = torch.bincount(groups_sorted, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    return torch.arange(len(groups_sorted), device=groups_sorted.device) - starts[groups_sorted]
