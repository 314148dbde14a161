"""Bulk sampling (nvae.analysis.bulk_samples): numbered chunks, resume after a kill, independence of the number of processes."""
import json

import numpy as np
import pytest
import torch

import nvae.analysis.bulk_samples as bulk
from gloo import WORLD, spawn
from nvae import NVAE, NVAEConfig, speedups
from nvae.analysis.bulk_samples import BulkConfig, chunk_files, chunk_generator, first_samples, iter_chunks, sample_to_chunks
from nvae.cli import main

N, BATCH = 5, 2          # three chunks: 2, 2, 1


def _model() -> NVAE:
    torch.manual_seed(0)
    # 8x8 images, mixture decoder; with the speed-ups every command runs with (BN folded in evaluation)
    return speedups.apply(NVAE(NVAEConfig.preset("digits"))).eval()


def _arrays(out_dir):
    return [dict(np.load(p)) for p in chunk_files(out_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted one-process run: its folder and result."""
    out = tmp_path_factory.mktemp("ref") / "samples_t1"
    return out, sample_to_chunks(_model(), out, BulkConfig(N, BATCH))


def test_chunks_count_shapes_and_numbering(reference):
    out, result = reference
    assert (result.num_chunks, result.drawn, result.kept) == (3, 3, 0)
    assert [p.name for p in chunk_files(out)] == ["00000.npz", "00001.npz", "00002.npz"]
    arrays = _arrays(out)
    assert [a["samples"].shape for a in arrays] == [(2, 1, 8, 8), (2, 1, 8, 8), (1, 1, 8, 8)]
    assert all(a["samples"].dtype == np.float32 and 0 <= a["samples"].min() <= a["samples"].max() <= 1
               for a in arrays)
    assert np.array_equal(np.concatenate([a["index"] for a in arrays]), np.arange(N))
    assert result.grid == out.with_name("samples_t1.png") and result.grid.is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n"] == N and manifest["batch"] == BATCH and manifest["temperature"] == [1.0] * 6
    assert not list(out.parent.rglob(".*.tmp"))
    assert torch.equal(first_samples(out, 3), torch.cat(list(iter_chunks(out)))[:3])


def test_a_chunk_is_drawn_from_its_own_generator(reference):
    out, _ = reference
    model = _model()
    second = model.sample(2, 1.0, chunk_generator(0, 1))
    assert np.array_equal(_arrays(out)[1]["samples"], second.numpy())
    a, b = (torch.randn(4, generator=chunk_generator(0, i)) for i in (0, 1))
    assert not torch.equal(a, b) and not torch.equal(a, torch.randn(4, generator=chunk_generator(1, 0)))


def test_resume_after_a_kill_draws_only_the_missing_chunks(reference, tmp_path, monkeypatch):
    out = tmp_path / "samples_t1"
    real, drawn = bulk.draw_chunk, []

    def dies_after_two(model, config, index):
        if len(drawn) == 2:
            raise KeyboardInterrupt   # the process is stopped while drawing the third chunk
        drawn.append(index)
        return real(model, config, index)

    monkeypatch.setattr(bulk, "draw_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample_to_chunks(_model(), out, BulkConfig(N, BATCH))
    assert len(chunk_files(out)) == 2 and not (out.with_name("samples_t1.png")).exists()
    monkeypatch.setattr(bulk, "draw_chunk", real)
    result = sample_to_chunks(_model(), out, BulkConfig(N, BATCH))
    assert (result.drawn, result.kept) == (1, 2)            # a finished chunk is never redrawn
    ref_dir = reference[0]
    mine, theirs = _arrays(out), _arrays(ref_dir)
    assert [p.name for p in chunk_files(out)] == [p.name for p in chunk_files(ref_dir)]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(mine, theirs) for k in ("samples", "index"))
    assert np.array_equal(np.concatenate([a["index"] for a in mine]), np.arange(N))   # no duplicate, none missing


def test_a_folder_of_other_arguments_is_refused(reference, tmp_path):
    out = tmp_path / "s"
    sample_to_chunks(_model(), out, BulkConfig(3, BATCH))
    with pytest.raises(ValueError, match=r"other arguments \(seed: 0 there, 1 now\)"):
        sample_to_chunks(_model(), out, BulkConfig(3, BATCH, seed=1))
    other = _model()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="weights_sha256"):
        sample_to_chunks(other, out, BulkConfig(3, BATCH))
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        sample_to_chunks(_model(), out, BulkConfig(3, BATCH))


def test_uint8_chunks_round_as_the_pngs(reference, tmp_path):
    out = tmp_path / "u8"
    sample_to_chunks(_model(), out, BulkConfig(N, BATCH, dtype="uint8"))
    for a, b in zip(_arrays(out), _arrays(reference[0])):
        assert a["samples"].dtype == np.uint8
        assert np.array_equal(a["samples"], np.floor(b["samples"] * 255 + 0.5).astype(np.uint8))


def test_bad_configs():
    for kwargs, says in [({"n": 0}, "n must be a positive integer"), ({"n": 2, "batch": 0}, "batch must"),
                         ({"n": 2, "seed": -1}, "seed must be a non-negative"), ({"n": 2, "dtype": "f16"}, "dtype")]:
        with pytest.raises(ValueError, match=says):
            BulkConfig(**kwargs)


# ------------------------------------------------------------------ processes
def _gloo_worker(rank: int, out: str) -> int:
    from nvae.distributed import init_distributed
    ctx = init_distributed("cpu")           # joins the process group the test harness made
    return sample_to_chunks(_model(), out, BulkConfig(N, BATCH), ctx).drawn


def test_two_processes_write_the_files_of_one(tmp_path):
    out = tmp_path / "samples_t1"
    drawn = spawn(_gloo_worker, tmp_path, str(out))
    assert drawn == [2, 1] and WORLD == 2                   # chunks 0, 2 by rank 0; chunk 1 by rank 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # as the workers: a convolution's rounding depends on the number of threads
    try:
        sample_to_chunks(_model(), tmp_path / "one" / "samples_t1", BulkConfig(N, BATCH))
    finally:
        torch.set_num_threads(threads)
    mine, theirs = _arrays(out), _arrays(tmp_path / "one" / "samples_t1")
    assert len(mine) == len(theirs) == 3
    assert all(np.array_equal(a["samples"], b["samples"]) for a, b in zip(mine, theirs))
    assert out.with_name("samples_t1.png").is_file()


# ------------------------------------------------------------------ the CLI
def test_sample_command_small_n_as_before_large_n_in_chunks(reference, tmp_path, capsys):
    _model().save(tmp_path / "checkpoint.pt")
    out = tmp_path / "s"
    args = ["sample", str(tmp_path), "--batch", str(BATCH), "--out", str(out), "--no-progress"]
    assert main(args + ["-n", str(BATCH)]) == 0                 # n <= batch: one grid and one .npz, as ever
    small = np.load(out / "samples_t1.npz")["images"]
    assert main(args + ["-n", str(N)]) == 0
    assert "3 chunks" in capsys.readouterr().out
    arrays = _arrays(out / "samples_t1")
    assert np.array_equal(arrays[0]["samples"], small)          # the small run is chunk 0 of the large one
    assert all(np.array_equal(a["samples"], b["samples"]) for a, b in zip(arrays, _arrays(reference[0])))
    assert main(args + ["-n", str(N)]) == 0                      # again: nothing to draw
    assert "drew 0, found 3" in capsys.readouterr().out
    assert main(args + ["-n", str(N), "--seed", "3"]) == 2
    assert "other arguments" in capsys.readouterr().err
