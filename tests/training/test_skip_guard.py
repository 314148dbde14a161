"""NaN and inf safety: bad steps are skipped without a trace, spikes are caught, divergence rolls back."""
import math

import pytest
import torch

import nvae.training.loop as train_mod
from nvae import NVAE, NVAEConfig
from nvae.data import build_dataset
from nvae.training.objective import kl_balance_alpha
from nvae.config import TrainConfig
from nvae.training.skip_guard import GradientGuard, TrainingDiverged
from nvae.training.state import TrainState
from nvae.training.step import Coefficients, learning_rate, train_step
from nvae.training.loop import train


def _tiny():
    return NVAEConfig.preset("digits", num_channels_enc=8, num_channels_dec=8)


def _setup():
    torch.manual_seed(0)
    model = NVAE(_tiny()).train()
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3)
    state = TrainState(model, opt)
    coeffs = Coefficients(beta=1.0, lam=1e-2, alpha=kl_balance_alpha(model.config.groups_per_scale))
    x = (torch.rand(8, 1, 8, 8) > 0.5).float()
    train_step(state, x, coeffs)   # data-dependent init and a first update
    return model, state, coeffs, x


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nan_batch_is_skipped_and_leaves_weights_and_bn_statistics_untouched():
    model, state, coeffs, x = _setup()
    opt = state.optimizer
    before, opt_before = _snapshot(model), opt.state_dict()["state"][0]["exp_avg"].clone()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    out, grad_norm, stepped = train_step(state, bad, coeffs)
    assert not stepped and not torch.isfinite(out.loss)
    _assert_unchanged(model, before)                  # BN running means/vars included
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt_before)
    assert state.guard.total == 1 and state.step == 2
    # the next good step trains normally from the untouched state
    _, _, stepped = train_step(state, x, coeffs)
    assert stepped
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_bn_statistics_would_be_poisoned_without_the_restore():
    """The NaN batch really reaches the BN statistics in the forward pass (so the restore matters)."""
    model, _, _, x = _setup()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    model(bad)
    stats = [b for n, b in model.named_buffers() if n.endswith("running_mean")]
    assert any(not torch.isfinite(s).all() for s in stats)


def test_inf_gradient_is_skipped():
    model, state, coeffs, x = _setup()
    before = _snapshot(model)
    param = next(model.parameters())
    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    out, grad_norm, stepped = train_step(state, x, coeffs)
    handle.remove()
    assert torch.isfinite(out.loss) and not torch.isfinite(grad_norm) and not stepped
    _assert_unchanged(model, before)


def test_gradient_spike_above_the_threshold_is_skipped():
    model, state, coeffs, x = _setup()
    before = _snapshot(model)
    _, grad_norm, stepped = train_step(state, x, coeffs, max_grad_norm=1e-6)
    assert math.isfinite(grad_norm.item()) and not stepped
    _assert_unchanged(model, before)


def test_guard_threshold_follows_the_running_quantile_and_cannot_stall():
    guard = GradientGuard(factor=10.0, quantile=0.5, window=20, warmup=5, max_consecutive=100)
    for _ in range(4):
        guard.update(1.0, True)
    assert guard.threshold() == math.inf            # still warming up
    guard.update(1.0, True)
    assert guard.threshold() == pytest.approx(10.0)
    guard.update(float("nan"), False)                # non-finite norms never enter the history
    assert guard.threshold() == pytest.approx(10.0) and guard.consecutive == 1
    # the gradient scale grows for good: after a few skips the threshold follows it
    skipped, norm = 0, 1000.0
    while norm > guard.threshold():
        guard.update(norm, False)
        skipped += 1
        assert skipped < 20, "the guard would skip forever"
    assert guard.consecutive == skipped + 1
    guard.update(norm, True)
    assert guard.consecutive == 0 and guard.total == skipped + 1
    state = guard.state_dict()
    other = GradientGuard(factor=10.0, quantile=0.5, window=20, warmup=5)
    other.load_state_dict(state)
    assert other.threshold() == guard.threshold() and other.total == guard.total


def test_guard_rejects_bad_settings():
    with pytest.raises(ValueError, match="factor"):
        GradientGuard(factor=0.5)
    with pytest.raises(ValueError, match="quantile"):
        GradientGuard(quantile=0)


def _poison(monkeypatch, steps):
    """Make the training batches of the given (1-based) steps NaN."""
    real = train_mod.prepare_batch
    calls = {"n": 0}

    def prepare(x, *args, **kw):
        calls["n"] += 1
        out = real(x, *args, **kw)
        return out * float("nan") if calls["n"] in steps else out

    monkeypatch.setattr(train_mod, "prepare_batch", prepare)


def _cfg(**kw):
    return TrainConfig.preset("digits", batch_size=32, log_every=1, image_every=1000, **kw)


def test_training_survives_nan_batches_and_logs_them(tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 4})
    model = train(_tiny(), _cfg(max_steps=6), tmp_path / "run", progress=False)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["guard"]["total"] == 2 and state["step"] == 6
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "step 3 skipped" in text and "step 4 skipped" in text and "2 skipped so far" in text


def test_consecutive_skips_roll_back_to_the_last_checkpoint_with_a_lower_learning_rate(tmp_path, monkeypatch):
    _poison(monkeypatch, {4, 5, 6})
    model = train(_tiny(), _cfg(max_steps=8, checkpoint_every=3, max_consecutive_skips=3), tmp_path / "run",
                  progress=False)
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "rolled back to the weights of step 3" in text
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["run"]["rollbacks"] == 1 and state["run"]["lr_scale"] == 0.5 and state["step"] == 8
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    lrs = [float(line.split(" lr ")[1]) for line in text.splitlines() if " lr " in line]
    per_epoch = len(build_dataset("digits", "train")) // 32
    schedule = [learning_rate(s, per_epoch, _cfg()) for s in range(8)]
    assert lrs[0] == pytest.approx(schedule[0], rel=1e-2)
    assert lrs[-1] == pytest.approx(0.5 * schedule[7], rel=1e-2)   # after the roll-back


def test_divergence_before_any_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(1, 10)))
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train(_tiny(), _cfg(max_steps=8, max_consecutive_skips=3), tmp_path / "run", progress=False)
