"""Temperature schedules (nvae.analysis.temperature_schedule): parsing, per-group resolution, the model and the CLI."""
import argparse

import numpy as np
import pytest
import torch

from nvae import NVAE, NVAEConfig
from nvae.cli import main
from nvae.model.distributions import NormalDecoder
from nvae.model.latent_group import FromPrior
from nvae.model.network import per_group
from nvae.analysis.sampling import bn_cache_path, temperature_name
from nvae.analysis.temperature_schedule import TemperatureSchedule, parse_temperature, parse_temperatures, temperature_arg


def _model() -> NVAE:
    torch.manual_seed(0)
    return NVAE(NVAEConfig.preset("digits")).eval()   # 6 groups, 8x8 images


# ------------------------------------------------------------------ parsing
def test_a_linear_ramp_over_four_groups():
    assert parse_temperature("linear:0.6:0.9").resolve(4) == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert parse_temperature("linear:1:0").resolve(3) == pytest.approx([1.0, 0.5, 0.0])
    assert parse_temperature("linear:0.6:0.9").resolve(1) == [0.6]


def test_a_number_and_a_list():
    assert parse_temperature("0.7").resolve(3) == [0.7, 0.7, 0.7]
    assert parse_temperature(" 1, 0.5 ,0").resolve(3) == [1.0, 0.5, 0.0]
    for text in ("0.7", "linear:0.6:0.9", "1,0.5,0"):
        assert str(parse_temperature(text)) == text           # the spec reads back as written


@pytest.mark.parametrize("text, says", [
    ("", "empty temperature"),
    ("warm", "invalid finite non-negative number 'warm'"),
    ("-0.5", "finite numbers >= 0"),
    ("nan", "finite numbers >= 0"),
    ("linear:0.6", "not a known schedule"),
    ("cosine:0.6:0.9", "not a known schedule"),
    ("linear:0.6:inf", "finite numbers >= 0"),
    ("1,,0.5", "empty entry"),
    ("1,-1", "finite numbers >= 0"),
])
def test_bad_specs_say_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        parse_temperature(text)
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        temperature_arg(text)


def test_a_list_of_the_wrong_length_names_the_count():
    with pytest.raises(ValueError, match="has 2 values but the model has 6 latent groups"):
        parse_temperature("1,0.5").resolve(6)
    with pytest.raises(ValueError, match="6 latent groups"):
        _model().sample_logits(1, parse_temperature("1,0.5"))


def test_several_schedules():
    assert [str(s) for s in parse_temperatures("0.6,0.8,1")] == ["0.6", "0.8", "1"]   # as --temperatures always read
    assert [str(s) for s in parse_temperatures("0.7;linear:0.6:1;1,0.9")] == ["0.7", "linear:0.6:1", "1,0.9"]
    assert [s.kind for s in parse_temperatures("1,0.9;")] == ["list"]


def test_names_keep_the_whole_schedule():
    assert temperature_name(TemperatureSchedule.constant(0.7)) == temperature_name(0.7) == "t0.7"   # old caches
    assert temperature_name(parse_temperature("linear:0.6:0.9")) == "tlin0.6-0.9"
    assert temperature_name(parse_temperature("1,0.9")) == "t1-0.9"
    long = parse_temperature(",".join(["1"] * 20))
    assert temperature_name(long).startswith("tlist-") and len(temperature_name(long)) < 20
    assert temperature_name(long) != temperature_name(parse_temperature(",".join(["1"] * 19 + ["0.9"])))
    paths = {bn_cache_path("run/checkpoint.pt", parse_temperature(t), 500)
             for t in ("0.6", "linear:0.6:0.9", "linear:0.6:1", "0.6,0.9")}
    assert len(paths) == 4                               # no two schedules share re-adjusted BN statistics


# ------------------------------------------------------------------ the model
class _Spy(FromPrior):
    """FromPrior recording each group's z and prior mean."""

    def __call__(self, index, group, prior, posterior):
        z = super().__call__(index, group, prior, posterior)
        self.seen = getattr(self, "seen", []) + [(z, prior.mu)]
        return z


def _latents(model, temps, seed=1):
    spy = _Spy(per_group(temps, model.num_groups), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.top_down(3, spy)
    return spy.seen


def test_group_zero_is_the_top_coarsest_group():
    shapes = _model().latent_shapes
    assert shapes[0][-1] == min(s[-1] for s in shapes) and shapes[-1][-1] == max(s[-1] for s in shapes)


@pytest.mark.parametrize("g", [0, 3])
def test_temperature_zero_in_one_group_takes_its_prior_mean_and_changes_only_that_group(g):
    model = _model()
    temps = [1.0] * model.num_groups
    temps[g] = 0.0
    base, cold = _latents(model, [1.0] * model.num_groups), _latents(model, temps)
    for i in range(g):                                   # the groups above g: the very same draws
        assert torch.equal(cold[i][0], base[i][0])
    assert torch.equal(cold[g][0], cold[g][1])           # z_g is the prior mean
    assert not torch.equal(base[g][0], base[g][1])
    for z, mu in cold[g + 1:]:                           # the groups below g still draw noise
        assert not torch.equal(z, mu)


def test_the_model_takes_a_schedule_wherever_it_takes_a_temperature():
    model = _model()
    spec = parse_temperature("linear:0.2:1")
    a = model.sample_logits(2, spec, torch.Generator().manual_seed(0))
    b = model.sample_logits(2, [0.2, 0.36, 0.52, 0.68, 0.84, 1.0], torch.Generator().manual_seed(0))
    assert torch.allclose(a, b)


# ------------------------------------------------------------------ p(x|z) of the Normal decoder
def test_normal_decoder_samples_scale_the_std_by_t():
    n = 200_000
    params = torch.cat([torch.full((n, 1, 1, 1), 0.1), torch.full((n, 1, 1, 1), -2.0)], dim=1).double()
    dec = NormalDecoder(params)
    sigma = float(dec.dist.sigma[0])
    g = torch.Generator().manual_seed(0)
    for t in (1.0, 0.5):
        x = 2 * dec.sample(t, g) - 1
        assert float(x.mean()) == pytest.approx(0.1, abs=0.01)
        assert float(x.std()) == pytest.approx(t * sigma, rel=0.02)
    assert torch.equal(dec.sample(0.0, g), dec.mean())   # t = 0: the mean


# ------------------------------------------------------------------ the CLI
def test_sample_command_takes_a_ramp_and_refuses_a_wrong_list(tmp_path, capsys):
    _model().save(tmp_path / "checkpoint.pt")
    out = tmp_path / "s"
    assert main(["sample", str(tmp_path), "-n", "2", "-t", "linear:0.5:1", "--out", str(out)]) == 0
    arr = np.load(out / "samples_tlin0.5-1.npz")["images"]
    assert arr.shape == (2, 1, 8, 8) and (out / "samples_tlin0.5-1.png").is_file()
    assert main(["sample", str(tmp_path), "-n", "1", "--per-group-temperature", "1,1,1,1,1,0", "--out", str(out)]) == 0
    assert np.load(out / "samples_t1-1-1-1-1-0.npz")["images"].shape == (1, 1, 8, 8)
    assert main(["sample", str(tmp_path), "-n", "2", "-t", "1,0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "has 2 values but the model has 6 latent groups" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["sample", str(tmp_path), "-t", "linear:1"]) == 2
    assert "not a known schedule" in capsys.readouterr().err
