"""benchmarks/first_light.sh, the one command for a GPU's first run: every command in it takes its arguments (a typo
would cost a GPU session), and the parts fit the time a session gives."""
import re
import shlex
from pathlib import Path

import pytest

from conftest import load_benchmark
from nvae.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "first_light.sh"


def _parts():
    """(name, seconds, argv) of every ``part`` line, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    parts = []
    for line in text.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("part ") else []
        if words:
            parts.append((words[1], int(words[2]), [w.replace('$OUT', "out") for w in words[3:]]))
    return parts


def test_the_parts_fit_about_nine_minutes():
    parts = _parts()
    assert [p[0] for p in parts] == ["gpu_check", "activation_memory_cuda", "ddp_nccl", "gpu_check_compile"]
    assert sum(seconds for _, seconds, _ in parts) <= 10 * 60


@pytest.mark.parametrize("name", ["gpu_check", "activation_memory_cuda", "ddp_nccl", "gpu_check_compile"])
def test_every_command_takes_its_arguments(name, monkeypatch):
    _, _, argv = next(p for p in _parts() if p[0] == name)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)   # the commands are for a GPU; parse them here
    if argv[0] == "torchrun":
        assert argv[1:4] == ["--standalone", "--nproc_per_node", "1"] and argv[4:6] == ["-m", "nvae"]
        args = build_parser().parse_args(argv[6:])
        assert args.device == "cuda" and args.max_steps == 3
    else:
        assert argv[0] == "python" and re.fullmatch(r"benchmarks/\w+\.py", argv[1])
        module = load_benchmark(Path(argv[1]).stem)
        parse = getattr(module, "parse_args")
        args = parse(argv[2:])
        assert str(args.device) == "cuda"
