"""nvae.speedups.apply / enabled / remove: switched on from outside, read back off the modules, and undone."""
import dataclasses

import pytest
import torch

from nvae import NVAE, NVAEConfig, speedups
from nvae.model import cells, flows, layers


def _model() -> NVAE:
    torch.manual_seed(0)
    return NVAE(dataclasses.replace(NVAEConfig.preset("digits"), num_channels_enc=4, num_channels_dec=4))


def _paper_classes(model) -> bool:
    """Every module is of a class the model itself (or torch) defines: nothing swapped in."""
    own = {cells.__name__, flows.__name__, layers.__name__, "nvae.model.network", "nvae.model.latent_group",
           "nvae.model.regularizers"}
    return all(type(m).__module__ in own or type(m).__module__.startswith("torch.") for m in model.modules())


def test_a_plain_model_runs_as_built_and_reports_no_speedups():
    model = _model()
    assert _paper_classes(model)
    assert speedups.enabled(model) == speedups.PLAIN


@pytest.mark.parametrize("switches", [{}, {"recompute_bn": True}, {"checkpointing": True},
                                      {"checkpointing": ("normal_post", "up_post"), "folded_eval": False},
                                      {"forward_weights": False, "small_map_depthwise": False}])
def test_enabled_reads_back_what_apply_switched_on_and_remove_undoes_it(switches):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    speedups.apply(model, **switches)
    assert speedups.enabled(model) == dataclasses.replace(speedups.DEFAULT, **switches)
    assert not _paper_classes(model)
    for k, v in model.state_dict().items():          # same parameters, buffers and keys
        assert torch.equal(v, state[k]), k
    speedups.remove(model)
    assert _paper_classes(model) and speedups.enabled(model) == speedups.PLAIN


def test_apply_sets_every_switch_not_only_the_ones_named():
    model = speedups.apply(_model(), recompute_bn=True)
    speedups.apply(model, checkpointing=True)      # recompute_bn is back at its default (off)
    assert not speedups.enabled(model).recompute_bn and speedups.enabled(model).checkpointing is True


def test_a_typo_in_a_role_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown cell role"):
        speedups.apply(_model(), checkpointing=("normal_dex",))
