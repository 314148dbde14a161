"""benchmarks/conv_passes.py: per-shape pass times and the step totals they add up to."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from nvae import NVAE, NVAEConfig

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("conv_passes", BENCH / "conv_passes.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_counts_cover_every_convolution_module_call(bench):
    """model_conv_counts sees each conv module call of a training forward once (and the functional ones too)."""
    from conv_kernels import model_conv_counts
    cfg = NVAEConfig.preset("digits")
    counts = model_conv_counts(cfg, 2)
    model = NVAE(cfg).train()
    calls = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: calls.append(mod))
    import torch
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
    from conv_kernels import ConvShape
    base = ConvShape(2, 8, 8, (4, 4), (5, 5), (1, 1), (2, 2), (1, 1), 8, False, False)
    assert bench.kind(base) == "depthwise"
    assert bench.kind(base._replace(groups=1, kernel=(1, 1))) == "1x1"
    assert bench.kind(base._replace(groups=2, kernel=(3, 3))) == "3x3"
