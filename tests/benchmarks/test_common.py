"""benchmarks/_common.py: the CPU line printed beside every figure, and the median timer."""
import pytest

from conftest import load_benchmark

common = load_benchmark("_common")

AVX512 = {"sse4_1", "avx2", "avx512f", "avx512bw"}


@pytest.mark.parametrize("cap, onednn", [(None, "AVX512_CORE"), ("avx2", "AVX2"), ("ALL", "AVX512_CORE")])
def test_onednn_isa_is_the_narrower_of_the_cpu_and_the_cap(cap, onednn, monkeypatch):
    monkeypatch.setattr(common, "_cpu_flags_and_model", lambda: (AVX512, "Some CPU"))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    d = common.cpu_description()
    assert (d["cpu"], d["cpu_isa"], d["onednn_isa"], d["onednn_max_cpu_isa"]) == ("Some CPU", "AVX512_CORE", onednn, cap)
    line = common.describe_cpu()
    assert line.startswith(f"Some CPU, AVX512_CORE; oneDNN {onednn}") and "thread(s)" in line
    assert (f"(ONEDNN_MAX_CPU_ISA={cap})" in line) == (cap is not None)


def test_this_machine_is_described_and_its_peak_memory_measured():
    line = common.describe_cpu()
    assert "; oneDNN " in line and "thread(s); torch " in line
    assert common.peak_rss_gb() > 0


def test_median_ms_calls_once_untimed_then_repeats():
    calls = []
    assert common.median_ms(lambda: calls.append(1), 5) >= 0
    assert len(calls) == 6
