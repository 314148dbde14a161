import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("NVAE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (``"_common"``: the helpers the scripts share).

    The scripts are not a package: each imports ``_common`` as a top-level module, found because
    ``python benchmarks/NAME.py`` puts ``benchmarks/`` first on ``sys.path``. This imports them the
    same way, with ``benchmarks/`` on ``sys.path`` for the import only; each loads once per session.
    """
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def needs_shared(*parts):
    """Skip unless ../shared/<parts> exists (the fixtures are not in the repo)."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")


def file_listing(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time (what a refused command must not touch)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def count_reads(monkeypatch, path: Path) -> list:
    """Every ``torch.load`` of ``path`` from now on (the test's end undoes it), appended to the returned list."""
    reads, real = [], torch.load

    def counting(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).resolve() == Path(path).resolve():
            reads.append(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return reads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
