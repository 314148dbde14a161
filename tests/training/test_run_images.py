"""The run's image grids (pairs never wrap across rows) and the mode of atomically written files."""
import os
import stat

import pytest
import torch
from PIL import Image

from nvae import NVAE, NVAEConfig
from nvae.formats.checkpoint import atomic_torch_save, save_png
from nvae.training.run_dir import RunLog, pair_columns


def _tiny():
    return NVAEConfig(image_size=8, in_channels=1, decoder="bernoulli", num_channels_enc=4, num_channels_dec=4,
                      num_latent_scales=2, num_groups_per_scale=2, ada_groups=False, num_preprocess_blocks=1,
                      num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                      num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_latent_per_group=20, num_nf=0)


@pytest.mark.parametrize("pairs", [1, 2, 3, 4, 8, 9, 16, 25, 32, 64])
def test_pair_columns_is_even_so_no_pair_wraps(pairs):
    columns = pair_columns(pairs)
    assert columns % 2 == 0 and columns >= 2
    assert columns <= 2 * pairs


def test_training_reconstructions_put_each_input_beside_its_reconstruction(tmp_path):
    """16 pairs: 8 columns (4 pairs a row), 4 rows, as `nvae reconstruct` lays them out; not sqrt(32) = 5."""
    model = NVAE(_tiny())
    fixed = (torch.rand(16, 1, 8, 8) < 0.4).float()
    log = RunLog(tmp_path, enabled=True)
    try:
        log.images(model, fixed, step=1)
    finally:
        log.close()
    tile = 8 * 4 + 1                         # 8x8 images enlarged 4 times to 32 pixels (nearest), 1 pixel apart
    with Image.open(tmp_path / "reconstructions.png") as im:
        assert im.size == (8 * tile + 1, 4 * tile + 1)
    with Image.open(tmp_path / "samples.png") as im:   # 64 samples stay 8 x 8
        assert im.size == (8 * tile + 1, 8 * tile + 1)


def test_atomically_written_files_get_the_mode_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_torch_save({"a": torch.zeros(2)}, tmp_path / "checkpoint.pt")
        save_png(torch.rand(4, 1, 8, 8), tmp_path / "grid.png", nrow=2)
        with open(tmp_path / "plain.txt", "w"):
            pass
        os.umask(0o077)
        save_png(torch.rand(4, 1, 8, 8), tmp_path / "private.png", nrow=2)
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)
    assert mode("plain.txt") == 0o644
    assert mode("checkpoint.pt") == 0o644 and mode("grid.png") == 0o644
    assert mode("private.png") == 0o600
