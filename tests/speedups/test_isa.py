"""The model and training-step tests once more with oneDNN held to its AVX2 kernels.

oneDNN picks convolution kernels by the CPU's instruction set, so a kernel bug can
live on AVX2 machines only (its stride-2 1x1 weight-gradient kernel gave wrong
gradients and crashed there). ``ONEDNN_MAX_CPU_ISA=AVX2`` selects those kernels on
any x86 CPU; oneDNN reads it once per process, hence the subprocess.
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
#: The tests that run the model's convolutions forward and backward.
KERNEL_TESTS = ["model/test_layers.py", "model/test_network.py", "speedups/test_recompute_bn.py",
                "speedups/test_train_options.py",
                "model/test_flows.py", "model/test_regularizers.py", "formats/test_official.py",
                "model/test_ablations.py::test_benchmark_row_trains_and_evaluates_in_process"]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's AVX2 kernels are x86")
@pytest.mark.skipif(bool(os.environ.get("ONEDNN_MAX_CPU_ISA")), reason="this run already fixes oneDNN's ISA")
def test_model_and_training_step_tests_pass_on_avx2_kernels():
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(TESTS / t) for t in KERNEL_TESTS]]
    done = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=1200)
    # A crashed kernel shows as a negative status (the signal), with no pytest summary.
    assert done.returncode == 0, f"status {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
