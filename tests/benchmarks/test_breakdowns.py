"""benchmarks/conv_passes.py and step_parts.py: the breakdowns add up to their totals."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load_benchmark
from nvae import NVAE, NVAEConfig


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("conv_passes")


@pytest.fixture(scope="module")
def parts():
    return load_benchmark("step_parts")


def test_counts_cover_every_convolution_module_call(bench):
    """model_conv_counts sees each conv module call of a training forward once (and the functional ones too)."""
    cfg = NVAEConfig.preset("digits")
    counts = load_benchmark("_common").model_conv_counts(cfg, 2)
    model = NVAE(cfg).train()
    calls = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: calls.append(mod))
    torch.manual_seed(0)
    model(torch.bernoulli(torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size)))
    assert sum(counts.values()) >= len(calls) > 0
    depthwise = sum(n for s, n in counts.items() if bench.kind(s) == "depthwise")
    assert depthwise == sum(1 for m in calls if m.groups > 1 and m.groups == m.in_channels == m.out_channels)


def test_rows_add_up_to_the_totals(bench, capsys):
    bench.main(["--preset", "digits", "--batch", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ") and "thread(s)" in lines[0]
    start = 3
    end = next(i for i, line in enumerate(lines) if line.startswith("step totals"))
    rows = [line.split() for line in lines[start:end]]
    assert rows
    summed = [0.0, 0.0, 0.0]
    for row in rows:
        count = int(row[0])
        fwd, ing, wg = (float(v) for v in row[-4:-1])
        # The ratio is of the unrounded times: within what rounding to 0.01 ms allows.
        ratio = float(row[-1].rstrip("x"))
        assert (wg - 0.005) / (fwd + 0.005) - 0.05 <= ratio <= (wg + 0.005) / max(fwd - 0.005, 1e-9) + 0.05
        for i, t in enumerate((fwd, ing, wg)):
            summed[i] += count * t
    kinds = {line.split(":")[0].strip() for line in lines[end + 1:-1]}
    assert "depthwise" in kinds and "1x1" in kinds
    overall = [float(v) for v in lines[-1].split(":")[1].split()]
    # Printed rows are rounded to 0.01 ms; the totals are summed before rounding.
    tolerance = 0.006 * sum(int(r[0]) for r in rows) + 0.06
    for i in range(3):
        assert overall[i] == pytest.approx(summed[i], abs=tolerance)
    assert overall[3] == pytest.approx(sum(overall[:3]), abs=0.2)


def test_kind_names_the_kernel(bench):
    base = load_benchmark("_common").ConvShape(2, 8, 8, (4, 4), (5, 5), (1, 1), (2, 2), (1, 1), 8, False, False)
    assert bench.kind(base) == "depthwise"
    assert bench.kind(base._replace(groups=1, kernel=(1, 1))) == "1x1"
    assert bench.kind(base._replace(groups=2, kernel=(3, 3))) == "3x3"


def test_step_parts_sum_to_the_step_and_compare_batches(parts, capsys):
    parts.main(["--preset", "digits", "--batches", "2,1", "--steps", "1", "--adamax-foreach"])
    cpu, title, header, small, large, ratio = capsys.readouterr().out.splitlines()
    assert cpu.startswith("# ") and "thread(s)" in cpu and "adamax-foreach" in title
    assert header.split() == ["batch", "forward", "spectral", "BN", "loss", "backward", "Adamax", "step"]
    rows = {}
    for line in (small, large):
        batch, *values = line.split()
        *times, step = (float(v) for v in values)
        # each part and the step are rounded to 0.1 ms
        assert all(t > 0 for t in times) and step == pytest.approx(sum(times), abs=0.051 * (len(times) + 1))
        rows[int(batch)] = times
    assert sorted(rows) == [1, 2]       # batches are sorted, smallest first
    assert ratio.split()[0] == "x2"
    for printed, lo, hi in zip(ratio.split()[1:-1], rows[1], rows[2]):
        # Ratios are of the unrounded times, which the rows show to 0.1 ms: each lies within 0.05 of its row,
        # and the ratio is printed to 0.1 (a part of 0.5 ms moves its ratio by a tenth through rounding alone).
        low = (hi - 0.05) / (lo + 0.05) - 0.05
        high = (hi + 0.05) / (lo - 0.05) + 0.05 if lo > 0.05 else float("inf")
        assert low <= float(printed.rstrip("x")) <= high, (printed, lo, hi)


def test_step_parts_refuses_a_batch_below_one(parts, capsys):
    with pytest.raises(SystemExit) as e:
        parts.main(["--batches", "0,4"])
    assert e.value.code == 2 and "positive batch sizes" in capsys.readouterr().err


def test_grouped_conv_formulation_is_the_depthwise_weight_gradient():
    """depthwise_grad.py times this formulation: it must be the gradient it claims (float64 autograd)."""
    grad_bench = load_benchmark("depthwise_grad")
    torch.manual_seed(0)
    for n, c, h, k, pad in [(3, 4, 6, 5, 2), (2, 3, 5, 3, 1), (1, 2, 4, 3, 0)]:
        x = torch.randn(n, c, h, h, dtype=torch.float64)
        w = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
        y = F.conv2d(x, w, None, 1, pad, 1, c)
        g = torch.randn_like(y)
        y.backward(g)
        got = grad_bench.as_grouped_conv(g, x, (pad, pad))
        assert got.shape == w.shape
        assert torch.allclose(got, w.grad, atol=1e-10)
