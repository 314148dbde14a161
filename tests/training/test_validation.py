"""Validation during training (nvae.training.validation): the official schedule, what it writes, and that it
neither changes the training nor repeats or skips an epoch when a run is resumed."""
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nvae.training.loop as train_module
from nvae.config import NVAEConfig, TrainConfig
from nvae.data import build_dataset
from nvae.analysis.likelihood import EvalConfig, evaluate
from nvae import speedups
from nvae.model.network import NVAE
from nvae.seeds import VALIDATION_EVAL, VALIDATION_SAMPLES, derived_seed
from nvae.training.run_dir import RunLog
from nvae.training.state import TrainState
from nvae.training.loop import TrainingInterrupted, train
from nvae.training.validation import (FINAL_FILE, HISTORY_FILE, TAGS, TEMPERATURES, Validation, eval_interval, is_due,
                             sample_grids)

# A minimal digits model; batch 150 makes 10 steps per epoch, 3 epochs the 30-step run.
MODEL = NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4, num_latent_scales=1,
                          num_groups_per_scale=2, ada_groups=False, num_preprocess_cells=1, num_postprocess_cells=1)
TRAIN = TrainConfig.preset("digits", epochs=3, batch_size=150, warmup_epochs=1, eval_every=1, eval_samples=2,
                           final_eval_samples=3, eval_max_images=48, image_every=1000, checkpoint_every=1000,
                           log_every=1000, deterministic=True)
PER_EPOCH = 10


def _run(run: Path, resume: bool = False, **changes) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one thread: the same arithmetic in every run, and no contention on a busy machine
    try:
        train(MODEL, dataclasses.replace(TRAIN, **changes), run, progress=False, resume=resume)
    finally:
        torch.set_num_threads(threads)


def _history(run: Path) -> list:
    return json.loads((run / HISTORY_FILE).read_text())["evaluations"]


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The 30-step run, never stopped, validated after every epoch."""
    run = tmp_path_factory.mktemp("validation") / "reference"
    _run(run)
    return run


# ------------------------------------------------------------------ the schedule
def test_official_schedule_every_epoch_up_to_50_epochs_else_every_20_and_the_last():
    short = TrainConfig(epochs=50)
    assert eval_interval(short) == 1 and all(is_due(e, short) for e in range(50))
    long = TrainConfig(epochs=400)
    assert [e for e in range(400) if is_due(e, long)] == list(range(0, 400, 20)) + [399]
    assert [e for e in range(90) if is_due(e, TrainConfig.preset("celeba64"))] == [0, 20, 40, 60, 80, 89]


def test_eval_every_overrides_the_schedule_and_zero_turns_it_off():
    assert [e for e in range(10) if is_due(e, TrainConfig(epochs=10, eval_every=4))] == [0, 4, 8, 9]
    assert not any(is_due(e, TrainConfig(epochs=10, eval_every=0)) for e in range(10))
    for bad in (dict(eval_every=-1), dict(eval_samples=0), dict(final_eval_samples=-1), dict(eval_max_images=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_bits_per_dim_of_mnist_are_over_the_28x28_pixels_the_official_code_counts():
    assert NVAEConfig.preset("mnist").num_data_dims == 28 * 28
    assert (derived_seed(VALIDATION_EVAL, 1, 0) != derived_seed(VALIDATION_EVAL, 1, 1)
            != derived_seed(VALIDATION_SAMPLES, 1, 1))


def test_the_train_command_sets_the_schedule_and_a_resumed_run_may_change_it(tmp_path, capsys):
    from nvae.cli import build_parser, main
    from nvae.cli.training import _train_overrides
    from nvae.training.run_dir import check_same_run
    args = build_parser().parse_args(["train", "--eval-every", "0", "--eval-samples", "5",
                                      "--final-eval-samples", "0"])
    assert {k: _train_overrides(args)[k] for k in ("eval_every", "eval_samples", "final_eval_samples")} == \
        {"eval_every": 0, "eval_samples": 5, "final_eval_samples": 0}
    assert "eval_every" not in _train_overrides(build_parser().parse_args(["train"]))   # None: the official rule
    for bad in (["--eval-every", "-1"], ["--eval-samples", "0"], ["--final-eval-samples", "x"]):
        assert main(["train", "--run-dir", str(tmp_path / "never"), *bad]) == 2
        assert bad[0] in capsys.readouterr().err and not (tmp_path / "never").exists()
    changed = dataclasses.replace(TRAIN, eval_every=5, eval_samples=7, final_eval_samples=0, eval_max_images=None)
    check_same_run(MODEL.to_dict(), TRAIN.to_dict(), MODEL, changed, tmp_path)   # no error: run control only


# ------------------------------------------------------------------ one validation
def test_a_validation_leaves_weights_bn_statistics_random_streams_and_mode_alone(tmp_path):
    state = TrainState.create(MODEL, TRAIN)
    state.model.train()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    streams = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    data = build_dataset("digits", "test", None)
    check = Validation(TRAIN, data, RunLog(tmp_path, enabled=False), tmp_path, PER_EPOCH, progress=False)
    result = check.evaluate_epoch(state, 0)
    assert math.isfinite(result.nll) and result.num_samples == TRAIN.eval_samples and result.num_images == 48
    assert state.model.training and all(m.training for m in state.model.modules())
    for k, v in state.model.state_dict().items():   # BN running means, variances and counts included
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in state.model.parameters())
    assert torch.equal(torch.get_rng_state(), streams[0]) and np.array_equal(np.random.get_state()[1], streams[1])
    assert random.getstate() == streams[2]
    assert not any(tmp_path.iterdir())               # a disabled log (ranks > 0) writes nothing


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")   # the NaN sample grids
def test_a_diverged_model_is_recorded_as_null_and_gets_no_final_json(tmp_path):
    state = TrainState.create(MODEL, TRAIN)
    with torch.no_grad():
        next(state.model.parameters()).fill_(float("nan"))
    log = RunLog(tmp_path, enabled=True)
    try:
        check = Validation(TRAIN, build_dataset("digits", "test", None), log, tmp_path, 1, progress=False)
        state.step = 1
        check.evaluate_epoch(state, 0)
        state.step = TRAIN.epochs
        check.final(state, "digits")
    finally:
        log.close()
    assert _history(tmp_path)[0]["nll"] is None and not (tmp_path / FINAL_FILE).exists()
    assert "non-finite" in (tmp_path / "log.txt").read_text()


def test_sample_grids_are_bernoulli_means_for_binary_data():
    model = NVAE(dataclasses.replace(MODEL, decoder="bernoulli")).eval()
    grids = sample_grids(model, torch.Generator().manual_seed(0))
    assert sorted(grids) == list(TEMPERATURES) and all(g.shape == (16, 1, 8, 8) for g in grids.values())
    again = model.output_distribution(model.sample_logits(16, 0.7, torch.Generator().manual_seed(0))).mean()
    assert torch.equal(grids[0.7], again)
    assert not torch.all((grids[1.0] == 0) | (grids[1.0] == 1))   # means, not binary draws


# ------------------------------------------------------------------ the 30-step run
def test_the_run_logs_the_official_tags_grids_and_a_final_json(reference):
    acc = _events(reference)
    tags = acc.Tags()
    for tag in TAGS:
        # x = the epoch, as the official code logs them; the final evaluation at x = epochs
        assert [e.step for e in acc.Scalars(tag)] == [0, 1, 2, 3], tag
    for t in TEMPERATURES:
        assert [e.step for e in acc.Images(f"generated_{t:.1f}")] == [10, 20, 30]
        assert (reference / f"val_samples_t{t:.1f}.png").stat().st_size > 0
    assert "val/neg_log_p" in tags["scalars"]
    history = _history(reference)
    assert [(e["epoch"], e["step"], e["num_samples"]) for e in history] == [(0, 10, 2), (1, 20, 2), (2, 30, 2)]
    for e, logged in zip(history, acc.Scalars("val/bpd_log_p")):
        assert logged.value == pytest.approx(e["nll"] / (math.log(2) * MODEL.num_data_dims), rel=1e-6)
        assert e["bpd"] == pytest.approx(e["nll"] / (math.log(2) * 64))
    final = json.loads((reference / FINAL_FILE).read_text())
    assert {"checkpoint", "dataset", "split", "seed", "nll", "nelbo", "bpd", "bpd_elbo", "num_images",
            "num_samples", "units"} <= set(final)
    assert final["num_samples"] == 3 and final["step"] == 30 and final["epoch"] == 3
    assert all(math.isfinite(final[k]) for k in ("nll", "nelbo", "bpd", "bpd_elbo"))
    assert acc.Scalars("val/neg_log_p")[-1].value == pytest.approx(final["nll"], rel=1e-6)


def test_the_numbers_are_an_evaluation_of_the_models_weights_at_that_point(reference):
    """The final JSON and the last epoch's entry are :func:`evaluate` of the final checkpoint,
    with K = final_eval_samples and eval_samples, seeded by (seed, epoch)."""
    # as training runs it: with the default speed-ups (BN folded in evaluation)
    model = speedups.apply(NVAE.from_checkpoint(reference / "checkpoint.pt")).eval()
    data = build_dataset("digits", "test", None)
    for k, epoch, expected in ((3, 3, json.loads((reference / FINAL_FILE).read_text())),
                               (2, 2, _history(reference)[-1])):
        config = EvalConfig(num_samples=k, batch_size=TRAIN.batch_size, max_images=TRAIN.eval_max_images,
                            seed=derived_seed(VALIDATION_EVAL, TRAIN.seed, epoch))
        result = evaluate(model, data, config, progress=False)
        assert (result.nll, result.nelbo) == (expected["nll"], expected["nelbo"])


def test_validation_does_not_change_the_training(reference, tmp_path):
    """Same seed, deterministic: bit-identical weights, optimiser state and random streams without validation."""
    _run(tmp_path / "off", eval_every=0, final_eval_samples=0)
    assert not (tmp_path / "off" / HISTORY_FILE).exists() and not (tmp_path / "off" / FINAL_FILE).exists()
    on, off = _checkpoint(reference), _checkpoint(tmp_path / "off")
    assert on["step"] == off["step"] == 30
    for key, value in on["state_dict"].items():
        assert torch.equal(value, off["state_dict"][key]), key
    for i, group in on["optimizer"]["state"].items():
        for name, value in group.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(off["optimizer"]["state"][i][name]))
    for key in ("torch", "data"):
        assert torch.equal(on["rng"][0][key], off["rng"][0][key])


def test_with_an_ema_the_ema_weights_are_validated_and_the_trained_ones_kept(tmp_path):
    """ema_rate > 0: validation scores the EMA (what nvae eval reads by default) and puts the trained weights
    back bit for bit; the final JSON says which weights it scored."""
    _run(tmp_path / "on", ema_rate=0.9)
    _run(tmp_path / "off", ema_rate=0.9, eval_every=0, final_eval_samples=0)
    on, off = _checkpoint(tmp_path / "on"), _checkpoint(tmp_path / "off")
    for key, value in on["state_dict"].items():
        assert torch.equal(value, off["state_dict"][key]), key
    final = json.loads((tmp_path / "on" / FINAL_FILE).read_text())
    assert final["weights"] == "ema" and _history(tmp_path / "on")[-1]["weights"] == "ema"
    from nvae.training.run_dir import load_weights
    loaded = load_weights(tmp_path / "on" / "checkpoint.pt", "cpu", "ema")
    config = EvalConfig(num_samples=3, batch_size=TRAIN.batch_size, max_images=TRAIN.eval_max_images,
                        seed=derived_seed(VALIDATION_EVAL, TRAIN.seed, 3))
    result = evaluate(loaded.model, build_dataset("digits", "test", None), config, progress=False)
    assert (result.nll, result.nelbo) == (final["nll"], final["nelbo"])
    raw = evaluate(load_weights(tmp_path / "on" / "checkpoint.pt", "cpu", "raw").model,
                   build_dataset("digits", "test", None), config, progress=False)
    assert raw.nll != final["nll"]


# ------------------------------------------------------------------ resuming
def test_a_kill_mid_epoch_redoes_only_the_evaluations_after_the_checkpoint(reference, tmp_path):
    """Checkpoint at step 8, validation of epoch 0 at step 10, killed at step 15 with step 8 the last
    checkpoint on disk: the resumed run redoes epoch 0 (its steps are redone) and each epoch appears once."""
    run = tmp_path / "run"
    _run(run, max_steps=8)
    kept = tmp_path / "checkpoint_8.pt"
    shutil.copy(run / "checkpoint.pt", kept)
    _run(run, resume=True, max_steps=15)
    assert [e["epoch"] for e in _history(run)] == [0]
    shutil.copy(kept, run / "checkpoint.pt")             # what a SIGKILL at step 15 leaves
    _run(run, resume=True)
    assert _history(run) == _history(reference)          # the same epochs, bit for bit the same numbers
    assert json.loads((run / FINAL_FILE).read_text()) == {
        **json.loads((reference / FINAL_FILE).read_text()), "checkpoint": str(run / "checkpoint.pt")}


def test_a_signal_at_an_epoch_boundary_validates_that_epoch_when_resumed(reference, tmp_path, monkeypatch):
    """SIGTERM at step 10, the end of epoch 0: the run stops before validating; the resumed run
    validates epoch 0 first, and no epoch is evaluated twice or missed."""
    real_step, stops = train_module.train_step, []

    class Stop(train_module.StopSignal):     # what the SIGTERM handler records, at a chosen step
        def __enter__(self):
            stops.append(self)
            return super().__enter__()

    def step_then_signal(state, x, coeffs):
        out = real_step(state, x, coeffs)
        if state.step == PER_EPOCH:
            stops[-1].received = signal.SIGTERM
        return out

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_step", step_then_signal)
        patch.setattr(train_module, "StopSignal", Stop)
        with pytest.raises(TrainingInterrupted, match="SIGTERM at step 10"):
            _run(run)
    assert _checkpoint(run)["step"] == PER_EPOCH and not (run / HISTORY_FILE).exists()
    _run(run, resume=True)
    assert _history(run) == _history(reference)
    log = (run / "log.txt").read_text()
    assert [log.count(f"validation after epoch {e} ") for e in range(3)] == [1, 1, 1]
    assert [e.step for e in _events(run).Scalars("val/nelbo")] == [0, 1, 2, 3]
    # a finished run resumed again evaluates nothing more; asked for another K, only the final evaluation
    _run(run, resume=True)
    assert (run / "log.txt").read_text().count("validation") == log.count("validation")
    (run / "validation_final.partial.json").write_text("{damaged")   # partial sums it cannot continue
    _run(run, resume=True, final_eval_samples=4)
    assert json.loads((run / FINAL_FILE).read_text())["num_samples"] == 4
    assert "starting it over" in (run / "log.txt").read_text() and not (run / "validation_final.partial.json").exists()
    assert (run / "log.txt").read_text().count("validation after epoch") == 3


# ------------------------------------------------------------------ torchrun
@pytest.mark.slow   # two torchrun processes: ~20 s of CPU
def test_torchrun_validation_is_sharded_and_equals_one_process(tmp_path):
    """Two gloo processes: one run directory, and the final numbers those of a one-process evaluation."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    model = [f"--model={k}={v}" for k, v in dataclasses.asdict(MODEL).items()
             if v != getattr(NVAEConfig.preset("digits"), k)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nvae", "train", "--run-dir", str(run), "--epochs", "2", "--batch-size", "100",
           "--eval-every", "1", "--eval-samples", "2", "--final-eval-samples", "2", "--train", "warmup_epochs=1",
           "--train", "image_every=1000", *model]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [e["step"] for e in _history(run)] == [7, 14]          # 750 images per process: 7 steps per epoch
    final = json.loads((run / FINAL_FILE).read_text())
    assert final["num_images"] == 297                             # 3 batches of the test split over 2 processes
    one = evaluate(NVAE.from_checkpoint(run / "checkpoint.pt").eval(), build_dataset("digits", "test", None),
                   EvalConfig(num_samples=2, batch_size=100, seed=derived_seed(VALIDATION_EVAL, TRAIN.seed, 2)),
                   progress=False)
    assert (final["nll"], final["nelbo"]) == pytest.approx((one.nll, one.nelbo), rel=1e-9)
