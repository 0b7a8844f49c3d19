"""The bundled default data: scikit-learn's handwritten digits (shipped inside the pip package, so no
download), upsampled from 8x8 to a small image size. Used by the demo and the accuracy test."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Split(NamedTuple):
    x_train: torch.Tensor  # N,1,H,W float32 in [0, 1]
    y_train: torch.Tensor  # N int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """1,797 8x8 digit images from sklearn.datasets.load_digits, bilinear-upsampled to size x size."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return Split(x[tr], y[tr], x[te], y[te])
