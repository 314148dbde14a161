"""The lean BN -> Swish -> conv chain computes exactly what the plain modules compute, and stores less."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nvae.speedups.recompute_bn as fused
from nvae import NVAE, NVAEConfig, speedups
from nvae.model.cells import InvertedResidual, ResConv
from nvae.speedups.recompute_bn import bn_act_conv
from nvae.model.layers import WNConv2d, batch_norm
from nvae.speedups.memory import LeanResConv, frozen_batch_statistics, set_recompute_bn
from nvae.training.objective import kl_balance_alpha, nvae_loss


def _saved_bytes(fn):
    """Bytes autograd keeps for the backward pass while ``fn`` runs (parameters excluded)."""
    total = [0]

    def pack(t):
        if not isinstance(t, nn.Parameter):
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("swish", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv_kind", ["wn3x3", "depthwise5", "strided1x1", "pointwise", "dilated3x3", "grouped3x3",
                                       "valid3x3", "depthwise5_small_map"])
def test_chain_matches_the_plain_modules(swish, channels_last, conv_kind):
    torch.manual_seed(0)
    c = 8
    bn = batch_norm(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    if conv_kind == "wn3x3":
        conv = WNConv2d(c, 12, 3, padding=1)
    elif conv_kind.startswith("depthwise5"):   # on a 4x4 map its weight gradient is summed by offset
        conv = nn.Conv2d(c, c, 5, padding=2, groups=c, bias=False)
    elif conv_kind == "strided1x1":
        conv = nn.Conv2d(c, 6, 1, stride=2, bias=False)
    elif conv_kind == "pointwise":
        conv = nn.Conv2d(c, 6, 1, bias=False)
    elif conv_kind == "dilated3x3":     # res_bnswish5: the input gradient is a dilated convolution too
        conv = WNConv2d(c, 12, 3, padding=2, dilation=2)
    elif conv_kind == "grouped3x3":     # kernels transposed within each group for the input gradient
        conv = nn.Conv2d(c, 12, 3, padding=1, groups=2)
    else:                               # no padding: the input gradient convolution pads by k - 1
        conv = nn.Conv2d(c, 12, 3, padding=0)
    bn_ref, conv_ref = copy.deepcopy(bn), copy.deepcopy(conv)
    size = 4 if conv_kind.endswith("small_map") else 10
    x = torch.randn(4, c, size, size) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()

    def weight(m):
        return m.normalized_weight() if isinstance(m, WNConv2d) else m.weight

    out = bn_act_conv(x, bn, conv, weight(conv), conv.bias, swish)
    s = bn_ref(x_ref)
    s = F.silu(s) if swish else s
    ref = conv_ref._conv_forward(s, weight(conv_ref), conv_ref.bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (name, p), p_ref in zip(list(bn.named_parameters()) + list(conv.named_parameters()),
                                list(bn_ref.parameters()) + list(conv_ref.parameters())):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)
    for name, b in bn.named_buffers():
        torch.testing.assert_close(b, dict(bn_ref.named_buffers())[name], rtol=0, atol=0, msg=name)
    assert bn.num_batches_tracked.item() == 1


def test_frozen_statistics_leave_running_statistics_alone():
    bn, conv = batch_norm(4), nn.Conv2d(4, 4, 1)
    before = {k: v.clone() for k, v in bn.named_buffers()}
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    with frozen_batch_statistics(bn):
        out = bn_act_conv(x, bn, conv, conv.weight, conv.bias, True)
    out.sum().backward()
    assert torch.allclose(out, conv(F.silu(F.batch_norm(x, None, None, bn.weight, bn.bias, True))), atol=1e-6)
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("make, bound", [
    # separable: of the six hidden (6C) tensors autograd keeps, two remain
    (lambda: InvertedResidual(16, 16, 1, expansion=6, kernel_size=5), 0.45),
    # regular: BN input, BN output and Swish output become the BN input alone
    (lambda: ResConv(16, 16, 1, norm=True, activation=F.silu), 0.5),
], ids=["separable", "regular"])
def test_cells_keep_far_less_for_backward(make, bound):
    torch.manual_seed(0)
    cell = make()
    cell_ref = copy.deepcopy(cell)
    speedups.apply(cell, recompute_bn=True)
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    out, lean = _saved_bytes(lambda: cell(x))
    ref, full = _saved_bytes(lambda: cell_ref(x))
    assert lean < bound * full, (lean, full)
    torch.testing.assert_close(out, ref)


def _step_grads(model, x, alpha):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = nvae_loss(model, x, beta=0.7, lam=1e-2, alpha=alpha)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_is_unchanged(channels_last, checkpointing):
    """Loss, every gradient and every buffer after a step equal the op-by-op model's."""
    cfg = dataclasses.replace(NVAEConfig.preset("mnist_small"), num_channels_enc=8, num_channels_dec=8)
    torch.manual_seed(0)
    model = NVAE(cfg).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ref = speedups.apply(copy.deepcopy(model))
    speedups.apply(model, recompute_bn=True, checkpointing=checkpointing)
    assert sum(isinstance(m, LeanResConv) or getattr(m, "recompute_bn", False) for m in model.modules()) > 10
    x = (torch.rand(4, 1, 32, 32) > 0.5).float()
    alpha = kl_balance_alpha(cfg.groups_per_scale)
    loss, grads = _step_grads(model, x, alpha)
    loss_ref, grads_ref = _step_grads(ref, x, alpha)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7, msg=n)


def test_switch_off_runs_the_plain_modules(monkeypatch):
    calls = []
    real = fused._BNActConv.apply
    monkeypatch.setattr(fused._BNActConv, "apply", lambda *a: calls.append(1) or real(*a))
    op = ResConv(4, 4, 1, norm=True, activation=F.silu)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    op(x)
    assert not calls
    set_recompute_bn(op)
    assert type(op) is LeanResConv
    op(x)
    assert calls
    set_recompute_bn(op, False)
    assert type(op) is ResConv
    op(x)
    assert len(calls) == 1


def test_plain_path_in_eval_and_without_autograd():
    bn = batch_norm(4)
    x = torch.randn(2, 4, 6, 6)
    assert not fused._fusable(x, bn.eval())
    bn.train()
    with torch.no_grad():
        assert not fused._fusable(x, bn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused._fusable(x, bn)        # mixed precision keeps the saving (see the autocast tests)
    assert fused._fusable(x, bn)


def test_synchronised_bn_is_never_fused():
    """Its statistics come from every process: the op-by-op path all-reduces them."""
    from nvae.distributed import SyncBatchNorm2d
    bn = SyncBatchNorm2d(4).train()
    assert not fused._fusable(torch.randn(2, 4, 3, 3), bn)


# ------------------------------------------------------------------ mixed precision
def _bf16_close(a, b, what):
    # bf16 keeps 8 bits of mantissa: compare as bf16 numbers would, relative to the tensor's scale
    scale = b.abs().max().item() + 1e-12
    assert (a.float() - b.float()).abs().max().item() <= 3e-2 * scale, what


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv_kind", ["wn3x3", "depthwise5", "pointwise"])
def test_chain_under_bf16_autocast_matches_the_plain_modules(channels_last, conv_kind):
    torch.manual_seed(0)
    c = 8
    bn = batch_norm(c)
    conv = {"wn3x3": lambda: WNConv2d(c, 12, 3, padding=1),
            "depthwise5": lambda: nn.Conv2d(c, c, 5, padding=2, groups=c, bias=False),
            "pointwise": lambda: nn.Conv2d(c, 6, 1, bias=False)}[conv_kind]()
    bn_ref, conv_ref = copy.deepcopy(bn), copy.deepcopy(conv)
    x = (torch.randn(4, c, 10, 10) * 3 + 1).to(torch.bfloat16)   # what a preceding bf16 conv hands over
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for lean, b, cv in ((True, bn, conv), (False, bn_ref, conv_ref)):
        xi = x.detach().clone().requires_grad_()
        weight = cv.normalized_weight() if isinstance(cv, WNConv2d) else cv.weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if lean:
                out = bn_act_conv(xi, b, cv, weight, cv.bias, True)
            else:
                out = cv._conv_forward(F.silu(b(xi)), weight, cv.bias)
        assert out.dtype == torch.bfloat16
        torch.manual_seed(1)
        out.backward(torch.randn(out.shape).to(out.dtype))
        grads.append([out.detach(), xi.grad] + [p.grad for p in list(b.parameters()) + list(cv.parameters())])
    for i, (a, r) in enumerate(zip(*grads)):
        assert a.dtype == r.dtype, i                 # every gradient in its parameter's dtype
        _bf16_close(a, r, i)
    for name, buf in bn.named_buffers():             # the same running statistics
        torch.testing.assert_close(buf, dict(bn_ref.named_buffers())[name], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_savers_keep_working_under_bf16_autocast(checkpointing):
    """Recompute-BN stays on under autocast (it stores less there too) and, with role checkpointing,
    gives the plain bf16 step's loss and gradients to bf16 precision."""
    cfg = dataclasses.replace(NVAEConfig.preset("mnist_small"), num_channels_enc=8, num_channels_dec=8)
    torch.manual_seed(0)
    model = NVAE(cfg).train().to(memory_format=torch.channels_last)
    ref = speedups.apply(copy.deepcopy(model))
    speedups.apply(model, recompute_bn=True, checkpointing=("normal_post", "up_post") if checkpointing else False)
    x = (torch.rand(4, 1, 32, 32) > 0.5).float().contiguous(memory_format=torch.channels_last)
    alpha = kl_balance_alpha(cfg.groups_per_scale)
    results, saved = [], []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, nbytes = _saved_bytes(lambda: nvae_loss(m, x, beta=0.7, lam=1e-2, alpha=alpha))
        out.loss.backward()
        saved.append(nbytes)
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    (loss, g), (loss_ref, g_ref) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) > 0.999
    assert saved[0] < 0.8 * saved[1], saved
