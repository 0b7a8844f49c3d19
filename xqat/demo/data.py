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
    return _split(x, y, test_fraction, seed)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_folder(root: str, size: int, test_fraction: float = 0.1, seed: int = 0) -> tuple[Split, list[str]]:
    """ImageFolder-style data (root/<class>/<image>), read with Pillow, resized to size x size, RGB in [0, 1].

    Returns the split and the class names (sorted folder names). No torchvision needed.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ..errors import XQATError

    base = Path(root)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not classes:
        raise XQATError(f"{root}: expected one sub-folder of images per class (root/<class>/<image>)")
    xs, ys = [], []
    for label, c in enumerate(classes):
        for f in sorted((base / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
                xs.append(np.asarray(img, np.float32) / 255.0)
                ys.append(label)
    if not xs:
        raise XQATError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    return _split(x, torch.tensor(ys), test_fraction, seed), classes


def synthetic_images(n: int = 512, classes: int = 4, size: int = 32, seed: int = 0,
                     test_fraction: float = 0.2) -> Split:
    """Learnable stand-in images: each class is a colour/frequency pattern plus noise (no download)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    grid = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    base = torch.stack([torch.stack([torch.sin((c + 1) * 3.1416 * xx + k), torch.cos((c + 1) * 3.1416 * yy - k),
                                     (xx + yy) * (c % 2)]) for c in range(classes) for k in [0.0]])
    x = (0.5 + 0.35 * base[y] + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return _split(x, y, test_fraction, seed)


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> Split:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return Split(x[tr], y[tr], x[te], y[te])
