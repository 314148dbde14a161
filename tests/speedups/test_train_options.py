"""Precision, memory format, gradient checkpointing and torch.compile leave the training step's
loss and gradients unchanged (within each option's tolerance)."""
import copy
import json

import pytest
import torch

from nvae import NVAE, NVAEConfig, speedups
from nvae.speedups.memory import checkpointed_roles
from nvae.training.objective import kl_balance_alpha, nvae_loss


def tiny(**kw):
    cfg = dict(num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2)
    cfg.update(kw)
    return NVAEConfig.preset("mnist_small", **cfg)


def step(model, x, autocast_dtype=None, seed=5):
    """One loss + backward; returns (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    alpha = kl_balance_alpha(model.config.groups_per_scale)
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        out = nvae_loss(model, x, beta=0.3, lam=1e-2, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def pair():
    torch.manual_seed(0)
    model = speedups.apply(NVAE(tiny()).train())
    x = (torch.rand(4, 1, 32, 32) > 0.5).float()
    return model, copy.deepcopy(model), x


def test_checkpointing_is_exact(pair):
    a, b, x = pair
    speedups.apply(b, checkpointing=True)
    la, ga = step(a, x)
    lb, gb = step(b, x)
    assert torch.equal(la, lb)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    # BN running statistics are updated once, not again by the recomputation
    for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(ba, bb), na


def test_checkpointing_only_some_roles(pair):
    _, b, _ = pair
    speedups.apply(b, checkpointing=("normal_dec",))
    flags = checkpointed_roles(b)
    assert flags["normal_dec"] and not flags["normal_enc"] and not flags["up_post"]
    with pytest.raises(ValueError, match=r"unknown cell role\(s\) \['normal_dex'\]"):
        speedups.apply(b, checkpointing=("normal_dex",))     # a typo would otherwise checkpoint nothing


def test_channels_last_gives_the_same_step(pair):
    a, b, x = pair
    b = b.to(memory_format=torch.channels_last)
    la, ga = step(a, x)
    lb, gb = step(b, x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(la, lb, rtol=1e-5)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-3, atol=1e-5), n


def test_bf16_autocast_step_is_close(pair):
    a, b, x = pair
    la, ga = step(a, x)
    lb, gb = step(b, x, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(lb)
    assert torch.allclose(la, lb.float(), rtol=2e-2)       # bf16 keeps ~3 significant digits
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in ga.values()]),
                                                torch.cat([g.flatten() for g in gb.values()]), dim=0)
    assert cos > 0.95


@pytest.mark.slow
def test_compiled_forward_gives_the_same_step(pair):
    a, b, x = pair
    compiled = torch.compile(b)
    compiled.spectral_loss, compiled.batchnorm_loss = b.spectral_loss, b.batchnorm_loss
    compiled.config = b.config
    la, _ = step(a, x)
    lb, _ = step(compiled, x)
    assert torch.allclose(la, lb, rtol=1e-4)


def test_checkpointing_roles_config():
    """Roles arrive as a tuple from a list (JSON), a comma string (overrides) or a tuple, and are checked."""
    from nvae.config import TrainConfig
    cfg = TrainConfig(checkpointing=True, checkpointing_roles=["normal_post", "up_post"])
    assert cfg.checkpointing_roles == ("normal_post", "up_post")
    assert TrainConfig(checkpointing=True, checkpointing_roles="normal_post, up_post") == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown cell role"):
        TrainConfig(checkpointing=True, checkpointing_roles=("post",))
    with pytest.raises(ValueError, match="needs checkpointing=True"):
        TrainConfig(checkpointing_roles=("normal_post",))
