"""Our checkpoint format: exact round trip, atomic writes, and refusal of anything else."""
import argparse
import io
import os
import shlex

import pytest
import torch

from nvae import NVAE, NVAEConfig
from nvae.formats.checkpoint import CheckpointError, atomic_torch_save, read_checkpoint


def tiny_model(**kw):
    base = dict(image_size=8, in_channels=1, decoder="bernoulli", num_channels_enc=4, num_channels_dec=4,
                num_latent_scales=2, num_groups_per_scale=2, ada_groups=False, num_preprocess_blocks=1,
                num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_nf=1)
    base.update(kw)
    return NVAE(NVAEConfig(**base))


@pytest.fixture
def trained_model():
    """A model whose buffers are no longer at their initial values."""
    model = tiny_model()
    model.train()
    model(torch.rand(4, 1, 8, 8).round())          # BN running statistics move
    for _ in range(3):
        model.spectral_loss()                      # u, v move; initialized flips
    return model


def test_round_trip_preserves_state_dict_exactly(trained_model, tmp_path):
    path = tmp_path / "model.pt"
    trained_model.save(path, step=7, note="hello")
    loaded = NVAE.from_checkpoint(path)
    assert loaded.config == trained_model.config
    before, after = trained_model.state_dict(), loaded.state_dict()
    assert list(before) == list(after)
    spectral = [k for k in before if k.startswith("spectral.")]
    assert "spectral.initialized" in spectral and any(k.startswith("spectral.u") for k in spectral)
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    # the loaded regulariser continues the same estimate
    assert torch.equal(loaded.spectral_loss(), trained_model.spectral_loss())
    state = read_checkpoint(path)
    assert state["step"] == 7 and state["note"] == "hello"


def test_atomic_save_leaves_only_the_target(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    atomic_torch_save({"a": torch.arange(5)}, path)
    assert os.listdir(path.parent) == ["ckpt.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(5))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    old_bytes = path.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(type(error)):
        atomic_torch_save({"a": torch.arange(100)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))


def _not_checkpoints(tmp_path, model):
    good = tmp_path / "good.pt"
    model.save(good)
    data = good.read_bytes()
    files = {}
    files["random bytes"] = os.urandom(4096)
    files["truncated checkpoint"] = data[: len(data) // 2]
    files["empty"] = b""
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, buf)
    files["plain dict"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "args": {"dataset": "mnist"}, "epoch": 3}, buf)
    files["official-looking"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    files["a list"] = buf.getvalue()
    out = {}
    for name, content in files.items():
        path = tmp_path / (name.replace(" ", "_") + ".pt")
        path.write_bytes(content)
        out[name] = path
    return out


@pytest.mark.parametrize("kind,message", [
    ("random bytes", r"is not a torch checkpoint \(neither a zip archive"),
    ("truncated checkpoint", r"is truncated or damaged \(\d+ bytes, its zip archive is incomplete\)"),
    ("empty", r"is empty \(0 bytes\); it was cut short"),
    ("plain dict", r"is not an nvae checkpoint\.$"),
    ("official-looking", r"is not an nvae checkpoint\. .*use NVAE\.from_official"),
    ("a list", r"is not an nvae checkpoint"),
])
def test_loading_a_non_checkpoint_raises_checkpoint_error(tmp_path, kind, message):
    path = _not_checkpoints(tmp_path, tiny_model(num_nf=0))[kind]
    with pytest.raises(CheckpointError, match=message) as info:
        NVAE.from_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_newer_version(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        NVAE.from_checkpoint(tmp_path / "nope.pt")
    model = tiny_model(num_nf=0)
    path = tmp_path / "future.pt"
    model.save(path)
    state = torch.load(path, weights_only=True)
    state["version"] = 99
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="newer nvae"):
        NVAE.from_checkpoint(path)


class _OpenPayload:
    """Unpickling this calls ``open(marker, 'w')``: creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(self.marker),))


def _config_dict():
    return tiny_model(num_nf=0).config.to_dict()


@pytest.mark.parametrize("payload", [_OpenPayload, _SystemPayload])
@pytest.mark.parametrize("loader", ["from_checkpoint", "from_official"])
def test_malicious_pickle_is_refused(tmp_path, payload, loader):
    marker = tmp_path / "pwned"
    model = tiny_model(num_nf=0)
    if loader == "from_checkpoint":
        obj = {"format": "nvae-checkpoint", "version": 1, "config": _config_dict(),
               "state_dict": model.state_dict(), "extra": payload(marker)}
    else:
        args = argparse.Namespace(dataset="mnist", hook=payload(marker))
        obj = {"state_dict": model.state_dict(), "args": args, "epoch": 1}
    path = tmp_path / "evil.pt"
    torch.save(obj, path)

    with pytest.raises(CheckpointError, match="which we refuse to unpickle"):
        getattr(NVAE, loader)(path)
    assert not marker.exists()

    # The file really is dangerous: a trusting load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["version", "config", "weights", "field"])
def test_damaged_nvae_checkpoint_is_a_checkpoint_error(tmp_path, damage):
    from nvae import NVAE, NVAEConfig
    from nvae.formats.checkpoint import CheckpointError
    cfg = NVAEConfig.preset("mnist_small", num_channels_enc=4, num_channels_dec=4)
    good = tmp_path / "good.pt"
    NVAE(cfg).save(good)
    state = torch.load(good, weights_only=True)
    if damage == "version":
        state["version"] = "2"
    elif damage == "config":
        del state["config"]
    elif damage == "weights":
        state["state_dict"].pop(next(iter(state["state_dict"])))
    else:
        state["config"]["num_channels_enc"] = 5
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="damaged"):
        NVAE.from_checkpoint(bad)
