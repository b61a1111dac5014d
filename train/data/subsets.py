"""Class-balanced subsets drawn with a seed (``--subset``)."""
from __future__ import annotations

import torch

from models.errors import DataError


class SubsetSizeError(DataError):
    """A subset size out of range: fewer images than classes, or more than the training set (``n``, ``least``,
    ``most`` and the data's ``label`` are kept, so that a caller that chose ``n`` itself can say so)."""

    def __init__(self, n: int, least: int, most: int, label: str) -> None:
        super().__init__(f"--subset {n} is outside [{least}, {most}] for {label}; "
                         "pass at least one image per class and at most the training set")
        self.n, self.least, self.most, self.label = n, least, most, label


def _subset_indices(
    train: torch.Tensor, test: torch.Tensor, n: int, seed: int, num_classes: int, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced indices of ``n`` of the ``train`` labels and of the same share of ``test`` (at least one per class)."""
    if not num_classes <= n <= len(train):
        raise SubsetSizeError(n, num_classes, len(train), label)
    n_test = min(max(round(n * len(test) / len(train)), num_classes), len(test))
    return balanced_subset(train, n, seed), balanced_subset(test, n_test, seed)


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Picks ``n`` samples with the classes as equally represented as possible.

    Every class gets ``n // C`` samples and the remainder goes to classes in a seeded random order; a class
    with too few samples gives all it has and the rest is spread over the others. Within a class the
    samples are drawn at random, so the result does not follow the file order.

    Args:
        labels: int64 labels of shape ``[N]``.
        n: Number of samples to pick, ``1 <= n <= N``.
        seed: Seed; the same ``(labels, n, seed)`` always gives the same subset.

    Returns:
        Sorted int64 indices into ``labels``.
    """
    labels = labels.cpu()
    if not 1 <= n <= len(labels):
        raise DataError(f"cannot pick {n} of {len(labels)} samples; pass a subset size between 1 and {len(labels)}")
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    take = [0] * len(classes)
    order = torch.randperm(len(classes), generator=g).tolist()
    left = n
    while left:
        open_ = [c for c in order if take[c] < len(members[c])]
        share, extra = divmod(left, len(open_))
        for i, c in enumerate(open_):
            k = min(share + (i < extra), len(members[c]) - take[c])
            take[c] += k
            left -= k
    picked = [m[torch.randperm(len(m), generator=g)[:k]] for m, k in zip(members, take)]
    return torch.cat(picked).sort().values
