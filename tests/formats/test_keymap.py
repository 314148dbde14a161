"""Our state-dict names in the official layout and in format 1, and loading by name, checked both ways."""
import argparse
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE, needs_shared
from nvae import NVAE, NVAEConfig, speedups
from nvae.formats.checkpoint import CheckpointError, read_checkpoint, upgrade
from nvae.config import ARCH_INSTANCES
from nvae.formats.keymap import key_map, layout, modules_in_official_order
from nvae.formats.official import convert_state_dict

FORMAT1 = Path(__file__).parent / "fixtures" / "format1_digits_tiny.pt"
#: float32 outputs stored on one machine against those computed on this one (any x86 ISA).
STORED_RTOL, STORED_ATOL = 1e-6, 1e-6


def small(**kw):
    base = dict(num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=2)
    base.update(kw)
    return NVAEConfig.preset("mnist_small", **base)


CONFIGS = [small(), small(arch_instance="res_elu"), small(arch_instance="res_bnelu"), small(num_nf=2, res_dist=False),
           small(num_latent_scales=3, num_preprocess_blocks=1, num_postprocess_blocks=1, ada_groups=False,
                 num_cell_per_cond_enc=1, num_cell_per_cond_dec=3),
           NVAEConfig.preset("cifar10", num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=3)]
CONFIGS += [small(arch_instance=a) for a in sorted(ARCH_INSTANCES) if a not in ("res_mbconv", "res_elu", "res_bnelu")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.arch_instance}-nf{c.num_nf}-s{c.num_latent_scales}")
@pytest.mark.parametrize("scheme", ["official", "format1"])
def test_every_key_has_one_place(cfg, scheme):
    model = NVAE(cfg)
    names = key_map(model, scheme)
    ours = model.state_dict()
    only_ours = {k for k in ours if k.startswith("spectral.") or k.endswith(".init_done")} if scheme == "official" \
        else set()
    assert set(names) == set(ours) - only_ours
    assert len(set(names.values())) == len(names)          # nobody else's key is used twice


def test_the_walk_is_in_the_format1_state_dict_order():
    # Format 1 registered its modules in the official order, the order the optimiser state follows.
    state = read_checkpoint(FORMAT1)
    model = NVAE(NVAEConfig.from_dict(state["config"]))
    names = key_map(model, "format1")
    walk = [names[k] for p in layout(model) for k in
            ([p.ours] if p.module is None else [f"{p.ours}.{s}" for s in p.module.state_dict()])]
    assert walk == [k for k in state["state_dict"] if not k.startswith("spectral.")]
    assert len(list(modules_in_official_order(model))) == len(layout(model)) - 1   # all but h0


def test_format1_checkpoint_loads_and_gives_its_outputs():
    stored = torch.load(FORMAT1, weights_only=True)
    assert stored["version"] == 1
    model = NVAE.from_checkpoint(FORMAT1).eval()   # the plain network, op by op
    expected = stored["expected"]
    with torch.no_grad():
        out = model(expected["x"], temperature=0.0)
    # The stored outputs were computed on another CPU: oneDNN's kernels (and their summation order) differ by ISA,
    # so float32 agrees to rounding, not bit for bit. A wrong key map moves them by orders of magnitude more.
    torch.testing.assert_close(out.logits, expected["logits"], rtol=STORED_RTOL, atol=STORED_ATOL)
    torch.testing.assert_close(out.kl, expected["kl"], rtol=STORED_RTOL, atol=STORED_ATOL)
    # With BN folded into the separable cells (the default in evaluation): the same up to rounding.
    with torch.no_grad():
        folded = speedups.apply(model)(expected["x"], temperature=0.0)
    torch.testing.assert_close(folded.logits, expected["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded.kl, expected["kl"], rtol=1e-5, atol=1e-6)


def test_format1_optimizer_state_follows_its_parameters():
    state = read_checkpoint(FORMAT1)
    model = NVAE(NVAEConfig.from_dict(state["config"]))
    new = upgrade(state, model)
    assert new["version"] == 2 and state["version"] == 1
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3)
    opt.load_state_dict(new["optimizer"])
    names = key_map(model, "format1")
    old_names = [k for k, v in state["state_dict"].items() if k in {names[n] for n, _ in model.named_parameters()}]
    old_state = state["optimizer"]["state"]
    checked = 0
    for (name, p) in model.named_parameters():
        i = old_names.index(names[name])   # format 1 kept parameters in its state-dict order
        torch.testing.assert_close(opt.state[p]["exp_avg"], old_state[i]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_inf"], old_state[i]["exp_inf"], rtol=0, atol=0)
        assert opt.state[p]["exp_avg"].shape == p.shape
        checked += 1
    assert checked == len(old_state) > 100


def test_format1_mismatch_is_a_clear_error():
    state = read_checkpoint(FORMAT1)
    model = NVAE(NVAEConfig.from_dict(state["config"]))
    broken = dict(state, state_dict={k: v for k, v in state["state_dict"].items() if k != "stem.bias"})
    with pytest.raises(CheckpointError, match=r"lacks stem\.bias"):
        upgrade(broken, model)


def _official_of(model):
    names = key_map(model, "official")
    return {names[k]: v for k, v in model.state_dict().items() if k in names}


def test_official_round_trip_by_name_fills_every_entry():
    model = NVAE(small(num_nf=1))
    other = NVAE(small(num_nf=1))
    other.load_state_dict(convert_state_dict(_official_of(model), other), strict=False)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        if not k.startswith("spectral."):
            assert torch.equal(a, b), k


def test_official_mismatch_names_the_first_entry():
    model = NVAE(small())
    official = _official_of(model)
    with pytest.raises(CheckpointError, match=r"lacks stem\.bias \(our stem\.bias\)"):
        convert_state_dict({k: v for k, v in official.items() if k != "stem.bias"}, model)
    with pytest.raises(CheckpointError, match=r"official entry extra\.weight .*no counterpart"):
        convert_state_dict({**official, "extra.weight": torch.zeros(1)}, model)
    with pytest.raises(CheckpointError,
                       match=r"official entry enc0\.1\.bias \(3,\) does not match encoder0\.conv\.bias"):
        convert_state_dict({**official, "enc0.1.bias": torch.zeros(3)}, model)


@needs_shared("reference", "cifar_flows")
def test_official_fixture_names_are_the_ones_we_give():
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(REFERENCE / "cifar_flows" / "checkpoint.pt", weights_only=True)
    model = NVAE.from_official(REFERENCE / "cifar_flows" / "checkpoint.pt")
    theirs = {k for k in ckpt["state_dict"] if not k.endswith(".weight_normalized")}
    assert set(key_map(model, "official").values()) == theirs
