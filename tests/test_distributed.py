"""Data-parallel training (nvae.distributed): synchronised BN, DDP steps and `torchrun -m nvae train`.

Two CPU processes over gloo, each with half of a fixed batch, must compute what
one process computes with the whole batch. Workers run with one thread each:
two processes x two OpenMP threads on two cores stall badly.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from gloo import WORLD, spawn
from nvae import NVAE, NVAEConfig, speedups
from nvae.distributed import (DistributedContext, SyncBatchNorm2d, convert_sync_batchnorm, init_distributed,
                              torchrun_env, wrap_model)
from nvae.model.layers import batch_norm
from nvae.speedups.memory import frozen_batch_statistics
from nvae.training.objective import kl_balance_alpha
from nvae.training.state import TrainState
from nvae.training.step import Coefficients, train_step

# Uneven shares on purpose: the global statistics must weight each process by its count.
BN_SPLIT = (3, 5)
STEPS = 3
LR = 1e-2
BATCH = 8


def _worker(rank: int) -> dict:
    # One spawn for every multi-process check: starting two interpreters costs more than the checks.
    return {"bn": _bn_worker(rank), "plain": _ddp_worker(rank, False), "checkpointing": _ddp_worker(rank, True)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    """What each of the two gloo processes computed."""
    return spawn(_worker, tmp_path_factory.mktemp("gloo"))


# ------------------------------------------------------------- SyncBatchNorm2d
def _bn_data():
    g = torch.Generator().manual_seed(3)
    # Offset and scaled, so that sum-of-squares statistics meet a non-trivial mean.
    x = 3.0 + 2.0 * torch.randn(sum(BN_SPLIT), 5, 4, 4, generator=g)
    upstream = torch.randn(x.shape, generator=g)
    weight = 1.0 + 0.1 * torch.arange(5.0)
    bias = 0.05 * torch.arange(5.0)
    return x, upstream, weight, bias


def _init_bn(bn, weight, bias):
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    return bn


def _bn_worker(rank: int) -> dict:
    x, upstream, weight, bias = _bn_data()
    start = sum(BN_SPLIT[:rank])
    part = slice(start, start + BN_SPLIT[rank])
    bn = _init_bn(SyncBatchNorm2d(5), weight, bias).train()
    x_local = x[part].clone().requires_grad_(True)
    out = bn(x_local)
    (out * upstream[part]).sum().backward()
    first = {"out": out.detach(), "x_grad": x_local.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
             "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
             "tracked": bn.num_batches_tracked.clone()}
    # frozen statistics (a checkpointed cell's recomputation): same output, running stats untouched.
    with frozen_batch_statistics(bn):
        again = bn(x[part].contiguous(memory_format=torch.channels_last))
    still = {"out_no_update": again.detach(), "running_mean_after": bn.running_mean.clone(),
             "running_var_after": bn.running_var.clone(), "tracked_after": bn.num_batches_tracked.clone()}
    bn.eval()
    ctx = init_distributed("cpu")
    return {**first, **still, "eval_out": bn(x[part]).detach(), "any": ctx.any(rank == 1),
            "none": ctx.any(False), "mean": ctx.mean(torch.tensor([float(rank)])),
            "from_main": ctx.from_main({"rank": rank, "seen": [rank] * 3} if rank == 0 else None)}


def test_sync_batchnorm_equals_batchnorm_on_the_concatenated_batch(ranks):
    x, upstream, weight, bias = _bn_data()
    ref = _init_bn(batch_norm(5), weight, bias).train()
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    (out * upstream).sum().backward()
    ranks = [r["bn"] for r in ranks]

    tol = dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), out.detach(), **tol)
    assert torch.allclose(torch.cat([r["x_grad"] for r in ranks]), xr.grad, **tol)
    # each process holds the gradient of its own images' loss; DDP would sum (and average) them
    assert torch.allclose(sum(r["w_grad"] for r in ranks), ref.weight.grad, **tol)
    assert torch.allclose(sum(r["b_grad"] for r in ranks), ref.bias.grad, **tol)
    for r in ranks:
        # running averages move by momentum 0.05 towards the global mean and unbiased variance
        assert torch.allclose(r["running_mean"], ref.running_mean, **tol)
        assert torch.allclose(r["running_var"], ref.running_var, **tol)
        assert int(r["tracked"]) == int(ref.num_batches_tracked) == 1
        assert torch.equal(r["running_mean_after"], r["running_mean"])
        assert torch.equal(r["running_var_after"], r["running_var"])
        assert int(r["tracked_after"]) == 1
        assert r["any"] is True and r["none"] is False
        assert float(r["mean"]) == 0.5
        assert r["from_main"] == {"rank": 0, "seen": [0, 0, 0]}   # rank 0's object, on every process
    assert torch.allclose(torch.cat([r["out_no_update"] for r in ranks]), out.detach(), **tol)
    ref.eval()
    assert torch.allclose(torch.cat([r["eval_out"] for r in ranks]), ref(x).detach(), **tol)


def test_sync_batchnorm_alone_is_plain_batchnorm():
    """Without a process group (one process) it is plain BatchNorm2d, frozen statistics included."""
    x = 1.0 + torch.randn(6, 3, 4, 4)
    a, b = batch_norm(3), SyncBatchNorm2d(3)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.running_var, b.running_var) and int(b.num_batches_tracked) == 1
    with frozen_batch_statistics(b):
        b(x + 1)
    assert torch.equal(a.running_mean, b.running_mean)


def test_convert_sync_batchnorm_keeps_weights_keys_and_the_bn_regulariser():
    model = NVAE(NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    bn_loss = model.batchnorm_loss()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    assert convert_sync_batchnorm(model) is model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == n_bn > 0 and all(type(m) is SyncBatchNorm2d for m in bns)
    assert all(m.momentum == 0.05 and m.eps == 1e-5 for m in bns)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # the same parameter tensors: an optimiser built before the conversion still applies
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert torch.equal(model.batchnorm_loss(), bn_loss)


def test_torchrun_environment_detection():
    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    assert torchrun_env({"RANK": "0"}) is None          # partial: not torchrun
    with pytest.raises(ValueError):
        torchrun_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    # no torchrun (or one process): nothing is initialised, the device is kept
    ctx = init_distributed("cpu", environ={})
    assert ctx == DistributedContext() and not ctx.enabled and ctx.is_main and not dist.is_initialized()
    ctx = init_distributed("cpu", environ={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not ctx.enabled and not dist.is_initialized()
    obj = {"history": [1, 2]}
    assert ctx.from_main(obj) is obj and DistributedContext().from_main(None) is None   # one process: itself


# -------------------------------------------------------- DDP training steps
def _tiny_config():
    return NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4)


def _batch():
    g = torch.Generator().manual_seed(11)
    return torch.floor(torch.rand(BATCH, 1, 8, 8, generator=g) * 16) / 15   # 4-bit images, as the digits preset


class _PosteriorMeans:
    """``nvae_loss``'s view of a model whose forward takes every z at its posterior mean.

    The posterior noise is drawn per process with the local batch's shape, so it
    cannot match a single-process draw; at temperature 0 the loss is deterministic
    (the KL stays analytic, so every term has its gradient). ``poison`` adds an
    infinite constant to the reconstruction loss: a non-finite loss whose
    gradients stay finite.
    """

    def __init__(self, net, poison: bool = False):
        self.net, self.poison = net, poison

    def __call__(self, x, generator=None):
        out = self.net(x, temperature=0.0)
        return out._replace(recon=out.recon + float("inf")) if self.poison else out

    def buffers(self):
        return self.net.buffers()

    def spectral_loss(self):
        return self.net.spectral_loss()

    def batchnorm_loss(self):
        return self.net.batchnorm_loss()

    def parameters(self):
        return self.net.parameters()


def _run_steps(net, model, x, dist_ctx=DistributedContext()):
    opt = torch.optim.Adamax(model.parameters(), lr=LR, eps=1e-3, weight_decay=3e-4)
    # beta = 1: KL balancing (per-process batch means, as the official code) is off.
    coeffs = Coefficients(1.0, 1e-2, kl_balance_alpha(model.config.groups_per_scale))
    state = TrainState(model, opt, net=_PosteriorMeans(net), dist=dist_ctx)
    net.train()
    log = []
    for _ in range(STEPS):
        out, grad_norm, stepped = train_step(state, x, coeffs)
        log.append((out.nelbo.detach(), float(grad_norm), stepped))
    return {"nelbo": torch.stack([n for n, _, _ in log]), "grad_norm": torch.tensor([g for _, g, _ in log]),
            "stepped": all(s for _, _, s in log), "state": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": opt}


def _ddp_worker(rank: int, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    model = speedups.apply(NVAE(_tiny_config()), checkpointing=checkpointing)
    dist_ctx = init_distributed("cpu")
    net = wrap_model(model, dist_ctx)
    half = BATCH // WORLD
    x = _batch()[rank * half:(rank + 1) * half]
    result = _run_steps(net, model, x, dist_ctx)
    # Only process 1's loss is non-finite (its gradients, and so the averaged ones, are
    # finite): the skip must still be collective, or the replicas would part ways.
    before = [p.detach().clone() for p in model.parameters()]
    state = TrainState(model, result.pop("opt"), net=_PosteriorMeans(net, poison=rank == 1), dist=dist_ctx)
    _, _, stepped = train_step(state, x, Coefficients(1.0, 1e-2, None))
    result["poisoned_step_taken"] = stepped
    result["weights_unchanged"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return result


@pytest.fixture(scope="module")
def single():
    """Three steps of one process with the whole batch."""
    threads = torch.get_num_threads()
    # One thread, as the workers: two threads on a busy two-core machine can take 100x longer.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = NVAE(_tiny_config())
        result = _run_steps(model, model, _batch())
    finally:
        torch.set_num_threads(threads)
    result.pop("opt")
    return result


@pytest.mark.parametrize("variant", ["plain", "checkpointing"])
def test_two_processes_train_like_one_with_the_whole_batch(ranks, single, variant):
    ranks = [r[variant] for r in ranks]
    ref = single["state"]
    assert single["stepped"] and all(r["stepped"] for r in ranks)
    # per-image NELBO: process r holds images r*B/2 ... (r+1)*B/2 - 1 of every step
    nelbo = torch.cat([r["nelbo"] for r in ranks], dim=1)
    assert torch.allclose(nelbo, single["nelbo"], rtol=1e-5, atol=1e-4)
    for r in ranks:
        assert torch.allclose(r["grad_norm"], single["grad_norm"], rtol=1e-5)
    # the replicas agree bit for bit: the same averaged gradients, the same updates
    for k in ref:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
    state = ranks[0]["state"]
    assert list(state) == list(ref)   # SyncBatchNorm2d keeps the state-dict keys
    # Weights, BN running statistics and power-iteration vectors, to float tolerance:
    # one process alone differs by ~5e-6 between 1 and 2 threads (summation order,
    # amplified by Adamax's g / (|g| + 1e-3)); per-process BN statistics instead of
    # synchronised ones would differ by ~4e-2.
    for k in ref:
        if ref[k].is_floating_point():
            assert torch.allclose(state[k], ref[k], rtol=1e-4, atol=2e-5), \
                f"{k}: max difference {(state[k] - ref[k]).abs().max().item():.2e}"
        else:
            assert torch.equal(state[k], ref[k]), k


def test_a_non_finite_loss_on_one_process_skips_the_step_on_all(ranks):
    for r in ranks:
        assert r["plain"]["poisoned_step_taken"] is False and r["plain"]["weights_unchanged"] is True


# ------------------------------------------------------------------ torchrun
def test_torchrun_two_processes_write_one_run(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "nvae", "train", "--max-steps", "2", "--batch-size", "8", "--run-dir", str(run),
           "--model", "num_channels_enc=4", "--model", "num_channels_dec=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone writes: one run directory (nothing else under cwd), one checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert len(list(run.glob("checkpoint*.pt"))) == 1 and len(list(run.glob("events.out.tfevents.*"))) == 1
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and saved["world_size"] == WORLD
    log = (run / "log.txt").read_text()
    assert log.count("step 2 nelbo") == 1 and "global batch 16" in log
    NVAE.from_checkpoint(run / "checkpoint.pt")   # loads into a plain model


def _torchrun(cwd, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "nvae", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_resume_continues_every_process_exactly(tmp_path):
    """Each process's random streams and data share are restored: resumed == uninterrupted, bit for bit."""
    common = ["--batch-size", "8", "--deterministic", "--model", "num_channels_enc=4", "--model",
              "num_channels_dec=4", "--checkpoint-every", "2"]
    _torchrun(tmp_path, "--run-dir", str(tmp_path / "whole"), "--max-steps", "4", *common)
    _torchrun(tmp_path, "--run-dir", str(tmp_path / "parts"), "--max-steps", "2", *common)
    _torchrun(tmp_path, "--resume", str(tmp_path / "parts"), "--max-steps", "4")
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert whole["step"] == parts["step"] == 4 and len(parts["rng"]) == WORLD
    assert not torch.equal(parts["rng"][0]["data"], parts["rng"][1]["data"])   # a stream per process
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, parts["state_dict"][key]), key
