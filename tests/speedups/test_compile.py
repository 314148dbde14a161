"""The training loss and the importance-weighted evaluation's inner pass trace whole under ``torch.compile``
(:mod:`nvae.speedups.compile`): one graph, no graph break (``torch._dynamo.explain``), for a small model of every
preset's structure, plain and with each memory option, in fp32 and under bf16 autocast; compiled and eager give the
same numbers; ``nvae train --compile`` and ``nvae eval --compile`` run compiled.

The quick checks trace with dynamo alone (``explain``, or a backend that runs dynamo's graph as it is); the whole
matrix, AOTAutograd's backward and inductor's code are slow (``-m slow``).
"""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from nvae import NVAE, PRESETS, NVAEConfig, speedups
from nvae.analysis.likelihood import EvalConfig, PartialFile, _EvalRun, _write_partial
from nvae.cli import main
from nvae.distributed import DistributedContext
from nvae.speedups import Speedups
from nvae.speedups import compile as nvae_compile
from nvae.training.objective import kl_balance_alpha, nvae_loss


def small(name: str) -> NVAEConfig:
    """A 4-channel model of preset ``name``'s structure (decoder, colour channels, latent scales, flows, crop, bit
    depth) with one cell where the preset has several (two in the pre- and post-process blocks, to keep every cell
    role), the fewest groups, and the smallest image its scales allow (a 2x2 coarsest map)."""
    base = NVAEConfig.preset(name)
    return NVAEConfig.preset(name, num_channels_enc=4, num_channels_dec=4, num_latent_per_group=2,
                             num_groups_per_scale=2 if base.num_latent_scales == 1 else 1, min_groups_per_scale=1,
                             num_preprocess_cells=2, num_postprocess_cells=2, num_cell_per_cond_enc=1,
                             num_cell_per_cond_dec=1, image_size=2 * base.downsampling)


#: small config -> the presets of that structure
STRUCTURES = {}
for _name in PRESETS:
    STRUCTURES.setdefault(small(_name), []).append(_name)

#: memory option -> (speed-ups, channels-last model and inputs)
OPTIONS = {
    "plain": (speedups.PLAIN, False),
    "default": (speedups.DEFAULT, False),   # what training runs with: forward weights, small-map depthwise, folded
    "forward_weights": (Speedups(forward_weights=True, small_map_depthwise=False, folded_eval=False), False),
    "small_map_depthwise": (Speedups(forward_weights=False, small_map_depthwise=True, folded_eval=False), False),
    "folded_eval": (Speedups(forward_weights=False, small_map_depthwise=False, folded_eval=True), False),
    "recompute_bn": (Speedups(recompute_bn=True), False),
    "checkpointing": (Speedups(checkpointing=True), False),
    "channels_last": (speedups.DEFAULT, True),
    "all": (Speedups(recompute_bn=True, checkpointing=True), True),
}

#: What CI traces: the default preset's structure plain, and one with flows and colour with every option in bf16.
QUICK = {("digits", "plain", "fp32"), ("cifar10", "all", "bf16")}


def _cases():
    """(structure, option, precision): every structure plain in fp32 and with all options in bf16; every option
    alone, in both precisions, on the structure with the most scales and flows at a modest size (celeba64)."""
    cases = [(names, option, precision) for names in STRUCTURES.values()
             for option, precision in (("plain", "fp32"), ("all", "bf16"))]
    celeba = next(names for names in STRUCTURES.values() if "celeba64" in names)
    cases += [(celeba, option, precision) for option in OPTIONS for precision in ("fp32", "bf16")
              if (option, precision) not in (("plain", "fp32"), ("all", "bf16"))]
    return [pytest.param(small(names[0]), option, precision, id=f"{'+'.join(names)}-{option}-{precision}",
                         marks=() if any((n, option, precision) in QUICK for n in names) else pytest.mark.slow)
            for names, option, precision in cases]


CASES = _cases()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces afresh (dynamo's caches are per code object, shared by every model)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """A ``torch.compile`` backend that runs dynamo's graphs as they are (no AOTAutograd, no code) and keeps them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def batch(cfg: NVAEConfig, n: int = 3, seed: int = 0) -> torch.Tensor:
    """``n`` images as training feeds them: binary for the Bernoulli decoder, on the ``num_x_bits`` grid otherwise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    if cfg.decoder == "bernoulli":
        return torch.bernoulli(x, generator=g)
    levels = 2 ** cfg.num_x_bits - 1
    return torch.round(x * levels) / levels


def build(cfg: NVAEConfig, option: str = "plain"):
    """A model with ``option`` switched on, in training mode, and a batch for it."""
    torch.manual_seed(0)
    switches, channels_last = OPTIONS[option]
    model, x = speedups.apply(NVAE(cfg), switches).train(), batch(cfg)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def one_graph(fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` traces as one graph without a break, by ``torch._dynamo.explain``."""
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [f"{b.reason} (at {b.user_stack[-1].filename}:{b.user_stack[-1].lineno})" if b.user_stack
               else str(b.reason) for b in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
    assert explained.op_count > 100   # the whole pass is in the graph, not run beside it


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------ no graph break
def test_every_preset_has_a_structure_under_test():
    assert sorted(n for names in STRUCTURES.values() for n in names) == sorted(PRESETS)
    assert len(STRUCTURES) >= 6   # Bernoulli and mixture decoders, grey and colour, 1 to 5 scales, 0 to 2 flows
    assert {p.values[0] for p in CASES} == set(STRUCTURES)


@pytest.mark.parametrize("cfg,option,precision", CASES)
def test_the_training_loss_traces_whole(cfg, option, precision):
    """nvae_loss (posterior pass, balanced KL, spectral and BN regularisers) as a compiled step traces it."""
    model, x = build(cfg, option)
    alpha = kl_balance_alpha(cfg.groups_per_scale)
    assert nvae_compile.pending_initialisation(model, 1e-2)
    nvae_loss(model, x, 0.5, 1e-2, alpha)   # the first step's one-time initialisations, eagerly
    assert not nvae_compile.pending_initialisation(model, 1e-2)
    with autocast(precision), nvae_compile.as_initialised(model):
        one_graph(nvae_loss, model, x, 0.5, 1e-2, alpha, True)


@pytest.mark.parametrize("cfg,option,precision", CASES)
def test_the_evaluation_pass_traces_whole(cfg, option, precision):
    """NVAE.posterior_pass, one chunk of the importance sampling, fed eps drawn outside the graph."""
    model, x = build(cfg, option)
    model.eval()
    with torch.no_grad(), autocast(precision):
        bottom_up = model.encode(x)
        noise = nvae_compile.posterior_noise(model, x.shape[0], x.device, torch.Generator().manual_seed(0))
        one_graph(model.posterior_pass, x, bottom_up, noise=noise)


def test_data_initialised_convolutions_trace_once_initialised():
    """res_elu cells initialise from the first batch (a buffer records it): pending until then, traced whole after,
    and the model is as it was once the traced view ends."""
    model, x = build(NVAEConfig.preset("digits", arch_instance="res_elu", num_channels_enc=4, num_channels_dec=4,
                                       num_groups_per_scale=1, num_latent_per_group=2, num_cell_per_cond_enc=1,
                                       num_cell_per_cond_dec=1))
    alpha = kl_balance_alpha(model.config.groups_per_scale)
    convs = [m for m in model.modules() if getattr(m, "data_init", False)]
    assert convs and nvae_compile.pending_initialisation(model, 0.0)
    nvae_loss(model, x, 0.5, 0.0, alpha)
    assert all(bool(m.init_done) for m in convs) and not nvae_compile.pending_initialisation(model, 0.0)
    with nvae_compile.as_initialised(model):
        one_graph(nvae_loss, model, x, 0.5, 0.0, alpha, True)
    assert all(m.data_init for m in convs)


def test_a_generator_is_what_would_break_the_evaluation_pass():
    """Drawing from a torch.Generator inside the pass cannot compile whole: why the eps are drawn outside."""
    model, x = build(small("digits"))
    model.eval()
    with torch.no_grad():
        bottom_up = model.encode(x)
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(model.posterior_pass, fullgraph=True, backend=Recorder())(
                x, bottom_up, torch.Generator().manual_seed(0))


# ------------------------------------------------------------ the same numbers
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_given_noise_is_what_the_walk_draws(precision):
    """posterior_noise draws each group's eps in the walk's order, shape and dtype: the pass fed them is the eager
    pass, bit for bit (which is what lets a compiled evaluation sample what the eager one samples)."""
    cfg = small("cifar10")
    model, x = build(cfg)
    model.eval()
    with torch.no_grad(), autocast(precision):
        drawn = model(x, generator=torch.Generator().manual_seed(3))
        noise = nvae_compile.posterior_noise(model, x.shape[0], x.device, torch.Generator().manual_seed(3))
        given = model(x, noise=noise)
    assert noise[0].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    for name in ("recon", "kl", "log_q", "log_p"):
        assert torch.equal(getattr(drawn, name), getattr(given, name)), name


def _step(model, loss_fn, x, beta, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = loss_fn(model, x, beta, 1e-2, kl_balance_alpha(model.config.groups_per_scale), True)
    out.loss.backward()
    return out


def _assert_same_step(a, b, out_a, out_b, rtol=1e-5):
    for name in ("loss", "recon", "kl", "kl_coeffs", "spectral", "batchnorm"):
        assert torch.allclose(getattr(out_a, name), getattr(out_b, name), rtol=rtol, atol=1e-6), name
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    scale = max(g.abs().max().item() for g in ga.values())
    # Rounding (sums in another order), judged on the scale of all gradients: a bias before BN has nothing else.
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=rtol, atol=1e-5 * scale), n
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):   # BN statistics, power-iteration vectors
        assert torch.allclose(ba.float(), bb.float(), rtol=rtol, atol=1e-6), n


def test_the_compiled_loss_gives_the_eager_step():
    """compile_loss: the first step runs eagerly (the power iteration's warm start), later ones as one graph,
    with the eager loss terms, gradients and buffers."""
    cfg = small("cifar10")
    eager, x = build(cfg, "default")
    traced, recorder = copy.deepcopy(eager), Recorder()
    loss_fn = nvae_compile.compile_loss(traced, nvae_loss, backend=recorder)
    for step, beta in enumerate((0.3, 0.6)):
        out_a, out_b = _step(eager, nvae_loss, x, beta, step), _step(traced, loss_fn, x, beta, step)
        assert len(recorder.graphs) == step
        _assert_same_step(eager, traced, out_a, out_b)
    assert type(traced.spectral) is type(eager.spectral)   # the traced view is put back


def test_once_initialised_the_compiled_loss_checks_no_buffer_again(monkeypatch):
    """Each check reads a buffer (a device synchronisation on a GPU): after the initialisations, steps skip it."""
    model, x = build(small("cifar10"), "default")
    recorder = Recorder()
    loss_fn = nvae_compile.compile_loss(model, nvae_loss, backend=recorder)
    alpha = kl_balance_alpha(model.config.groups_per_scale)
    checks = []
    real = nvae_compile.pending_initialisation
    monkeypatch.setattr(nvae_compile, "pending_initialisation", lambda *a: checks.append(1) or real(*a))
    for _ in range(3):
        loss_fn(model, x, 0.5, 1e-2, alpha)
    # step 1: pending (eager); step 2: cleared, and found done; step 3: no check
    assert len(checks) == 2 and len(recorder.graphs) == 1 and bool(model.spectral.initialized)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["default", "all"])
def test_the_aot_compiled_loss_gives_the_eager_step(option):
    """Through AOTAutograd (inductor's front end, here without code generation): the compiled backward gives the
    eager gradients, and checkpointed cells, recomputed from the graph, update the BN statistics once."""
    cfg = small("cifar10")
    eager, x = build(cfg, option)
    traced = copy.deepcopy(eager)
    loss_fn = nvae_compile.compile_loss(traced, nvae_loss, backend="aot_eager")
    for step, beta in enumerate((0.3, 0.6)):
        _assert_same_step(eager, traced, _step(eager, nvae_loss, x, beta, step), _step(traced, loss_fn, x, beta, step),
                          rtol=1e-4)


def test_without_regularisation_the_loss_compiles_from_the_first_step():
    """lam = 0 runs no power iteration, so nothing is pending: the first step is already compiled."""
    model, x = build(small("digits"))
    recorder = Recorder()
    loss_fn = nvae_compile.compile_loss(model, nvae_loss, backend=recorder)
    assert not nvae_compile.pending_initialisation(model, 0.0)
    out = loss_fn(model, x, 0.5, 0.0, kl_balance_alpha(model.config.groups_per_scale))
    assert len(recorder.graphs) == 1 and out.spectral.item() == 0
    assert not bool(model.spectral.initialized)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_compiled_evaluation_gives_the_eager_estimates(precision):
    """compile_eval in importance_sample: the same samples from the same generator, so the same log-weights,
    over chunks of two shapes (K = 5 in chunks of 2)."""
    cfg = small("cifar10")
    model, x = build(cfg, "default")
    model.eval()
    recorder = Recorder()
    compiled = nvae_compile.compile_eval(model, backend=recorder)
    with autocast(precision):
        log_w, nelbo = model.importance_sample(x, 5, max_batch=6, generator=torch.Generator().manual_seed(1))
        c_log_w, c_nelbo = model.importance_sample(x, 5, max_batch=6, generator=torch.Generator().manual_seed(1),
                                                   posterior_pass=compiled)
    assert recorder.graphs and c_log_w.shape == log_w.shape == (5, 3)
    # Other draws move log w by 5e-4 to 2e-2 of itself; the same draws, only by the rounding of the folded cells.
    assert torch.allclose(c_log_w.float(), log_w.float(), rtol=1e-6, atol=0)
    assert torch.allclose(c_nelbo.float(), nelbo.float(), rtol=1e-6, atol=0)


def test_a_compiled_evaluation_continues_only_compiled_sums(tmp_path):
    """Compiled sums equal eager ones only up to rounding: a partial file of one kind is not continued as the other."""
    model = NVAE(small("digits")).eval()
    data, path = TensorDataset(torch.rand(4, 1, 8, 8)), tmp_path / "e.partial.json"

    def plan(compile_: bool):
        config = EvalConfig(num_samples=2, batch_size=2, seed=0, compile=compile_)
        return _EvalRun.plan(model, data, config, None, DistributedContext(), PartialFile(path, resume=True))

    eager = plan(False)
    assert eager.posterior_pass is None and "compiled" not in eager.args
    _write_partial(path, eager.args, 1, 0, [], [])
    with pytest.raises(ValueError, match="compiled: None there, True now"):
        plan(True)
    _write_partial(path, {**eager.args, "compiled": True}, 1, 0, [], [])
    assert callable(plan(True).posterior_pass)


def test_the_passes_compile_whole_with_the_mode_of_their_device(monkeypatch):
    """fullgraph=True (a graph break is an error, not a slower step); inductor's default mode on the CPU and
    autotuning without CUDA graphs on CUDA; no mode for a backend other than inductor."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: asked.append(kwargs) or fn)
    model = NVAE(small("digits"))
    nvae_compile.compile_loss(model, nvae_loss)
    nvae_compile.compile_eval(model, mode="max-autotune", backend="aot_eager")
    assert asked == [dict(fullgraph=True, backend="inductor", mode=None),
                     dict(fullgraph=True, backend="aot_eager", mode=None)]
    assert nvae_compile.default_mode("cuda") == "max-autotune-no-cudagraphs"
    assert nvae_compile.default_mode("cpu") is None


# ------------------------------------------------------------------------- CLI
SMALL_RUN = ["--batch-size", "8", "--model", "num_channels_enc=4", "--model", "num_channels_dec=4",
             "--model", "num_groups_per_scale=2", "--model", "num_latent_per_group=2"]


def _train_and_eval(tmp_path: Path):
    """``nvae train --compile --max-steps 2``, then ``nvae eval --compile`` and ``nvae eval`` of the run: the configs
    and the two evaluations."""
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--compile", "--max-steps", "2", "--no-progress", *SMALL_RUN]) == 0
    stored = json.loads((run / "train_config.json").read_text())
    results = []
    for name, flags in (("compiled", ["--compile"]), ("eager", [])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(run), "-k", "3", "--max-images", "4", "--batch-size", "4", "--output", str(out),
                     "--no-progress", *flags]) == 0
        results.append(json.loads(out.read_text()))
    return stored, results


def test_train_and_eval_run_compiled(tmp_path, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(nvae_compile, "BACKEND", recorder)
    counts = []
    real = nvae_compile.compile_eval

    def counting(*args, **kwargs):
        counts.append(len(recorder.graphs))   # graphs traced by training, before evaluation compiles
        return real(*args, **kwargs)

    monkeypatch.setattr("nvae.analysis.likelihood.compile_eval", counting)
    stored, (compiled, eager) = _train_and_eval(tmp_path)
    assert stored["compile"] is True
    assert counts == [1]   # training: step 1 eager (initialisations), step 2 one graph; one compiled evaluation
    assert len(recorder.graphs) == 2
    assert compiled["nll"] == pytest.approx(eager["nll"], rel=1e-5)
    assert compiled["nelbo"] == pytest.approx(eager["nelbo"], rel=1e-5)


@pytest.mark.slow
def test_train_and_eval_run_with_inductor(tmp_path):
    """The default backend: inductor's C++ code on the CPU."""
    stored, (compiled, eager) = _train_and_eval(tmp_path)
    assert stored["compile"] is True
    assert compiled["nll"] == pytest.approx(eager["nll"], rel=1e-4)
