"""Images tiled into one picture: the stage-1 reconstruction grid, the stage-2 sample grid, ``launch/sample.py``'s
grid PNG and the benchmark figures all go through :func:`image_grid`.

    picture = image_grid(x, 8)                 # x: (N, 3, H, W) in [-1, 1] -> uint8 (H', W', 3), 8 per row
    picture = image_grid(images, [[0, 1], [4, 5]])  # images: uint8 (N, H, W, 3), the indices of each row
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vitvq.evaluation.metrics import to_uint8


def image_grid(images: torch.Tensor | np.ndarray, rows: int | Sequence[Sequence[int]], *, pad: int = 2,
               pad_value: int = 0, min_width: int = 0) -> np.ndarray:
    """Images tiled into one uint8 (H', W', 3) picture, ``pad`` pixels of ``pad_value`` between and around them.

    ``images``: float (N, 3, H, W) in [-1, 1], converted as evaluation saves images (``to_uint8``), or uint8
    (N, H, W, 3). ``rows``: images per row (consecutive, the last row possibly short; torchvision's ``make_grid``
    layout), or the image indices of each row. A picture narrower than ``min_width`` is enlarged by the integer
    factor ``min_width // width + 1`` without smoothing, so that tiny debug images stay readable."""
    if isinstance(images, torch.Tensor):
        if images.is_floating_point():
            images = to_uint8(images).permute(0, 2, 3, 1)  # (N, H, W, 3)
        images = images.cpu().numpy()
    n, h, w = images.shape[:3]
    if isinstance(rows, int):
        rows = [range(start, min(start + rows, n)) for start in range(0, n, rows)]
    cols = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, np.uint8)
    for r, row in enumerate(rows):
        for c, i in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = images[i]
    if canvas.shape[1] < min_width:
        big = F.interpolate(torch.from_numpy(canvas).permute(2, 0, 1)[None], mode="nearest",
                            scale_factor=min_width // canvas.shape[1] + 1)  # (1, 3, H', W') uint8
        canvas = big[0].permute(1, 2, 0).numpy()
    return np.ascontiguousarray(canvas)


__all__ = ["image_grid"]
