"""The ablations as configuration: every official cell table and switch builds the official parameter count,
trains a step with the full objective and round-trips through save/load; res_elu's data-dependent
initialisation inside a whole model; and benchmarks/ablations.py end to end on tiny budgets."""
import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import BENCHMARKS, DATA, load_benchmark, needs_shared
from nvae import NVAE, NVAEConfig
from nvae.model.layers import SqueezeExcitation, WNConv2d
from nvae.training.objective import balanced_kl, kl_balance_alpha, nvae_loss
from nvae.training.state import TrainState
from nvae.training.step import Coefficients, train_step


@pytest.fixture(autouse=True)
def _one_thread(_seed):
    """These models are tiny: a second thread does not help them, and on a busy machine its spin-waits make
    every step several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ------------------------------------------------------------------------------------------------
# The official cell tables (NVlabs/NVAE utils.get_arch_cells), transcribed here so that the counts
# below do not depend on our cells.py: name -> ops of (encoder, decoder, pre-process, post-process)
# cells; a role's "down"/"up" cells use the same ops as its normal cells.
_R, _R5 = "res_bnswish", "res_bnswish5"
OFFICIAL_ARCH = {
    "res_mbconv": ([_R, _R], ["mconv_e6k5g0"], [_R, _R], ["mconv_e3k5g0"]),
    "res_bnswish": ([_R, _R], [_R, _R], [_R, _R], [_R, _R]),
    "res_elu": (["res_elu"] * 2,) * 4,
    "res_bnelu": (["res_bnelu"] * 2,) * 4,
    "mbconv_res": (["mconv_e6k5g0"], [_R, _R], ["mconv_e3k5g0"], [_R, _R]),
    "mbconv_sep": (["mconv_e6k5g0"], ["mconv_e6k5g0"], ["mconv_e3k5g0"], ["mconv_e3k5g0"]),
    "mbconv_sep11": (["mconv_e6k11g0"], ["mconv_e6k11g0"], ["mconv_e3k5g0"], ["mconv_e3k5g0"]),
    "mbconv_den": (["mconv_e6k5g0"], ["mconv_e6k5g0"], ["mconv_e3k5g8"], ["mconv_e3k5g8"]),
    "res53_mbconv": ([_R5, _R], ["mconv_e6k5g0"], [_R5, _R], ["mconv_e3k5g0"]),
    "res35_mbconv": ([_R, _R5], ["mconv_e6k5g0"], [_R, _R5], ["mconv_e3k5g0"]),
    "res55_mbconv": ([_R5, _R5], ["mconv_e6k5g0"], [_R5, _R5], ["mconv_e3k5g0"]),
}
NAMED_VARIANTS = sorted(OFFICIAL_ARCH)


def official_parameter_count(cfg: NVAEConfig) -> int:
    """Parameters of the official ``AutoEncoder`` (model.py) for ``cfg``, in closed form from the official
    op definitions (neural_operations.py); flows are not covered."""
    assert cfg.num_nf == 0
    enc_ops, dec_ops, pre_ops, post_ops = OFFICIAL_ARCH[cfg.arch_instance]

    def conv(c_in, c_out, k, groups=1, bias=True, weight_norm=True):
        # official Conv2D: nn.Conv2d weight and bias, plus log_weight_norm (one per output channel)
        return c_out * (c_in // groups) * k * k + c_out * bias + c_out * weight_norm

    def bn(c):  # BatchNorm / SyncBatchNorm / SyncBatchNormSwish: affine gamma and beta
        return 2 * c

    def op(name, c_in, c_out):
        if name == "res_elu":                                   # ELUConv: one 3x3 Conv2D with bias
            return conv(c_in, c_out, 3)
        if name in ("res_bnelu", "res_bnswish", "res_bnswish5"):  # BN(+act), 3x3 Conv2D with bias
            return bn(c_in) + conv(c_in, c_out, 3)
        ex, k, g = map(int, re.fullmatch(r"mconv_e(\d+)k(\d+)g(\d+)", name).groups())
        hidden = int(round(c_in * ex))                          # InvertedResidual
        return (bn(c_in) + conv(c_in, hidden, 1, bias=False, weight_norm=False) + bn(hidden)
                + conv(hidden, hidden, k, groups=hidden if g == 0 else g, bias=False, weight_norm=False) + bn(hidden)
                + conv(hidden, c_out, 1, bias=False, weight_norm=False) + bn(c_out))

    def skip(c_in, c_out, stride):
        if stride == 1:
            return 0
        if stride == 2:                                         # FactorizedReduce: four 1x1 Conv2D with bias
            q = c_out // 4
            return sum(conv(c_in, o, 1) for o in (q, q, q, c_out - 3 * q))
        return conv(c_in, c_out, 1, bias=False)                 # UpSample + 1x1 Conv2D without bias

    def se(c):
        h = max(c // 16, 4)
        return c * h + h + h * c + c

    def cell(c_in, c_out, stride, ops):
        body = sum(op(name, c_in if i == 0 else c_out, c_out) for i, name in enumerate(ops))
        return skip(c_in, c_out, stride) + body + (se(c_out) if cfg.use_se else 0)

    ce, cd, nz, S = cfg.num_channels_enc, cfg.num_channels_dec, cfg.num_latent_per_group, cfg.num_latent_scales
    gps = cfg.groups_per_scale
    total = conv(cfg.in_channels, ce, 3)                                       # stem
    mult = 1
    for _ in range(cfg.num_preprocess_blocks):
        for c in range(cfg.num_preprocess_cells):
            if c == cfg.num_preprocess_cells - 1:
                total += cell(ce * mult, 2 * ce * mult, 2, pre_ops)
                mult *= 2
            else:
                total += cell(ce * mult, ce * mult, 1, pre_ops)
    for s in range(S):
        for g in range(gps[s]):
            total += cfg.num_cell_per_cond_enc * cell(ce * mult, ce * mult, 1, enc_ops)
            if not (s == S - 1 and g == gps[s] - 1):
                total += conv(cd * mult, ce * mult, 1)                          # EncCombinerCell
        if s < S - 1:
            total += cell(ce * mult, 2 * ce * mult, 2, enc_ops)
            mult *= 2
    total += conv(ce * mult, ce * mult, 1)                                     # enc0
    m = mult
    for s in range(S):
        for g in range(gps[S - 1 - s]):
            total += conv(int(ce * m), 2 * nz, 3)                              # enc_sampler
            if not (s == 0 and g == 0):
                total += conv(int(cd * m), 2 * nz, 1)                          # dec_sampler
        m /= 2
    m = mult
    for s in range(S):
        c = int(cd * m)
        for g in range(gps[S - 1 - s]):
            if not (s == 0 and g == 0):
                total += cfg.num_cell_per_cond_dec * cell(c, c, 1, dec_ops)
            total += conv(c + nz, c, 1)                                        # DecCombinerCell
        if s < S - 1:
            total += cell(c, c // 2, -1, dec_ops)
            m /= 2
    for _ in range(cfg.num_postprocess_blocks):
        for c in range(cfg.num_postprocess_cells):
            ch = int(cd * m)
            if c == 0:
                total += cell(ch, ch // 2, -1, post_ops)
                m /= 2
            else:
                total += cell(ch, ch, 1, post_ops)
    if cfg.decoder == "bernoulli":
        c_out = 1
    else:
        assert cfg.in_channels == 3
        c_out = 6 if cfg.num_mixture_dec == 1 else 10 * cfg.num_mixture_dec
    total += conv(int(cd * m), c_out, 3)                                       # image_conditional
    side = cfg.image_size // cfg.downsampling
    total += cd * cfg.downsampling * side * side                               # prior_ftr0
    return total


def _count(cfg: NVAEConfig) -> int:
    with torch.device("meta"):     # shapes only
        return sum(p.numel() for p in NVAE(cfg).parameters())


#: Small configurations: two scales with unequal groups and cell counts (binary), and three pre/post blocks
#: at one scale (colour). Channel counts keep mbconv_den's groups of 8 whole.
SMALL = {
    "binary": dict(image_size=16, in_channels=1, decoder="bernoulli", num_channels_enc=8, num_channels_dec=16,
                   num_latent_scales=2, num_groups_per_scale=3, ada_groups=True, num_preprocess_blocks=1,
                   num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=3,
                   num_cell_per_cond_enc=2, num_cell_per_cond_dec=1, num_latent_per_group=5, num_nf=0),
    "rgb": dict(image_size=16, in_channels=3, decoder="mixture", num_mixture_dec=4, num_channels_enc=16,
                num_channels_dec=16, num_latent_scales=1, num_groups_per_scale=3, ada_groups=False,
                num_preprocess_blocks=2, num_preprocess_cells=2, num_postprocess_blocks=2, num_postprocess_cells=2,
                num_cell_per_cond_enc=1, num_cell_per_cond_dec=2, num_latent_per_group=7, num_nf=0),
}


def test_the_counter_reproduces_the_official_mnist_model():
    """The closed form is anchored on a count made with the official code itself (NVlabs/NVAE at commit 9fc1a28)."""
    assert official_parameter_count(NVAEConfig.preset("mnist")) == 33_363_134


def test_the_named_variants_are_the_official_ones():
    from nvae.config import ARCH_INSTANCES
    assert sorted(ARCH_INSTANCES) == NAMED_VARIANTS


@pytest.mark.parametrize("use_se", [True, False], ids=["se", "no-se"])
@pytest.mark.parametrize("small", sorted(SMALL))
@pytest.mark.parametrize("arch", NAMED_VARIANTS)
def test_parameter_count_of_every_variant_matches_the_official_code(arch, small, use_se):
    cfg = NVAEConfig(**SMALL[small], arch_instance=arch, use_se=use_se)
    assert _count(cfg) == official_parameter_count(cfg)


def test_residual_normal_switch_changes_no_parameters():
    cfg = NVAEConfig(**SMALL["binary"])
    assert _count(dataclasses.replace(cfg, res_dist=False)) == _count(cfg)


# ------------------------------------------------------------------------------------------------
def tiny(**kw) -> NVAEConfig:
    base = dict(image_size=8, in_channels=1, decoder="bernoulli", num_channels_enc=8, num_channels_dec=8,
                num_latent_scales=2, num_groups_per_scale=2, ada_groups=False, num_preprocess_blocks=1,
                num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_latent_per_group=4, num_nf=0)
    return NVAEConfig(**{**base, **kw})


SWITCHES = [(arch, {}, {}) for arch in NAMED_VARIANTS] + [
    ("res_mbconv", dict(use_se=False), {}),
    ("res_mbconv", dict(res_dist=False), {}),
    ("res_mbconv", {}, dict(lam=0.0)),
    ("res_mbconv", {}, dict(balance=False)),
    ("res_elu", dict(use_se=False, res_dist=False), dict(lam=0.0, balance=False)),
]


@pytest.mark.parametrize("arch,model_kw,step_kw", SWITCHES,
                         ids=[a + "".join(f"-{k}={v}" for k, v in {**m, **s}.items()) for a, m, s in SWITCHES])
def test_every_variant_trains_a_step_and_round_trips(arch, model_kw, step_kw, tmp_path):
    cfg = tiny(arch_instance=arch, **model_kw)
    model = NVAE(cfg).train()
    assert any(isinstance(m, SqueezeExcitation) for m in model.modules()) == cfg.use_se
    state = TrainState(model, torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=3e-4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = (torch.rand(4, 1, 8, 8) < 0.4).float()
    lam, balance = step_kw.get("lam", 1e-2), step_kw.get("balance", True)
    out, grad_norm, stepped = train_step(state, x, Coefficients(0.5, lam, kl_balance_alpha(cfg.groups_per_scale),
                                                                balance))
    assert stepped and torch.isfinite(out.loss) and torch.isfinite(grad_norm)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(p, before[n]) for n, p in model.named_parameters()) > len(before) // 2
    if not balance:
        assert torch.equal(out.kl_coeffs, torch.ones_like(out.kl_coeffs))

    model.eval()
    path = tmp_path / "variant.pt"
    model.save(path)
    loaded = NVAE.from_checkpoint(path).eval()
    assert loaded.config == cfg
    with torch.no_grad():
        a, b = model(x, temperature=0.0), loaded(x, temperature=0.0)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        sa, sb = model.sample_logits(3, 0.8, generator=g1), loaded.sample_logits(3, 0.8, generator=g2)
    for name in ("logits", "recon", "kl", "log_q", "log_p"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(sa, sb)


def test_without_spectral_regularisation_the_loss_is_the_balanced_elbo_alone():
    """weight_decay_norm = 0 (lambda 0) drops L_SR and L_BN from the objective, as the official code does."""
    cfg = tiny()
    model = NVAE(cfg).train()
    x = (torch.rand(4, 1, 8, 8) < 0.4).float()
    alpha = kl_balance_alpha(cfg.groups_per_scale)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    off = nvae_loss(model, x, 0.5, 0.0, alpha, generator=torch.Generator().manual_seed(0))
    model.load_state_dict(state)
    on = nvae_loss(model, x, 0.5, 0.1, alpha, generator=torch.Generator().manual_seed(0))
    kl_term, _ = balanced_kl(off.kl, 0.5, alpha)
    assert torch.allclose(off.loss, (off.recon + kl_term).mean())
    assert on.spectral > 0 and on.batchnorm > 0
    assert torch.allclose(on.loss - off.loss, 0.1 * (on.spectral + on.batchnorm), rtol=1e-4)


def test_res_elu_model_first_batch_normalises_every_data_initialised_conv():
    """In a whole res_elu model, the first training batch sets each data-initialised conv so that its
    output on that batch has zero mean and std 1/5 per channel (the official ``5 * std`` constant); the
    single-conv case is in test_layers.py."""
    from nvae.model.cells import Cell
    model = NVAE(tiny(arch_instance="res_elu")).train()
    convs = [m for m in model.modules() if isinstance(m, WNConv2d) and m.data_init]
    assert len(convs) == 2 * sum(isinstance(m, Cell) for m in model.modules())   # both ops of every cell
    seen = {}
    hooks = [c.register_forward_hook(lambda m, i, o: seen.setdefault(m, o.detach())) for c in convs]
    with torch.no_grad():
        model((torch.rand(16, 1, 8, 8) < 0.4).float())
    for h in hooks:
        h.remove()
    assert len(seen) == len(convs)
    for conv, out in seen.items():
        assert bool(conv.init_done)
        assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
        assert torch.allclose(out.std(dim=(0, 2, 3)), torch.full((out.shape[1],), 0.2), rtol=2e-3)


# ------------------------------------------------------------------------------------------------
def _ablations():
    return load_benchmark("ablations")


def test_benchmark_plans_the_papers_tables_without_duplicate_runs():
    ab = _ablations()
    tables = ab.plan(["2", "3", "5"], [2, 4], 4)
    assert [len(tables[t]) for t in ("2", "3", "5")] == [6, 4, 3]
    variants = ab.unique_variants(tables)
    # Table 3's regular/regular row is Table 2's BN + Swish; Table 5's full model is Table 3's res_mbconv
    assert len(variants) == 11 and len({v.key for v in variants}) == 11
    t5 = dict(tables["5"])
    assert t5[("without SR",)].spectral is False and t5[("without SE",)].use_se is False
    settings = ab.Settings()
    for v in variants:
        cfg = ab.model_config(settings, v)
        assert (cfg.arch_instance, cfg.num_groups_per_scale, cfg.use_se) == (v.arch, v.groups, v.use_se)
    with pytest.raises(ValueError, match="unknown table"):
        ab.plan(["6"], [2], 2)


def test_benchmark_prints_the_papers_numbers_and_na_elsewhere():
    ab = _ablations()
    tables = ab.plan(["2", "3", "5"], [2, 4], 4)
    fake = {v.key: {"key": v.key, "ok": True, "nll": 100.0 + i, "bpd": 0.2, "nelbo": 110.0, "bpd_elbo": 0.25,
                    "num_groups": 3 * v.groups // 2, "params": 1000, "s_per_step": 0.1, "steps": 10,
                    "epochs_scheduled": 2, "skipped_steps": 0, "train_minutes": 1.0, "peak_mb": 12.0}
            for i, v in enumerate(ab.unique_variants(tables))}
    fake["res_mbconv-g4-noSE"] = {"ok": False, "error": "exit 1: boom"}
    text = ab.render(tables, fake, ab.Settings(), "cmd", {"total_minutes": 3})
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 3.31 |" in row["WN + ELU (`res_elu`)"] and row["WN + ELU (`res_elu`)"].count("n/a") == 2
    assert row["BN + ELU (`res_bnelu`)"].count("n/a") == 3
    assert "| 3.16 |" in row["SR + SE"] and "| 3.18 |" in row["without SR"]
    assert "failed" in row["without SE"] and "| 3.22 |" in row["without SE"]
    table3 = [line for line in text.splitlines() if line.startswith("| regular") or line.startswith("| separable")]
    assert len(table3) == 4 and all(line.rstrip().endswith("| n/a | n/a | n/a |") for line in table3)
    assert "2 CPU-min, mnist train[2048] test[256]" in text     # the budget and data of every row


@needs_shared("data", "MNIST")
def test_benchmark_row_trains_and_evaluates_in_process(tmp_path, monkeypatch):
    import nvae.data.registry as registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))   # keep the subset registration local
    ab = _ablations()
    settings = ab.Settings(data=str(DATA), batch_size=4, train_images=8, test_images=3, num_samples=2, minutes=None,
                           max_steps=2, threads=0, probe_steps=1,
                           model=(("num_channels_enc", 4), ("num_channels_dec", 4)))
    res = ab.run_variant(ab.Variant("res_elu", 1, spectral=False), settings, tmp_path / "run")
    assert res["ok"] and res["steps"] == 2 and res["num_images"] == 3 and res["num_samples"] == 2
    assert res["num_groups"] == 2 and res["s_per_step"] > 0 and res["peak_mb"] >= 0
    assert res["nll"] <= res["nelbo"] + 1e-6 and res["nll"] > 0
    stored = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert stored["weight_decay_norm"] == 0.0 and stored["dataset"] == "mnist_ablation"


@pytest.mark.slow
@needs_shared("data", "MNIST")
def test_benchmark_command_line_writes_markdown_and_json(tmp_path):
    out = tmp_path / "ablations.md"
    cmd = [sys.executable, str(BENCHMARKS / "ablations.py"), "--data", str(DATA), "--tables", "kl",
           "--depths", "1", "--steps", "2", "--batch-size", "4", "--train-images", "8", "--test-images", "3",
           "--num-samples", "2", "--model", "num_channels_enc=4", "--model", "num_channels_dec=4",
           "--out", str(out), "--work-dir", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "## KL balancing" in text and "`res_mbconv-g1-noklbal`" in text and "2 steps, mnist train[8]" in text
    rows = json.loads((tmp_path / "runs" / "results.json").read_text())["rows"]
    assert sorted(rows) == ["res_mbconv-g1", "res_mbconv-g1-noklbal"] and all(r["ok"] for r in rows.values())
    # --resume re-renders from the JSON without training again
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 row(s) reused" in again.stderr
