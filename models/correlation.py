"""Local correlation: how well each feature vector of one map matches those around it in another."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def correlation_offsets(radius: int) -> list[tuple[int, int]]:
    """The integer offsets ``(dx, dy)`` of ``local_correlation``'s channels, in channel order (dy outer, dx inner)."""
    span = range(-radius, radius + 1)
    return [(dx, dy) for dy in span for dx in span]


def local_correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """Cosine similarity of ``a(p)`` with ``b(p + d)`` for every integer offset ``d`` in ``[-radius, radius]^2``.

    a, b: float ``[N, C, H, W]``. Feature vectors are L2-normalised over channels
    (an all-zero vector stays zero, so it correlates 0 with everything); ``b``
    reads 0 outside the image. Returns ``[N, (2r+1)^2, H, W]``, unitless in
    ``[-1, 1]``; channel ``(dy + r) * (2r + 1) + (dx + r)`` holds offset
    ``d = (dx, dy)`` (x = column, y = row), as listed by ``correlation_offsets``.
    """
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    h, w = a.shape[-2:]
    r = radius
    padded = F.pad(b, (r, r, r, r))
    return torch.stack([(a * padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]).sum(1)
                        for dx, dy in correlation_offsets(r)], 1)
