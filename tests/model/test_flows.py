"""Inverse-autoregressive flow cells: masks, causality of the shift, volume preservation."""
import pytest
import torch
from torch.autograd.functional import jacobian

from nvae.model.flows import AutoregressiveCell, MaskedConv2d, PairedFlowCell, autoregressive_mask, channel_mask


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("c_in,c_out", [(4, 24), (20, 120), (24, 4), (120, 20), (5, 5)])
@pytest.mark.parametrize("zero_diag", [True, False])
def test_channel_mask_orders_channel_blocks(c_in, c_out, zero_diag):
    mask = channel_mask(c_in, c_out, 1, zero_diag)
    assert mask.shape == (c_out, c_in)
    for o in range(c_out):
        for i in range(c_in):
            # The block an entry belongs to, counted in units of the narrower side.
            if c_out >= c_in:
                out_block, in_block = o // (c_out // c_in), i
            else:
                out_block, in_block = o, i // (c_in // c_out)
            visible = in_block < out_block or (not zero_diag and in_block == out_block)
            assert mask[o, i] == float(visible), (o, i)


@pytest.mark.parametrize("zero_diag", [True, False])
def test_channel_mask_depthwise(zero_diag):
    mask = channel_mask(12, 12, 12, zero_diag)
    assert mask.shape == (12, 1)
    assert (mask == (0.0 if zero_diag else 1.0)).all()


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("mirror", [False, True])
def test_autoregressive_mask_sees_only_earlier_pixels(kernel_size, mirror):
    c_in, c_out = 3, 6
    mask = autoregressive_mask(c_in, c_out, kernel_size, 1, zero_diag=True, mirror=mirror)
    assert mask.shape == (c_out, c_in, kernel_size, kernel_size)
    centre = kernel_size // 2
    centre_channels = channel_mask(c_in, c_out, 1, True)
    for dy in range(-centre, centre + 1):
        for dx in range(-centre, centre + 1):
            tap = mask[:, :, centre + dy, centre + dx]
            if (dy, dx) == (0, 0):
                assert torch.equal(tap, centre_channels)
                continue
            # raster order: rows above, or the same row to the left; mirrored: below / right
            before = (dy < 0 or (dy == 0 and dx < 0))
            if mirror:
                before = (dy > 0 or (dy == 0 and dx > 0))
            assert (tap == float(before)).all(), (dy, dx)


# ---------------------------------------------------------------- causality
def _randomise(module, seed=0):
    """Large random weights, so every unmasked connection visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in module.modules():
            if isinstance(conv, MaskedConv2d):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=conv.weight.dtype))
                conv.log_weight_norm.copy_(0.5 * torch.randn(conv.log_weight_norm.shape, generator=g,
                                                             dtype=conv.weight.dtype))
                if conv.bias is not None:
                    conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=conv.weight.dtype))
    return module


def _order(c, h, w, mirror):
    """Position of every (channel, row, col) entry, flattened as the tensor is, in the flow's order."""
    ch, row, col = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    if mirror:
        row, col = h - 1 - row, w - 1 - col
    return ((row * w + col) * c + ch).flatten()


@pytest.mark.parametrize("num_z", [4, 20])
@pytest.mark.parametrize("mirror", [False, True])
def test_autoregressive_shift_is_strictly_causal(num_z, mirror):
    h = w = 5
    cell = _randomise(AutoregressiveCell(num_z, mirror=mirror).double())
    z = torch.randn(1, num_z, h, w, dtype=torch.float64)
    jac = jacobian(lambda t: t - cell(t), z).reshape(num_z * h * w, num_z * h * w)   # d mu / d z
    order = _order(num_z, h, w, mirror)
    later_or_self = order.view(1, -1) >= order.view(-1, 1)        # [out, in]: in is not strictly before out
    assert jac[later_or_self].abs().max() == 0

    # ... and the shift really depends on the past: neighbours and lower channels.
    def idx(c, i, j):
        return (c * h + i) * w + j
    prev_pixel, prev_row = ((2, 3), (3, 2)) if mirror else ((2, 1), (1, 2))
    for c in range(num_z):
        for (i, j) in (prev_pixel, prev_row):
            assert jac[idx(c, 2, 2), [idx(k, i, j) for k in range(num_z)]].abs().max() > 1e-6
        if c > 0:
            assert jac[idx(c, 2, 2), idx(c - 1, 2, 2)].abs() > 1e-8
    assert (jac[~later_or_self] != 0).float().mean() > 0.1


def test_masked_conv_initial_scale():
    conv = MaskedConv2d(24, 4, 1, zero_diag=False, init_scale=0.1)
    v = conv.weight * conv.mask
    norms = conv.normalized_weight().flatten(1).norm(dim=1)
    assert torch.allclose(norms, 0.1 * (v.flatten(1).norm(dim=1) + 0.01), rtol=1e-3)
    # masked-out taps stay exactly zero in the effective weight
    assert (conv.normalized_weight()[conv.mask == 0] == 0).all()


def test_paired_flow_is_volume_preserving():
    num_z, h, w = 4, 4, 4
    cell = _randomise(PairedFlowCell(num_z).double(), seed=1)
    z = torch.randn(1, num_z, h, w, dtype=torch.float64)
    out, log_det = cell(z)
    assert out.shape == z.shape and log_det.shape == z.shape
    n = num_z * h * w
    jac = jacobian(lambda t: cell(t)[0], z).reshape(n, n)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign == 1
    assert torch.allclose(logabsdet, log_det.sum(), atol=1e-9)
    # a real transformation, not the identity, and (thanks to the mirrored half) not triangular
    assert (jac - torch.eye(n, dtype=jac.dtype)).abs().max() > 0.1
    order = _order(num_z, h, w, mirror=False)
    later = order.view(1, -1) > order.view(-1, 1)
    assert jac[later].abs().max() > 1e-6
