"""benchmarks/gpu_check.py on the CPU: its arguments, its rows and its table (the GPU figures need a GPU)."""
import pytest

from conftest import load_benchmark

gpu_check = load_benchmark("gpu_check")

TINY = ["--model", "num_channels_enc=4", "--model", "num_channels_dec=4", "--model", "num_groups_per_scale=2"]


def test_runs_every_requested_row_and_prints_one_table(capsys):
    rc = gpu_check.main(["--device", "cpu", "--presets", "digits", "--warmup", "0", "--steps", "1", "--no-compile",
                         "--options", "fp32,bf16,bf16 channels-last recompute-bn checkpointing",
                         "--eval-k", "3", "--eval-images", "2", "--eval-max-batch", "4"] + TINY)
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| `digits`")]
    assert [r.split(" | ")[2] for r in rows] == ["fp32", "bf16", "bf16 channels-last recompute-bn checkpointing"]
    assert all(float(r.split(" | ")[3]) > 0 and r.split(" | ")[4] == "n/a" for r in rows)
    assert "IW evaluation `digits` K=3" in out and "images/s" in out


@pytest.mark.parametrize("argv, message", [
    (["--presets", "cifar100"], "unknown preset"),
    (["--options", "fp64"], "unknown option row"),
    (["--steps", "0"], "--steps must be positive"),
    (["--budget-minutes", "0"], "--budget-minutes must be positive"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--device", "cpu"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_cuda_run_without_a_gpu_says_so(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    assert "no CUDA device here" in capsys.readouterr().err


def test_out_of_budget_is_a_failure(capsys, monkeypatch):
    clock = iter(range(0, 10_000, 100))   # every call of the clock moves 100 s on
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: float(next(clock)))
    rc = gpu_check.main(["--device", "cpu", "--presets", "digits", "--warmup", "0", "--steps", "1", "--no-compile",
                         "--options", "fp32,bf16", "--budget-minutes", "3"] + TINY)
    assert rc == 1 and "budget" in capsys.readouterr().err


def test_the_compile_row_runs_the_library_compiled_step(capsys, monkeypatch):
    import nvae.speedups.compile as nvae_compile
    graphs = []

    def backend(gm, example_inputs):   # no code generation: the CPU test checks the path, not the compiler
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(nvae_compile, "BACKEND", backend)
    rc = gpu_check.main(["--device", "cpu", "--presets", "digits", "--warmup", "0", "--steps", "1",
                         "--options", "bf16 compile", "--eval-k", "2", "--eval-images", "1"] + TINY)
    out = capsys.readouterr().out
    row, = [line for line in out.splitlines() if line.startswith("| `digits`")]
    assert rc == 0 and row.split(" | ")[2] == "bf16 compile" and float(row.split(" | ")[5].rstrip(" |")) >= 0
    assert len(graphs) == 1   # the step traced as one graph
