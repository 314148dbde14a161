"""benchmarks/activation_memory.py: the saved-tensor count on graphs small enough to count by hand, the per-image
figure of a small model, the batch arithmetic, and the script end to end on a tiny model."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from conftest import load_benchmark

am = load_benchmark("activation_memory")

from nvae import NVAEConfig, speedups  # noqa: E402

TINY = ["--model", "num_channels_enc=4", "--model", "num_channels_dec=4", "--model", "num_groups_per_scale=2"]
TINY_CFG = dataclasses.replace(NVAEConfig.preset("digits"), num_channels_enc=4, num_channels_dec=4,
                               num_groups_per_scale=2)
F32 = 4


def test_a_linear_layer_and_sigmoid_save_the_input_and_the_output_and_no_parameter():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)

    def fn():
        return torch.sigmoid(lin(x)).sum()

    # addmm keeps x (for the weight's gradient) and W^T (a view of the weight: a parameter); sigmoid its output
    assert am.saved_for_backward(fn, exclude=lin.parameters()).total == (5 * 4 + 5 * 3) * F32
    assert am.saved_for_backward(fn).total == (5 * 4 + 5 * 3 + 3 * 4) * F32      # the weight, once excluded no more


def test_a_storage_saved_through_several_views_counts_once():
    a = torch.randn(10, requires_grad=True)

    def fn():
        base = a * 2                              # multiplying by a number saves nothing
        left, right = base[:5], base[5:]          # two views of one 10-float storage
        return (left * left).sum() + right.sin().sum()   # saves left twice and right once

    assert am.saved_for_backward(fn).total == 10 * F32


def test_tensors_saved_by_a_graph_dropped_before_the_end_are_not_counted():
    a = torch.randn(100, requires_grad=True)

    def fn():
        (a * a).sum()                             # saves a twice, then the graph is dropped (a itself lives on)
        return a.exp().sum()                      # saves its 100-float output, alive at the end

    assert am.saved_for_backward(fn).total == 100 * F32
    assert am.saved_for_backward(fn, exclude=[a]).total == 100 * F32


def test_bytes_are_attributed_to_the_outermost_cell_without_its_input():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid())
    cell = nn.Sequential(inner, nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)
    saved = am.saved_for_backward(lambda: cell(x * 1).sum(), exclude=cell.parameters(),
                                  cells={"cell": cell, "inner": inner})
    # saved: the cell's input (x * 1, 20 floats; the cell's input, so not its own), the sigmoid's and tanh's outputs
    assert saved.total == (5 * 4 + 5 * 3 + 5 * 3) * F32
    assert saved.by_cell == {"cell": (5 * 3 + 5 * 3) * F32}
    assert saved.inputs == {"cell": ((5, 4), torch.float32, False)}


def test_fake_tensors_count_what_real_ones_do():
    option = am.OPTIONS["all"]
    fake = am.measure(TINY_CFG, option, "fp32", 2, fake=True)
    real = am.measure(TINY_CFG, option, "fp32", 2, fake=False)
    assert fake.total == real.total > 0


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
def test_cudas_autocast_applies_to_fake_cuda_tensors_without_a_gpu():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w = torch.empty(2, 3, 8, 8, device="cuda"), torch.empty(4, 3, 3, 3, device="cuda")
        with am.autocast("cuda", torch.float16):
            y = nn.functional.conv2d(x, w)
            p = torch.softmax(y, 1)
        after = nn.functional.conv2d(x, w)
    assert (y.dtype, p.dtype, after.dtype) == (torch.float16, torch.float32, torch.float32)   # CUDA's op lists
    assert not torch.is_autocast_enabled("cuda")


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
def test_the_cuda_policy_counts_the_same_graph_in_fp32_and_about_half_of_it_in_fp16():
    def per_image(precision, device):
        one, two = (am.measure(TINY_CFG, am.OPTIONS["plain"], precision, b, device=torch.device(device)).total
                    for b in (1, 2))
        return two - one

    fp32 = per_image("fp32", "cuda")
    assert fp32 == per_image("fp32", "cpu") > 0
    assert 0.5 * fp32 < per_image("fp16", "cuda") < 0.75 * fp32     # convolutions' inputs halved, some kept in fp32


def test_the_per_image_figure_does_not_depend_on_the_batch():
    totals = [am.measure(TINY_CFG, am.OPTIONS["plain"], "fp32", b, fake=False).total for b in (1, 2, 3)]
    per_image = totals[1] - totals[0]
    assert per_image > 0 and abs((totals[2] - totals[1]) - per_image) <= 1e-3 * per_image
    assert 2 * totals[0] - totals[1] > 0       # the weight-normalised weights do not grow with the batch


def test_a_cells_pass_beyond_its_saved_tensors_is_measured_and_grows_with_the_batch():
    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))

    def extra(batch):
        return am._beyond_saved(cell, (batch, 64), torch.float32, False, None, list(cell.parameters()))

    extra(8)                                   # (the first pass allocates once what later ones reuse)
    growth = extra(128) - extra(64)
    # per image, beyond the saved tensors and the output: the arriving gradient (64 floats) and the gradients of
    # the tanh's output and input (256 each), alive together in backward
    assert abs(growth - 64 * (64 + 2 * 256) * F32) <= 0.01 * growth


def test_build_switches_the_options_on_as_training_does():
    model, x, _ = am.build(TINY_CFG, am.OPTIONS["all"], 2)
    on = speedups.enabled(model)
    assert on.recompute_bn and on.checkpointing is True and model.training
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] == 2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    plain, _, _ = am.build(TINY_CFG, am.OPTIONS["plain"], 2)
    assert not speedups.enabled(plain).recompute_bn and speedups.enabled(plain).checkpointing is False


def _row(per_image, fixed, extra=(0, 0)):
    # saved at batches 1 and 2 give per image ``per_image`` and nothing fixed beyond ``fixed``
    return am.Row("celebahq256", "all", "bf16", (per_image, 2 * per_image), (0, 0), extra, "c",
                  am.Fixed(1, fixed, 0, 0, 0))


def test_the_largest_batch_leaves_the_reserve_and_the_fragmentation_margin():
    gb = am.GB
    row = _row(per_image=gb, fixed=2 * gb)
    # 32 GB: (32 - 1.5) x 0.9 = 27.45 GB lent, minus 2 GB fixed: 25 whole images
    assert am.largest_batch(row, 32, 1.5, 0.1) == 25
    assert am.largest_batch(row, 32, 0, 0) == 30
    assert am.largest_batch(row, 3, 1.5, 0.1) == 0          # not even the fixed costs fit
    with_cell = _row(per_image=gb // 2, fixed=2 * gb, extra=(gb // 2 + 100, gb + 100))  # + 0.5 GB/image, 100 B fixed
    assert with_cell.per_image == gb and with_cell.fixed_total == 2 * gb + 100
    assert with_cell.peak(10) == 12 * gb + 100


def test_the_fixed_costs_are_weights_gradients_and_two_adamax_tensors():
    f = am.fixed_costs(TINY_CFG)
    assert f.weights == f.gradients == f.parameters * F32 and f.adamax == 2 * f.weights
    assert f.total == 4 * f.weights + f.buffers


def test_quick_run_prints_both_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert am.main(["--quick", "--precisions", "fp32", "--cpu-check", "2,4", "--json", str(out)] + TINY) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines()
            if line.startswith("| `digits` | plain |") or line.startswith("| `digits` | all |")]
    per_image = [line for line in rows if line.count("|") == 10]      # 7 columns + the CPU check at two batches
    batches = [line for line in rows if line.count("|") == 9]
    assert [line.split(" | ")[1] for line in per_image] == ["plain", "all"]
    assert len(batches) == 2 and all(int(line.split(" | ")[3]) > 0 for line in batches)
    plain, everything = (float(line.split(" | ")[5]) for line in per_image)
    assert 0 < everything < plain        # the options save memory
    assert "1.5 GB reserved" in text and "0.1 left to allocator fragmentation" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["option"] for r in rows] == ["plain", "all"] and all(r["cell"] and r["per_image"] > 0 for r in rows)
    assert all(0 < r["cpu_peak"][0] < r["cpu_peak"][1] for r in rows)   # the measured peak grows with the batch


def test_the_gpu_path_runs_training_steps(monkeypatch):
    # No GPU here: the same steps on the CPU, with the CUDA memory counters stubbed.
    peaks = iter([111, 222])
    monkeypatch.setattr(am.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(am.torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(am.torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    monkeypatch.setattr(am.torch.cuda, "empty_cache", lambda: None)
    assert am.cuda_peaks(TINY_CFG, am.OPTIONS["all"], "fp32", [1, 2], torch.device("cpu")) == [111, 222]


@pytest.mark.parametrize("argv, message", [
    (["--presets", "cifar100"], "unknown preset"),
    (["--options", "fast"], "unknown option"),
    (["--precisions", "fp8"], "unknown precision"),
    (["--fragmentation", "1"], "--fragmentation must be in [0, 1)"),
    (["--memories", "16,x"], "comma-separated numbers"),
    (["--cpu-check", "0"], "must be positive"),
    (["--policy", "cuda", "--tensors", "real"], "needs --device cuda"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        am.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_cuda_run_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(am.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        am.parse_args(["--device", "cuda"])
    assert "no CUDA device here" in capsys.readouterr().err
