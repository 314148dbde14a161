"""nvae.analysis.likelihood: the importance-weighted estimator against a model whose log-likelihood is
known exactly; evaluation over a split; and evaluation over several processes and resumed after an
interruption (`nvae eval`).

Every batch draws from its own generator, seeded from (seed, batch index), so its numbers
depend neither on the process that evaluates it nor on whether earlier batches ran in the
same run: two gloo processes, and an interrupted run resumed from its partial file, must
give what one uninterrupted process gives. Workers run with one thread each, as in
tests/test_distributed.py.
"""
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal
from torch.utils.data import Dataset, TensorDataset

import nvae.data
from conftest import REFERENCE, needs_shared
from gloo import WORLD, spawn
from nvae import NVAE, NVAEConfig
from nvae.analysis.likelihood import EvalConfig, PartialFile, evaluate, partial_path_for
from nvae.cli import main
from nvae.distributed import DistributedContext, init_distributed
from nvae.model.network import iw_bound


@pytest.fixture(autouse=True)
def _one_thread(_seed):
    """One thread (after conftest's choice): these tiny models run ~7x slower on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the estimator
# Linear-Gaussian latent model: z ~ N(0, 1), x | z ~ N(a z, s^2)  =>  p(x) = N(0, a^2 + s^2).
A, S = 2.0, 0.5


def log_weights(x, k, gen, q_shift=0.3, q_scale=1.3):
    """log p(x, z_k) - log q(z_k | x) under a deliberately imperfect Gaussian q."""
    post_var = 1 / (1 + A * A / S ** 2)
    post_mean = post_var * A * x / S ** 2
    q = Normal(post_mean + q_shift, math.sqrt(post_var) * q_scale)
    z = q.mean + q.stddev * torch.randn((k,) + x.shape, generator=gen, dtype=torch.float64)
    return Normal(0.0, 1.0).log_prob(z) + Normal(A * z, S).log_prob(x) - q.log_prob(z)


def test_iw_bound_converges_to_the_exact_log_likelihood():
    x = torch.tensor([-1.5, 0.2, 2.5], dtype=torch.float64)
    truth = Normal(0.0, math.sqrt(A * A + S * S)).log_prob(x)
    gen = torch.Generator().manual_seed(0)
    gaps = []
    for k in (1, 10, 10_000):
        # many independent repetitions estimate the bound's expectation and its standard error
        reps = torch.stack([iw_bound(log_weights(x, k, gen)) for _ in range(400 if k < 10_000 else 20)])
        est, se = reps.mean(0), reps.std(0) / math.sqrt(len(reps))
        assert torch.all(est <= truth + 4 * se + 1e-9), (k, est, truth)   # a lower bound in expectation
        gaps.append((truth - est).max().item())
    assert gaps[0] > gaps[1] > 0.01                                     # tighter with more samples
    assert abs(gaps[2]) < 5e-3                                          # and converges to the truth


def test_k_equal_one_is_the_elbo_in_expectation():
    x = torch.tensor([0.7], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    one = torch.stack([iw_bound(log_weights(x, 1, gen)) for _ in range(20_000)])
    # ELBO in closed form for Gaussians: E_q[log p(x|z)] + E_q[log p(z)] + H[q]
    post_var = 1 / (1 + A * A / S ** 2)
    m, v = post_var * A * 0.7 / S ** 2 + 0.3, post_var * 1.3 ** 2
    elbo = (-0.5 * math.log(2 * math.pi * S ** 2) - ((0.7 - A * m) ** 2 + A * A * v) / (2 * S ** 2)
            - 0.5 * math.log(2 * math.pi) - (m * m + v) / 2 + 0.5 * math.log(2 * math.pi * math.e * v))
    assert one.mean().item() == pytest.approx(elbo, abs=4 * one.std().item() / math.sqrt(len(one)))


# ------------------------------------------------------------------ evaluation over a split
def test_evaluate_reports_consistent_units():
    cfg = NVAEConfig.preset("mnist_small", num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2)
    model = NVAE(cfg).eval()
    data = TensorDataset(torch.rand(5, 1, 32, 32))
    r = evaluate(model, data, EvalConfig(num_samples=4, batch_size=2), generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert r.num_images == 5 and r.data_dims == 28 * 28
    assert r.nll <= r.nelbo + 1e-6 * abs(r.nelbo) or r.nll < r.nelbo + 5.0
    assert r.bpd == pytest.approx(r.nll / (math.log(2) * 784))
    assert r.to_dict()["units"]["nll"] == "nats/image"


@needs_shared("reference", "mnist_tiny")
def test_evaluate_on_official_fixture_agrees_with_official_runs():
    model = NVAE.from_official(REFERENCE / "mnist_tiny" / "checkpoint.pt")
    ref = torch.load(REFERENCE / "mnist_tiny" / "reference.pt", weights_only=True)
    # the fixture batch is already binary: Bernoulli re-binarisation leaves 0/1 unchanged
    r = evaluate(model, TensorDataset(ref["x"]), EvalConfig(num_samples=100, batch_size=8),
                 generator=torch.Generator().manual_seed(3), progress=False)
    runs = ref["iw_nll_K100_runs"].double()
    spread = (runs.max(0).values - runs.min(0).values).mean().item()
    assert abs(r.nll - runs.mean().item()) < max(4 * spread, 5.0)


# ------------------------------------------------------------------ resumable and distributed evaluation
N_IMAGES = 9          # odd: batches of 2, 2, 2, 2, 1; rank 0 takes three of them, rank 1 two
BATCH = 2
K = 3
SEED = 5
CLI_ARGS = ["--dataset", "digits", "-k", "2", "--max-images", "9", "--batch-size", "2", "--save-every", "1",
            "--seed", "3"]


def _model(**over) -> NVAE:
    torch.manual_seed(0)
    return NVAE(NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4, **over)).eval()


def _images(n: int = N_IMAGES) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.floor(torch.rand(n, 1, 8, 8, generator=g) * 16) / 15   # 4-bit, as the digits preset


class _Reads(Dataset):
    """Images that remember which indices were read, and fail ("crash") from index ``fail_at`` on."""

    def __init__(self, images: torch.Tensor, fail_at: int = None):
        self.images, self.fail_at, self.seen = images, fail_at, []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise RuntimeError(f"simulated crash reading image {i}")
        self.seen.append(int(i))
        return (self.images[i],)


def _eval(model, data, partial=None, resume=False, identity=None, dist_ctx=DistributedContext(), **kw):
    config = EvalConfig(**{"num_samples": K, "batch_size": BATCH, "seed": SEED, **kw})
    resumable = PartialFile(partial, resume, identity) if partial is not None else None
    return evaluate(model, data, config, dist_ctx=dist_ctx, partial=resumable, progress=False)


def _interrupt(model, images, partial, **kw):
    """Crash while reading image 7 (batch 3) with partial sums every 2 batches: batches 0-1 are saved."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        _eval(model, _Reads(images, fail_at=7), partial=partial, save_every=2, **kw)
    state = json.loads(Path(partial).read_text())
    assert state["batches_done"] == 2 and state["images_done"] == 4 and len(state["batch_nll_sums"]) == 2
    return state


# ------------------------------------------------------------------ one process
def test_the_progress_bar_moves_with_every_chunk_of_samples(monkeypatch):
    # A batch at K = 1000 takes minutes: the bar must move (and so show an ETA) within the first batch, once per
    # chunk of samples, and end at every image. Here 5 images in batches of 2 (2, 2, 1) at K = 3, passes of 2 images.
    import tqdm

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": open(os.devnull, "w")})
            self.steps = []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    config = EvalConfig(num_samples=K, batch_size=BATCH, seed=SEED, max_batch=BATCH, save_every=1)
    result = evaluate(_model(), TensorDataset(_images(5)), config, progress=True)
    bar, = bars
    # counted in samples (images x K) and shown in images: the first batch's 2 images move it 3 times by 2 samples
    assert bar.total == 5 * K and bar.unit_scale == pytest.approx(1 / K) and bar.unit == "img"
    # (the last batch's one image takes 2 samples per pass of 2: chunks of 2 and 1)
    assert bar.steps == [2] * K + [2] * K + [2, 1] and bar.n == 5 * K
    shown = bar.format_meter(4, bar.total, 1.0, unit=bar.unit, unit_scale=bar.unit_scale, bar_format=bar.bar_format)
    assert " 1.3/5 [" in shown and "img/s" in shown   # 4 samples of 3 per image: 1.3 images of 5
    assert result.num_images == 5


@pytest.mark.parametrize("decoder", ["mixture", "bernoulli"])
def test_an_interrupted_evaluation_resumes_to_the_same_numbers(tmp_path, decoder):
    model, images = _model(decoder=decoder), _images()
    whole = _eval(model, TensorDataset(images))
    assert whole.num_images == N_IMAGES
    partial = tmp_path / "eval.partial.json"
    _interrupt(model, images, partial)
    reads = _Reads(images)
    resumed = _eval(model, reads, partial=partial, resume=True, save_every=2)
    assert resumed == whole                               # bit for bit: every field equal
    assert reads.seen == list(range(4, N_IMAGES))         # the finished batches are not evaluated again
    assert not partial.exists()                           # removed once the result is complete
    # writing partial sums on the way changes nothing either
    assert _eval(model, TensorDataset(images), partial=partial, save_every=1) == whole and not partial.exists()


def test_a_partial_file_of_other_arguments_is_refused(tmp_path, caplog):
    model, images = _model(), _images()
    data = TensorDataset(images)
    whole = _eval(model, data)
    partial = tmp_path / "eval.partial.json"
    _interrupt(model, images, partial, identity={"split": "test"})
    saved = partial.read_text()
    other_weights = _model()
    with torch.no_grad():
        next(other_weights.parameters()).add_(1e-3)
    cases = {"num_samples": dict(num_samples=K + 1), "seed": dict(seed=SEED + 1),
             "num_images": dict(max_images=8), "batch_size": dict(batch_size=3),
             "split": dict(identity={"split": "train"}), "max_batch": dict(max_batch=4)}
    for field, kw in cases.items():
        with pytest.raises(ValueError, match=f"other arguments.*{field}"):
            _eval(model, data, partial=partial, resume=True, **{"identity": {"split": "test"}, **kw})
    with pytest.raises(ValueError, match="model_sha256"):
        _eval(other_weights, data, partial=partial, resume=True, identity={"split": "test"})
    assert partial.read_text() == saved                   # a refusal leaves the file alone

    # without resume it is not used either: a warning, a fresh start, the file replaced and then removed
    with caplog.at_level(logging.WARNING, logger="nvae.analysis.likelihood"):
        fresh = _eval(model, data, num_samples=K, partial=partial, resume=False, identity={"split": "train"})
    assert "starting over" in caplog.text
    assert not partial.exists()
    assert fresh == whole

    partial.write_text('{"format": "nvae-eval-partial", "version": 1, "args": ')   # torn or truncated
    with pytest.raises(ValueError, match="cannot read"):
        _eval(model, data, partial=partial, resume=True)
    # a resume with nothing to resume starts from the beginning
    partial.unlink()
    assert _eval(model, data, partial=partial, resume=True) == whole


def test_a_resumable_evaluation_needs_a_seed(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        evaluate(_model(), TensorDataset(_images()), EvalConfig(num_samples=K),
                 partial=PartialFile(tmp_path / "p.json"),
                 progress=False)


def test_the_partial_file_sits_beside_the_output():
    assert partial_path_for("runs/a/eval_test_K1000.json") == Path("runs/a/eval_test_K1000.partial.json")
    assert partial_path_for("out") == Path("out.partial.json")


def test_cli_eval_resumes_an_interrupted_run(tmp_path, monkeypatch, capsys):
    _model().save(tmp_path / "checkpoint.pt")
    ckpt, ref, out = str(tmp_path / "checkpoint.pt"), tmp_path / "ref.json", tmp_path / "out.json"
    partial = tmp_path / "out.partial.json"
    assert main(["eval", ckpt, *CLI_ARGS, "--output", str(ref)]) == 0
    assert not (tmp_path / "ref.partial.json").exists()

    real = nvae.data.build_dataset
    with monkeypatch.context() as patch:   # a crash while reading image 5 (batch 2): batches 0-1 are saved
        patch.setattr(nvae.data, "build_dataset", lambda *a, **kw: _Reads(real(*a, **kw).tensors[0], fail_at=5))
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(["eval", ckpt, *CLI_ARGS, "--output", str(out), "--resume"])
    assert json.loads(partial.read_text())["images_done"] == 4 and not out.exists()
    capsys.readouterr()

    assert main(["eval", ckpt, *CLI_ARGS, "-k", "3", "--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "other arguments" in err and "num_samples: 2 there, 3 now" in err and partial.exists()

    assert main(["eval", ckpt, *CLI_ARGS, "--output", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "4 of 9 images done" in captured.err
    assert json.loads(captured.out) == json.loads(out.read_text()) == json.loads(ref.read_text())
    assert not partial.exists()


# ------------------------------------------------------------- two processes
def _worker(rank: int, tmp: str, one_process_partial: str) -> dict:
    # One spawn for every check: starting two interpreters costs more than the evaluations.
    tmp = Path(tmp)
    ctx = init_distributed("cpu")
    assert ctx.world_size == WORLD and ctx.rank == rank
    model, reads = _model(), _Reads(_images())
    fresh = _eval(model, reads, dist_ctx=ctx, partial=tmp / "two.partial.json", save_every=1)
    left = (tmp / "two.partial.json").exists()
    resumed = _eval(model, TensorDataset(_images()), dist_ctx=ctx, partial=one_process_partial, resume=True,
                    save_every=1)
    rc = main(["eval", str(tmp / "checkpoint.pt"), *CLI_ARGS, "--output", str(tmp / "two.json"), "--resume"])
    return {"fresh": asdict(fresh), "seen": reads.seen, "partial_left": left, "resumed": asdict(resumed), "rc": rc}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, one thread: the numbers, a partial file of an interrupted run, the CLI's JSON."""
    tmp = tmp_path_factory.mktemp("eval_gloo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        whole = _eval(model, TensorDataset(_images()))
        _interrupt(model, _images(), tmp / "one.partial.json")
        model.save(tmp / "checkpoint.pt")
        assert main(["eval", str(tmp / "checkpoint.pt"), *CLI_ARGS, "--output", str(tmp / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "whole": asdict(whole), "cli": json.loads((tmp / "one.json").read_text())}


@pytest.fixture(scope="module")
def ranks(reference) -> list:
    tmp = reference["tmp"]
    return spawn(_worker, tmp, str(tmp), str(tmp / "one.partial.json"))


def _close(a: dict, b: dict) -> None:
    assert a["num_images"] == b["num_images"] == N_IMAGES and a["num_samples"] == b["num_samples"]
    for key in ("nll", "nelbo", "bpd", "bpd_elbo"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), key


def test_two_processes_evaluate_every_image_once_and_agree_with_one(ranks, reference):
    # strided batches: rank 0 holds batches 0, 2, 4 (the short one), rank 1 batches 1, 3
    assert ranks[0]["seen"] == [0, 1, 4, 5, 8] and ranks[1]["seen"] == [2, 3, 6, 7]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(N_IMAGES))
    _close(ranks[0]["fresh"], reference["whole"])
    assert ranks[0]["fresh"] == ranks[1]["fresh"]           # all-reduced: every rank returns the same
    assert not ranks[0]["partial_left"]


def test_two_processes_continue_a_partial_file_of_one(ranks, reference):
    assert not (reference["tmp"] / "one.partial.json").exists()
    for r in ranks:
        _close(r["resumed"], reference["whole"])


def test_cli_eval_over_two_processes_writes_one_result(ranks, reference):
    assert [r["rc"] for r in ranks] == [0, 0]
    two = json.loads((reference["tmp"] / "two.json").read_text())
    one = reference["cli"]
    assert two.keys() == one.keys() and two["num_images"] == 9
    _close(two, one)
    assert not (reference["tmp"] / "two.partial.json").exists()
