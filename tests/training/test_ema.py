"""EMA of the weights and gradient clipping (issue 17 items 1 and 5).

The EMA follows ``ema = d * ema + (1 - d) * w`` after every applied step (not a skipped
one), BN running statistics included, with the share kept warming up to the configured
rate, ``d = min(rate, n / (n + 9))`` after ``n`` updates (issue: 0.999 was worthless after
1,500 steps); it lives in the checkpoint with its count, resumes bit for bit, comes back
with a roll-back, agrees across DDP processes, and is what the reading commands use unless
``--raw-weights`` says otherwise. Clipping scales the gradients to
the threshold norm before the step; the skip guard keeps seeing the norm before clipping.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import nvae.training.loop as train_mod
from conftest import load_benchmark
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
FORMAT1 = Path(__file__).resolve().parents[1] / "formats" / "fixtures" / "format1_digits_tiny.pt"


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
        moved, d = 0, min(RATE, step / (step + 9))   # ``step`` updates averaged before this one
        for k, v in now.items():
            if k in averaged:
                expected = d * prev[k] + (1 - d) * v
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


class _Known(torch.nn.Module):
    """A parameter and a BN layer in float64, whose tensors the tests set to known values."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.bn = torch.nn.BatchNorm1d(2).double()

    def set(self, w: torch.Tensor, mean: torch.Tensor, step: int) -> "_Known":
        with torch.no_grad():
            self.w.copy_(w)
            self.bn.running_mean.copy_(mean)
            self.bn.num_batches_tracked.fill_(step)
        return self


def _walk(n, seed=0):
    """``n`` known states of :class:`_Known`: (parameter, running mean) pairs."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64))
            for _ in range(n)]


def test_after_n_updates_the_ema_is_the_polynomial_average_of_the_weights():
    # Before the cap binds, the average after n updates weighs update j by C(j+7, 8) / C(n+8, 9): the closed form
    # of the warm-up's recursion, computed here without it.
    n, model, ema = 12, _Known(), WeightEMA(0.999)
    walk = _walk(n)
    for j, (w, mean) in enumerate(walk, 1):
        ema.update(model.set(w, mean, j))
    share = [math.comb(j + 7, 8) / math.comb(n + 8, 9) for j in range(1, n + 1)]
    assert sum(share) == pytest.approx(1.0, abs=1e-15)
    expected_w = sum(s * w for s, (w, _) in zip(share, walk))
    expected_mean = sum(s * m for s, (_, m) in zip(share, walk))
    assert ema.updates == n
    torch.testing.assert_close(ema.weights["w"], expected_w, rtol=0, atol=1e-13)
    torch.testing.assert_close(ema.weights["bn.running_mean"], expected_mean, rtol=0, atol=1e-13)
    assert ema.weights["bn.num_batches_tracked"].item() == n   # a counter: copied, not averaged
    # the plain average of the same weights, and the constant-rate rule, are other numbers
    assert not torch.allclose(ema.weights["w"], sum(w for w, _ in walk) / n, atol=1e-3)
    assert not torch.allclose(ema.weights["w"], ema.rate ** (n - 1) * walk[0][0], atol=1e-3)


def test_the_configured_rate_is_the_asymptote():
    ema = WeightEMA(0.99)
    shares = [ema.decay(n) for n in range(2000)]
    assert shares[0] == 0 and all(a < b or a == b == 0.99 for a, b in zip(shares, shares[1:]))
    assert max(shares) == 0.99 and ema.decay(10 ** 9) == 0.99
    assert ema.warmed_up() == 891   # 9 * 0.99 / (1 - 0.99)
    assert ema.decay(890) < 0.99 == ema.decay(891)
    for rate in (0.5, 0.9, 0.999, 0.9995, 0.9999):   # rounding never leaves the end of the warm-up short
        warm = WeightEMA(rate)
        assert warm.decay(warm.warmed_up()) == rate > warm.decay(warm.warmed_up() - 1)
    # past the warm-up (rate 0.5: from 9 updates on) an update is the plain EMA at the rate
    model, ema = _Known(), WeightEMA(0.5)
    walk = _walk(12, seed=1)
    for j, (w, mean) in enumerate(walk[:10], 1):
        ema.update(model.set(w, mean, j))
    for j, (w, mean) in enumerate(walk[10:], 11):
        before = ema.weights["w"].clone()
        ema.update(model.set(w, mean, j))
        torch.testing.assert_close(ema.weights["w"], 0.5 * before + 0.5 * w, rtol=0, atol=1e-15)


def test_an_early_average_follows_the_recent_weights_not_the_first():
    # 1,500 updates at 0.999, the benchmark's case: weights that move linearly from 0 to 1 after a first step at 100.
    n, model, ema = 1500, _Known(), WeightEMA(0.999)
    mean = torch.zeros(2, dtype=torch.float64)
    for j in range(1, n + 1):
        ema.update(model.set(torch.full((3,), 100.0 if j == 1 else j / n, dtype=torch.float64), mean, j))
    got = ema.weights["w"][0].item()
    # The first weights' share is C(8, 8) / C(1508, 9) ~ 1e-22 (the constant rule kept 0.999^1499 = 0.22 of it, +22
    # here), and the rest is the recent end of the run: the polynomial average of j / n is about 9 / 10.
    assert ema.decay(n - 1) < 0.995   # still warming up
    expected = sum(math.comb(j + 7, 8) * j / n for j in range(2, n + 1)) / math.comb(n + 8, 9)
    assert got == pytest.approx(expected, abs=1e-9) and 0.89 < got < 0.91


def test_the_benchmarks_other_rules_are_what_they_say():
    """benchmarks/ema.py compares the warm-up with the rule before it and with Adam's bias correction."""
    bench = load_benchmark("ema")
    n, rate, walk = 30, 0.9, _walk(30, seed=2)
    rules = {name: cls(rate) for name, cls in bench.RULES.items()}
    assert type(rules["warmup"]) is WeightEMA
    model, zero_started = _Known(), torch.zeros(3, dtype=torch.float64)
    for j, (w, mean) in enumerate(walk, 1):
        for ema in rules.values():
            ema.update(model.set(w, mean, j))
        zero_started = rate * zero_started + (1 - rate) * w
    torch.testing.assert_close(rules["bias"].weights["w"], zero_started / (1 - rate ** n), rtol=0, atol=1e-13)
    constant = walk[0][0]
    for w, _ in walk[1:]:
        constant = rate * constant + (1 - rate) * w
    torch.testing.assert_close(rules["constant"].weights["w"], constant, rtol=0, atol=1e-13)


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


def test_an_ema_saved_before_the_warm_up_loads_and_goes_on_from_its_count(tmp_path):
    cfg, path = TrainConfig(ema_rate=RATE), tmp_path / "checkpoint.pt"
    state = _state(ema_rate=RATE)
    coeffs = _coeffs(state.model)
    train_step(state, _batch(0), coeffs)
    state.save(path, cfg)
    # The EMA entry exactly as the constant-rate code wrote it: {"rate", "updates", "state_dict"}, an average of 3.
    old = read_checkpoint(path)
    average = {k: (v * 0.5 if v.is_floating_point() else v.clone()) for k, v in old["state_dict"].items()}
    old["ema"] = {"rate": RATE, "updates": 3, "state_dict": average}
    torch.save(old, path)
    resumed = _state(ema_rate=RATE)
    resumed.load_state_dict(read_checkpoint(path))
    assert resumed.ema.updates == 3 and resumed.ema.rate == RATE
    for k, v in average.items():
        assert torch.equal(resumed.ema.weights[k], v), k
    train_step(resumed, _batch(1), coeffs)   # the next update keeps 3 / 12 of the average, not RATE of it
    w, d = resumed.model.state_dict(), 3 / 12
    for k in averaged_names(resumed.model):
        torch.testing.assert_close(resumed.ema.weights[k], d * average[k] + (1 - d) * w[k], rtol=1e-6, atol=1e-7)
    assert resumed.ema.updates == 4 and stored_ema(old) is average

    # No count at all (never written, but a hand-made file could lack it): taken as warmed up, the rate goes on.
    model, ema = _Known(), WeightEMA(0.5)
    stored = {"w": torch.ones(3, dtype=torch.float64), "bn.weight": torch.ones(2, dtype=torch.float64),
              "bn.bias": torch.zeros(2, dtype=torch.float64), "bn.running_mean": torch.zeros(2, dtype=torch.float64),
              "bn.running_var": torch.ones(2, dtype=torch.float64), "bn.num_batches_tracked": torch.tensor(7)}
    ema.load_state_dict({"rate": 0.5, "state_dict": stored}, model)
    assert ema.updates == ema.warmed_up() == 9
    ema.update(model.set(torch.full((3,), 3.0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 8))
    assert torch.equal(ema.weights["w"], torch.full((3,), 2.0, dtype=torch.float64))
    empty = WeightEMA(0.5)
    empty.load_state_dict({"state_dict": {}}, model)
    assert empty.updates == 0 and not empty.weights

    # Format 1 (nvae 0.1, before the EMA): read as the raw weights, and a state restored from it starts its EMA
    # from the weights at the next step.
    assert stored_ema(read_checkpoint(FORMAT1)) is None
    assert load_weights(FORMAT1)[2] == "raw"
    fixture = read_checkpoint(FORMAT1)
    state = TrainState.create(NVAEConfig.from_dict(fixture["config"]), TrainConfig(ema_rate=RATE))
    state.load_state_dict(fixture, progress=False)
    assert state.ema.updates == 0 and not state.ema.weights


def test_resumed_from_a_state_dict_the_ema_goes_on_bit_for_bit_and_needs_its_count(tmp_path):
    model, walk = _Known(), _walk(40, seed=3)
    straight, first = WeightEMA(0.99), WeightEMA(0.99)
    for j, (w, mean) in enumerate(walk, 1):
        straight.update(model.set(w, mean, j))
    for j, (w, mean) in enumerate(walk[:15], 1):
        first.update(model.set(w, mean, j))
    torch.save(first.state_dict(), tmp_path / "ema.pt")
    saved = torch.load(tmp_path / "ema.pt", weights_only=True)

    def go_on(state):
        ema = WeightEMA(0.99)
        ema.load_state_dict(state, model)
        for j, (w, mean) in enumerate(walk[15:], 16):
            ema.update(model.set(w, mean, j))
        return ema

    resumed = go_on(saved)
    assert resumed.updates == straight.updates == 40
    for k, v in straight.weights.items():
        assert torch.equal(resumed.weights[k], v), k
    # the count is what makes it exact: the same tensors restarted at another count give another average
    recount = go_on({**saved, "updates": 1})
    assert not torch.equal(recount.weights["w"], straight.weights["w"])


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
