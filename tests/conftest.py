import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("NVAE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"


def needs_shared(*parts):
    """Skip unless ../shared/<parts> exists (the fixtures are not in the repo)."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
