"""EMA of the weights and gradient clipping (issue 17 items 1 and 5).

The EMA follows ``ema = rate * ema + (1 - rate) * w`` after every applied step (not a
skipped one), BN running statistics included; it lives in the checkpoint, resumes bit for
bit, comes back with a roll-back, agrees across DDP processes, and is what the reading
commands use unless ``--raw-weights`` says otherwise. Clipping scales the gradients to
the threshold norm before the step; the skip guard keeps seeing the norm before clipping.
"""
import json

import pytest
import torch

import nvae.training.loop as train_mod
from gloo import spawn
from nvae import NVAEConfig
from nvae.formats.checkpoint import model_fingerprint, read_checkpoint
from nvae.cli import main
from nvae.config import TrainConfig
from nvae.training.ema import WeightEMA, averaged_names, stored_ema
from nvae.training.objective import kl_balance_alpha
from nvae.training.run_dir import RunLog, load_any, load_weights
from nvae.training.state import TrainState
from nvae.training.step import Coefficients, train_step
from nvae.training.loop import train

RATE = 0.9


@pytest.fixture(autouse=True)
def _one_thread(_seed):
    """One thread (after conftest's two): these models are tiny, and two OpenMP threads on a busy two-core
    machine stall each step for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny():
    return NVAEConfig.preset("digits", num_channels_enc=8, num_channels_dec=8)


def _state(**cfg) -> TrainState:
    torch.manual_seed(0)
    state = TrainState.create(_tiny(), TrainConfig(**cfg))
    state.model.train()
    return state


def _coeffs(model):
    return Coefficients(beta=1.0, lam=1e-2, alpha=kl_balance_alpha(model.config.groups_per_scale))


def _batch(seed=0, n=8):
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def _copy(d):
    return {k: v.detach().clone() for k, v in d.items()}


# ------------------------------------------------------------------ the update
def test_the_ema_follows_its_formula_and_a_skipped_step_leaves_it_alone():
    state = _state(ema_rate=RATE)
    coeffs, ema = _coeffs(state.model), state.ema
    assert not ema.weights   # nothing until the first applied step (the data-dependent init)
    train_step(state, _batch(0), coeffs)
    for k, v in state.model.state_dict().items():
        assert torch.equal(ema.weights[k], v), k
    averaged = set(averaged_names(state.model))
    assert any(k.endswith("running_mean") for k in averaged) and any(k.endswith("running_var") for k in averaged)
    assert not any(k.endswith("num_batches_tracked") for k in averaged)
    for step in range(1, 4):
        prev = _copy(ema.weights)
        _, _, stepped = train_step(state, _batch(step), coeffs)
        assert stepped
        now = state.model.state_dict()
        moved = 0
        for k, v in now.items():
            if k in averaged:
                expected = RATE * prev[k] + (1 - RATE) * v
                assert torch.allclose(ema.weights[k], expected, rtol=1e-6, atol=1e-7), k
                moved += not torch.equal(ema.weights[k], v)
            else:   # counters, power-iteration vectors, flags: copied from the raw model
                assert torch.equal(ema.weights[k], v), k
        assert moved > len(averaged) // 2   # really an average, not a copy
    assert ema.updates == 4
    # a skipped step: the weights are untouched, and so is the EMA
    prev = _copy(ema.weights)
    _, _, stepped = train_step(state, _batch(9), coeffs, max_grad_norm=1e-12)
    assert not stepped and ema.updates == 4
    for k, v in prev.items():
        assert torch.equal(ema.weights[k], v), k


def test_ema_off_by_default_and_bad_rates_are_refused():
    assert TrainConfig().ema_rate == 0 and TrainConfig.preset("mnist").ema_rate == 0
    assert _state().ema is None
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_rate"):
            TrainConfig(ema_rate=rate)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="EMA rate"):
        WeightEMA(0.0)


# ------------------------------------------------------------------ clipping
def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_gradient_clipping_scales_to_the_threshold_and_leaves_smaller_norms_alone():
    x = _batch(3)
    free = _state()
    torch.manual_seed(1)
    _, norm, _ = train_step(free, x, _coeffs(free.model), max_grad_norm=float("inf"))
    raw = _grads(free.model)
    assert _norm(raw) == pytest.approx(norm.item(), rel=1e-5) and free.clipped_steps == 0

    clip = norm.item() / 4
    clipped = _state(grad_clip=clip)
    torch.manual_seed(1)
    _, norm_c, stepped = train_step(clipped, x, _coeffs(clipped.model), max_grad_norm=float("inf"))
    got = _grads(clipped.model)
    assert stepped and clipped.clipped_steps == 1
    assert norm_c.item() == pytest.approx(norm.item(), rel=1e-6)   # the reported norm is the unclipped one
    assert _norm(got) == pytest.approx(clip, rel=1e-5)
    for g, r in zip(got, raw):   # the same direction, scaled
        assert torch.allclose(g, r * (clip / norm.item()), rtol=1e-4, atol=1e-9)
    # the optimiser stepped with the clipped gradients: the weights differ from the free step's
    assert not all(torch.equal(a, b) for a, b in zip(free.model.parameters(), clipped.model.parameters()))

    loose = _state(grad_clip=norm.item() * 4)
    torch.manual_seed(1)
    train_step(loose, x, _coeffs(loose.model), max_grad_norm=float("inf"))
    assert loose.clipped_steps == 0
    for g, r in zip(_grads(loose.model), raw):
        assert torch.equal(g, r)


def test_the_skip_guard_judges_the_norm_before_clipping():
    state = _state(grad_clip=1e-3)
    torch.manual_seed(1)
    _, norm, stepped = train_step(state, _batch(), _coeffs(state.model), max_grad_norm=1e-2)
    # clipped to 1e-3 it would pass 1e-2; the unclipped norm does not
    assert norm.item() > 1e-2 and not stepped and state.clipped_steps == 0
    assert state.guard.state_dict()["history"][-1] == pytest.approx(norm.item())


# ------------------------------------------------------------------ checkpoints, resume, roll-back
def _cfg(steps, **kw):
    return TrainConfig(dataset="digits", epochs=2, batch_size=16, warmup_epochs=1, max_steps=steps, log_every=1,
                       image_every=1000, checkpoint_every=1000, deterministic=True, ema_rate=RATE, grad_clip=5.0,
                       **kw)


def test_stopped_and_resumed_with_ema_is_bit_identical_to_uninterrupted(tmp_path):
    train(_tiny(), _cfg(4), tmp_path / "ref", progress=False)
    train(_tiny(), _cfg(2), tmp_path / "run", progress=False)
    train(_tiny(), _cfg(4), tmp_path / "run", progress=False, resume=True)
    a, b = (read_checkpoint(tmp_path / r / "checkpoint.pt") for r in ("ref", "run"))
    assert a["step"] == b["step"] == 4
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4 and a["ema"]["rate"] == RATE
    assert a["run"]["clipped_steps"] == b["run"]["clipped_steps"] > 0
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for k, v in a["ema"]["state_dict"].items():
        assert torch.equal(v, b["ema"]["state_dict"][k]), k
    differ = [k for k, v in a["ema"]["state_dict"].items() if not torch.equal(v, a["state_dict"][k])]
    assert len(differ) > len(a["state_dict"]) // 2   # the EMA is not the raw weights


def test_roll_back_restores_the_checkpoints_ema_and_an_older_checkpoint_still_loads(tmp_path):
    cfg = TrainConfig(ema_rate=RATE)
    state = _state(ema_rate=RATE)
    coeffs, path = _coeffs(state.model), tmp_path / "checkpoint.pt"
    for i in range(2):
        train_step(state, _batch(i), coeffs)
    state.save(path, cfg)
    saved = _copy(state.ema.weights)
    for i in range(2, 4):
        train_step(state, _batch(i), coeffs)
    assert not all(torch.equal(saved[k], v) for k, v in state.ema.weights.items())
    train_mod.roll_back(state, path, cfg, RunLog(tmp_path, enabled=False))
    for k, v in saved.items():
        assert torch.equal(state.ema.weights[k], v), k
    assert state.ema.updates == 2

    # a checkpoint from before the EMA existed (no "ema", no "clipped_steps"): resumes, and reads as raw weights
    old = read_checkpoint(path)
    del old["ema"], old["run"]["clipped_steps"]
    torch.save(old, path)
    resumed = _state(ema_rate=RATE)
    resumed.load_state_dict(read_checkpoint(path))
    assert resumed.step == 2 and resumed.clipped_steps == 0 and not resumed.ema.weights
    train_step(resumed, _batch(5), coeffs)   # the EMA starts from the weights again
    assert all(torch.equal(resumed.ema.weights[k], v) for k, v in resumed.model.state_dict().items())
    model, _, used, _ = load_weights(path)
    assert used == "raw" and stored_ema(old) is None
    assert all(torch.equal(v, old["state_dict"][k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no EMA"):
        load_weights(path, weights="ema")


# ------------------------------------------------------------------ reading back: the CLI
@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ema") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a module fixture runs before _one_thread
    try:
        train(_tiny(), _cfg(3), run, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


def test_load_weights_gives_the_ema_by_default_and_raw_on_request(ema_run):
    stored = read_checkpoint(ema_run / "checkpoint.pt")
    ema, path, used, _ = load_weights(ema_run)
    assert used == "ema" and path == ema_run / "checkpoint.pt" and not ema.training
    raw, _, used_raw, _ = load_weights(ema_run, weights="raw")
    assert used_raw == "raw"
    for k, v in ema.state_dict().items():
        assert torch.equal(v, stored["ema"]["state_dict"][k]), k
        assert torch.equal(raw.state_dict()[k], stored["state_dict"][k]), k
    assert model_fingerprint(ema) != model_fingerprint(raw)
    assert model_fingerprint(load_any(ema_run)[0]) == model_fingerprint(ema)
    with pytest.raises(ValueError, match="weights must be"):
        load_weights(ema_run, weights="best")


def test_eval_uses_the_ema_and_raw_weights_the_others(ema_run, tmp_path, capsys):
    results = {}
    for name, flags in (("ema", []), ("raw", ["--raw-weights"])):
        out = tmp_path / f"{name}.json"
        args = ["eval", str(ema_run), "-k", "2", "--max-images", "8", "--batch-size", "8", "--output", str(out)]
        assert main(args + flags) == 0
        results[name] = json.loads(out.read_text())
        assert json.loads(capsys.readouterr().out)["weights"] == name
    assert results["ema"]["weights"] == "ema" and results["raw"]["weights"] == "raw"
    assert results["ema"]["nelbo"] != results["raw"]["nelbo"]


def test_reading_commands_say_which_weights_and_bn_caches_follow_them(ema_run, tmp_path, capsys):
    for flags, expected in (([], "ema"), (["--raw-weights"], "raw")):
        assert main(["sample", str(ema_run), "-n", "4", "--readjust-bn", "--readjust-steps", "2",
                     "--out", str(tmp_path)] + flags) == 0
        out = capsys.readouterr().out
        assert f"{expected} weights of" in out and "re-adjusted and cached" in out
        assert main(["reconstruct", str(ema_run), "-n", "4", "--output", str(tmp_path / f"{expected}.png")]
                    + flags) == 0
        assert f"{expected} weights of" in capsys.readouterr().out
    # two caches side by side, each keyed by its weights' fingerprint
    assert len(list(ema_run.glob("checkpoint.bn_*.pt"))) == 1
    assert len(list(ema_run.glob("checkpoint_ema.bn_*.pt"))) == 1
    main(["sample", str(ema_run), "-n", "4", "--readjust-bn", "--readjust-steps", "2", "--out", str(tmp_path)])
    assert "from cache" in capsys.readouterr().out


def test_train_option_sets_the_ema_rate_and_clipping(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "2", "--batch-size", "32", "--model",
                 "num_channels_enc=8", "--model", "num_channels_dec=8", "--train", "ema_rate=0.99",
                 "--train", "grad_clip=0.001", "--train", "image_every=1000", "--train", "log_every=1"]) == 0
    state = read_checkpoint(run / "checkpoint.pt")
    assert state["train_config"]["ema_rate"] == 0.99 and state["train_config"]["grad_clip"] == 0.001
    assert state["ema"]["rate"] == 0.99 and state["ema"]["updates"] == 2 and state["run"]["clipped_steps"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run)).Reload()
    assert [e.value for e in events.Scalars("train/clipped_steps")] == [1, 2]
    assert all(e.value > 0.001 for e in events.Scalars("train/grad_norm"))   # the norm before clipping
    capsys.readouterr()
    assert main(["train", "--run-dir", str(tmp_path / "bad"), "--train", "ema_rate=1"]) == 2
    assert "ema_rate" in capsys.readouterr().err


# ------------------------------------------------------------------ DDP
def _ddp_worker(rank: int) -> dict:
    from nvae.distributed import init_distributed
    torch.manual_seed(rank)   # different starting points: DDP's broadcast must make them one model
    state = TrainState.create(_tiny(), TrainConfig(ema_rate=RATE, grad_clip=1.0), init_distributed("cpu"))
    state.net.train()
    for step in range(2):
        train_step(state, _batch(10 * step + rank, n=4), _coeffs(state.model))
    return {"ema": _copy(state.ema.weights), "clipped": state.clipped_steps}


def test_the_ema_is_the_same_on_every_process(tmp_path):
    ranks = spawn(_ddp_worker, tmp_path)
    assert ranks[0]["clipped"] == ranks[1]["clipped"]
    for k, v in ranks[0]["ema"].items():
        assert torch.equal(v, ranks[1]["ema"][k]), k
