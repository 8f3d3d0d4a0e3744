"""Pieces of tissue: components, masked matches and the field that moves each piece by its own shift, on small
hand-built sections."""
import torch
import torch.nn.functional as F

import pieces


def texture(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth random texture ``[size, size]``, zero mean, unit std."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(1, 1, size + 4, size + 4, generator=g), 5, 1)[0, 0]
    return (x - x.mean()) / x.std()


def test_label_pieces_joins_4_connected_tissue_and_parts_what_a_cut_parts():
    tissue = torch.zeros(6, 7, dtype=torch.bool)
    tissue[:, :3] = True  # a left block
    tissue[:, 4:] = True  # a right block, cut off by column 3
    labels = pieces.label_pieces(tissue)
    assert (labels[~tissue] == 0).all()
    assert len(labels[:, :3].unique()) == 1 and len(labels[:, 4:].unique()) == 1 and labels[0, 0] != labels[0, 4]
    tissue[2, 3] = True  # a bridge one pixel wide joins them
    assert len(pieces.label_pieces(tissue)[tissue].unique()) == 1
    diagonal = torch.eye(5, dtype=torch.bool)  # touching at corners only: five pieces (4-connected)
    assert len(pieces.label_pieces(diagonal)[diagonal].unique()) == 5
    band = ~torch.eye(5, dtype=torch.bool)  # a diagonal band one pixel wide parts the tissue on its two sides
    assert len(pieces.label_pieces(band)[band].unique()) == 2


def test_masked_shift_finds_the_pulling_shift_of_the_masked_part_only():
    source = texture(64)
    target = torch.zeros(64, 64)
    target[:, :32] = torch.roll(source, (-2, -5), (0, 1))[:, :32]
    target[:, 32:] = torch.roll(source, (1, 4), (0, 1))[:, 32:]  # another shift on the right half
    left, right = torch.zeros(64, 64, dtype=torch.bool), torch.zeros(64, 64, dtype=torch.bool)
    left[8:56, 8:28], right[8:56, 36:56] = True, True
    whole = torch.ones(64, 64, dtype=torch.bool)
    # target(p) = source(p + s): the left half pulls by (5, 2), the right by (-4, -1) (x then y)
    assert pieces.masked_shift(source, whole, target, left, 8) == (5, 2)
    assert pieces.masked_shift(source, whole, target, right, 8) == (-4, -1)
    assert pieces.masked_shift(source, whole, target, left, 3) != (5, 2)  # beyond the reach: not found
    assert pieces.masked_shift(source, torch.zeros_like(whole), target, left, 8) == (0, 0)  # nothing overlaps


def cut_pair(jump: int, cut_source: bool = True):
    """A 64 px texture cut by a vertical band (columns 30-33) in the source (or the target), the right piece lying
    ``jump`` px further right in the target than the left piece; the masks of tissue off the band."""
    source = texture(64, seed=1)
    band = torch.zeros(64, 64, dtype=torch.bool)
    band[:, 30:34] = True
    target = torch.where(torch.arange(64)[None] < 32 + jump // 2, source, torch.roll(source, jump, 1))
    whole = torch.ones(64, 64, dtype=torch.bool)
    return (source, target, ~band, whole) if cut_source else (source, target, whole, ~band)


def test_piece_field_moves_each_piece_of_a_cut_source_by_its_own_shift():
    source, target, source_tissue, target_tissue = cut_pair(jump=10)
    field = pieces.piece_field(source, target, source_tissue, target_tissue, reach=16, gate=4)
    assert field.shape == (2, 64, 64)
    # target pixels that see the left piece pull by 0, those that see the right one by -10 px in x (the right piece
    # lies 10 px further right in the target); y stays 0
    assert (field[:, :, :28] == 0).all() and (field[0, :, 46:] == -10).all() and (field[1] == 0).all()
    ramp = field[0, 32, 28:46]  # between them, interpolated: from 0 to -10 without a step back
    assert (ramp.diff() <= 1e-4).all() and ramp[0] > -10 and ramp[-1] < 0


def test_piece_field_cuts_the_target_where_the_source_is_whole_and_gives_none_within_the_gate():
    source, target, source_tissue, target_tissue = cut_pair(jump=10, cut_source=False)
    field = pieces.piece_field(source, target, source_tissue, target_tissue, reach=16, gate=4)
    assert (field[:, :, :30] == 0).all() and (field[0, :, 34:] == -10).all()  # each target piece's own shift
    assert pieces.piece_field(source, target, source_tissue, target_tissue, reach=16, gate=10) is None
    whole = torch.ones(64, 64, dtype=torch.bool)
    assert pieces.piece_field(source, target, whole, whole, reach=16, gate=4) is None  # no cut: one shift serves
