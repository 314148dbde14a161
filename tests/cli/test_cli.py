"""End-to-end: the `nvae` command on tiny data."""
import json

import pytest
import torch

from nvae import NVAE
from nvae.cli import main


def test_train_digits_writes_a_complete_run(tmp_path):
    run = tmp_path / "run"
    rc = main(["train", "--run-dir", str(run), "--max-steps", "4", "--batch-size", "32",
               "--model", "num_channels_enc=8", "--model", "num_channels_dec=8",
               "--train", "log_every=2", "--train", "image_every=4"])
    assert rc == 0
    for name in ["checkpoint.pt", "samples.png", "reconstructions.png", "log.txt", "model_config.json",
                 "train_config.json"]:
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    model = NVAE.from_checkpoint(run / "checkpoint.pt")
    assert model.config.num_channels_enc == 8
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and saved["train_config"]["batch_size"] == 32
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 4
    assert "step 4 nelbo" in (run / "log.txt").read_text()
    # the same run directory is not silently overwritten
    assert main(["train", "--run-dir", str(run), "--max-steps", "1"]) == 2


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "no_such_preset"],
    ["train", "--model", "not_a_field=1"],
    ["train", "--model", "use_se=maybe"],
    ["train", "--preset", "mnist_small", "--data", "/definitely/not/here"],
])
def test_bad_input_is_one_clear_error_and_writes_nothing(argv, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(argv + ["--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvae: error:") and "Traceback" not in err
    assert not run.exists()


def test_presets_command_lists_every_preset(capsys):
    from nvae import PRESETS
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out


def test_a_reader_that_goes_away_is_not_an_error():
    """``nvae presets | head -0``: the closed pipe ends the command quietly with status 0."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "nvae", "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    assert err == ""


def _spy_on_speedups(monkeypatch) -> list:
    """What training switches on: the speed-ups each new model runs with (``nvae.speedups.enabled``)."""
    import nvae.speedups as speedups
    seen, original = [], speedups.apply

    def spy(model, *args, **switches):
        out = original(model, *args, **switches)
        seen.append(speedups.enabled(out))
        return out

    monkeypatch.setattr(speedups, "apply", spy)
    return seen


def test_memory_options_reach_the_run(tmp_path, monkeypatch):
    """--recompute-bn and --checkpointing are recorded in the run and switched on in the model it trains."""
    seen = _spy_on_speedups(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", "--recompute-bn", "--checkpointing",
                 "--model", "num_channels_enc=8", "--model", "num_channels_dec=8"]) == 0
    stored = json.loads((run / "train_config.json").read_text())
    assert stored["recompute_bn"] is True and stored["checkpointing"] is True
    assert seen[0].recompute_bn is True and seen[0].checkpointing is True


def test_checkpointing_roles_reach_the_model_and_survive_resume(tmp_path, monkeypatch):
    """--checkpointing ROLES recomputes only those cells, is stored, and a resume keeps it without complaint."""
    seen = _spy_on_speedups(monkeypatch)
    run = tmp_path / "run"
    small = ["--model", "num_channels_enc=8", "--model", "num_channels_dec=8"]
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", "--checkpointing", "normal_post,up_post",
                 "--checkpoint-every", "1"] + small) == 0
    stored = json.loads((run / "train_config.json").read_text())
    assert stored["checkpointing"] is True and stored["checkpointing_roles"] == ["normal_post", "up_post"]
    assert set(seen[0].checkpointing) == {"normal_post", "up_post"}
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    assert set(seen[-1].checkpointing) == {"normal_post", "up_post"}


def test_unknown_checkpointing_role_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--max-steps", "1", "--checkpointing", "normal_dex"]) != 0
    err = capsys.readouterr().err
    assert "unknown cell role(s) ['normal_dex']" in err and "normal_dec" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_eval_reads_the_folder_and_image_size_the_run_trained_on(tmp_path, capsys):
    """`nvae eval RUN` of a run trained on an image folder needs neither --data nor --dataset."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(24):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(tmp_path / "imgs" / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--preset", "digits", "--train", "dataset=folder", "--train", "batch_size=8",
                 "--data", str(tmp_path / "imgs"), "--max-steps", "1", "--run-dir", str(run), "--model",
                 "num_channels_enc=4", "--model", "num_channels_dec=4"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "-k", "2", "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["dataset"] == "folder" and result["num_images"] == 1   # the held-out 5% of 24, rounded
    assert str(tmp_path / "imgs") in result["data_source"]
