"""benchmarks/step_ratios.py: its option strings and one tiny run."""
import pytest

from conftest import load_benchmark

step_ratios = load_benchmark("step_ratios")


def test_option_strings():
    small = step_ratios.depthwise.SMALL_MAP
    assert step_ratios.parse_option("plain") == (False, False, None, small, False)
    assert step_ratios.parse_option("recompute-bn") == (True, False, None, small, False)
    assert step_ratios.parse_option("checkpointing") == (False, True, None, small, False)
    assert step_ratios.parse_option("onednn-depthwise+recompute-bn") == (True, False, None, 0, False)
    assert step_ratios.parse_option("recompute-bn+checkpointing=normal_post,up_post") == (
        True, True, ["normal_post", "up_post"], small, False)
    assert step_ratios.parse_option("adamax-foreach") == (False, False, None, small, True)


def test_unknown_option_part_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown option part 'recompute'"):
        step_ratios.parse_option("recompute+checkpointing")
    with pytest.raises(SystemExit, match=r"unknown cell role\(s\) \['post'\]"):
        step_ratios.parse_option("checkpointing=post")


def test_tiny_run_prints_a_ratio_per_option(capsys):
    step_ratios.main(["plain", "recompute-bn+checkpointing=normal_post", "--batch", "2", "--rounds", "1"])
    cpu, *lines = capsys.readouterr().out.splitlines()
    assert cpu.startswith("# ") and "thread(s)" in cpu      # the machine beside the figures
    assert lines[0].startswith("preset=mnist_small batch=2")
    assert lines[1].startswith("plain") and lines[1].endswith("x1.00")
    assert lines[2].startswith("recompute-bn+checkpointing=normal_post") and " x" in lines[2]
