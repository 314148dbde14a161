"""A checkpoint read once (nvae.formats.opened): what it says of itself, and commands that read it exactly once."""
import dataclasses
import json

import pytest
import torch

from nvae import NVAE, NVAEConfig, cli
from nvae.formats import open_checkpoint
from nvae.formats.checkpoint import CheckpointError, save_model
from nvae.training.run_dir import load_weights

from conftest import REFERENCE, count_reads


def _tiny_model() -> NVAE:
    torch.manual_seed(0)
    return NVAE(dataclasses.replace(NVAEConfig.preset("digits"), num_channels_enc=4, num_channels_dec=4)).eval()


@pytest.fixture
def run(tmp_path):
    """A run directory holding one of our checkpoints, trained on the digits."""
    run = tmp_path / "run"
    run.mkdir()
    save_model(_tiny_model(), run / "checkpoint.pt", train_config={"dataset": "digits"}, data={"root": None})
    return run


def test_a_run_directory_and_its_file_open_the_same(run):
    by_dir, by_file = open_checkpoint(run), open_checkpoint(run / "checkpoint.pt")
    assert by_dir.path == by_file.path == run / "checkpoint.pt"
    assert by_dir.kind == "ours" and not by_dir.is_official
    assert by_dir.config == _tiny_model().config
    assert by_dir.data() == ("digits", None) and by_dir.ema is None
    assert open_checkpoint(by_dir) is by_dir          # already open: not read again
    model, used = by_dir.model()
    assert used == "raw" and not model.training
    for k, v in _tiny_model().state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="no EMA"):
        by_dir.model("ema")


def test_what_is_not_a_checkpoint_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(CheckpointError, match=f"{bad} is not an nvae checkpoint"):
        open_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        open_checkpoint(tmp_path / "none")


@pytest.mark.skipif(not (REFERENCE / "mnist_tiny").exists(), reason="../shared/reference not present")
def test_an_official_checkpoint_says_so_and_gives_the_official_model():
    path = REFERENCE / "mnist_tiny" / "checkpoint.pt"
    opened = open_checkpoint(path)
    assert opened.kind == "official" and opened.is_official
    assert opened.data()[0] == "mnist"
    model, used = opened.model()
    reference = NVAE.from_official(path)
    assert used == "raw" and not model.training
    for k, v in reference.state_dict().items():
        if not k.startswith("spectral."):   # power-iteration vectors: not in official checkpoints, drawn anew
            assert torch.equal(model.state_dict()[k], v), k


def test_load_weights_reads_once_and_applies_the_default_speedups(run, monkeypatch):
    from nvae import speedups
    reads = count_reads(monkeypatch, run / "checkpoint.pt")
    loaded = load_weights(run)
    assert len(reads) == 1 and loaded.source.path == run / "checkpoint.pt"
    assert speedups.enabled(loaded.model) == speedups.DEFAULT
    load_weights(loaded.source)                 # an opened checkpoint is not read again
    assert len(reads) == 1


def test_eval_reads_the_checkpoint_once(run, monkeypatch, tmp_path):
    reads = count_reads(monkeypatch, run / "checkpoint.pt")
    assert cli.main(["eval", str(run), "-k", "2", "--max-images", "4", "--batch-size", "4", "--no-progress",
                     "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["dataset"] == "digits"
    assert len(reads) == 1, reads


def test_sample_with_bn_readjustment_at_several_temperatures_reads_the_checkpoint_once(run, monkeypatch, tmp_path):
    reads = count_reads(monkeypatch, run / "checkpoint.pt")
    assert cli.main(["sample", str(run), "--temperatures", "0.6,0.8", "--readjust-bn", "--readjust-steps", "2",
                     "-n", "4", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert (tmp_path / "s" / "samples_t0.6.png").is_file() and (tmp_path / "s" / "samples_t0.8.png").is_file()
    assert len(reads) == 1, reads


def test_bn_readjustment_at_several_temperatures_starts_each_from_the_checkpoint(run, tmp_path):
    """Each temperature's samples are those of a command asked for that temperature alone."""
    together, alone = tmp_path / "together", tmp_path / "alone"
    common = ["--readjust-bn", "--readjust-steps", "2", "-n", "4", "--no-progress", "--seed", "3"]
    assert cli.main(["sample", str(run), "--temperatures", "0.6,0.8", "--out", str(together)] + common) == 0
    for cache in run.glob("checkpoint.bn_*"):
        cache.unlink()    # no cached statistics: the second command re-adjusts afresh
    assert cli.main(["sample", str(run), "-t", "0.8", "--out", str(alone)] + common) == 0
    import numpy as np
    a, b = np.load(together / "samples_t0.8.npz"), np.load(alone / "samples_t0.8.npz")
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
