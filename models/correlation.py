"""Local correlation: how well each feature vector of one map matches those around it in another."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def correlation_offsets(radius: int) -> list[tuple[int, int]]:
    """The integer offsets ``(dx, dy)`` of ``local_correlation``'s channels, in channel order (dy outer, dx inner)."""
    span = range(-radius, radius + 1)
    return [(dx, dy) for dy in span for dx in span]


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` with every feature vector (over C) divided by its length; a zero vector stays zero.

    ``F.normalize(x, dim=1)``'s rule (length clamped at 1e-12), written out: its
    norm over the channel axis is ~40x slower on the CPU for this layout. The
    clamp comes before the square root, so the gradient at a zero vector is
    ``F.normalize``'s (finite), not 0 x inf.
    """
    return x / x.square().sum(1, keepdim=True).clamp_min(1e-24).sqrt()


def local_correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """Cosine similarity of ``a(p)`` with ``b(p + d)`` for every integer offset ``d`` in ``[-radius, radius]^2``.

    a, b: float ``[N, C, H, W]``. Feature vectors are L2-normalised over channels
    (an all-zero vector stays zero, so it correlates 0 with everything); ``b``
    reads 0 outside the image. Returns ``[N, (2r+1)^2, H, W]``, unitless in
    ``[-1, 1]``; channel ``(dy + r) * (2r + 1) + (dx + r)`` holds offset
    ``d = (dx, dy)`` (x = column, y = row), as listed by ``correlation_offsets``.
    """
    return _Correlation.apply(unit_vectors(a), F.pad(unit_vectors(b), (radius,) * 4), radius)


class _Correlation(torch.autograd.Function):
    """``out[:, k] = sum_c a * padded[window k]`` for the windows of ``correlation_offsets``, with a backward that
    accumulates in place.

    Autograd's own backward of the same sum allocates a zero-filled padded-size
    gradient for every offset (49 at radius 3) and adds them up; this one adds each
    offset's share into one buffer. With ``unit_vectors`` in place of ``F.normalize``,
    ``local_correlation``'s forward and backward on a training batch (8 x 12 x 256²,
    radius 3) take 0.27 s instead of 0.66.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, padded: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.save_for_backward(a, padded)
        ctx.radius = radius
        return torch.stack([(a * window).sum(1) for window in _windows(padded, a.shape[-2:], radius)], 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, padded = ctx.saved_tensors
        size, shares = a.shape[-2:], grad.unsqueeze(2)  # [N, K, 1, h, w]: offset k's share of each gradient
        grad_a = grad_padded = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.zeros_like(a)
            for share, window in zip(shares.unbind(1), _windows(padded, size, ctx.radius)):
                grad_a.addcmul_(share, window)
        if ctx.needs_input_grad[1]:
            grad_padded = torch.zeros_like(padded)
            for share, grad_window in zip(shares.unbind(1), _windows(grad_padded, size, ctx.radius)):
                grad_window.addcmul_(share, a)
        return grad_a, grad_padded, None


def _windows(padded: torch.Tensor, size, radius: int) -> list[torch.Tensor]:
    """Views ``[N, C, h, w]`` of ``padded`` (``[N, C, h + 2r, w + 2r]``) at each offset of ``correlation_offsets``."""
    h, w = size
    return [padded[:, :, radius + dy:radius + dy + h, radius + dx:radius + dx + w]
            for dx, dy in correlation_offsets(radius)]
