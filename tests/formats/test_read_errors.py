"""A checkpoint that cannot be read is one line of our own words: the file first, then what is wrong with it
(empty, cut short, not a torch checkpoint, objects we refuse to unpickle) and what to do. torch's own
message is advice about ``weights_only`` that says nothing about the file, so none of it may leak through."""
import argparse
import io
import pickle
import zipfile

import pytest
import torch

from nvae.formats.checkpoint import CheckpointError, safe_load


def _torch_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "hello")
    return buf.getvalue()


GOOD = _torch_bytes({"w": torch.zeros(64)})
LEGACY = _torch_bytes({"w": torch.zeros(64)}, _use_new_zipfile_serialization=False)

CASES = {
    "empty": (b"", r"is empty \(0 bytes\); it was cut short"),
    "truncated zip checkpoint": (GOOD[: len(GOOD) // 2], r"is truncated or damaged \(\d+ bytes, its zip archive"),
    "truncated old-style checkpoint": (LEGACY[:40], r"is truncated or damaged \(40 bytes, an old-style torch file"),
    "text": (b"this is not a checkpoint", r"is not a torch checkpoint \(neither a zip archive"),
    "a plain pickle": (pickle.dumps({"a": 1}, protocol=4), r"is not a torch checkpoint \(a plain pickle\)"),
    "another zip archive": (_zip_bytes(), r"is a zip archive but not a torch checkpoint"),
    "a refused object": (_torch_bytes({"args": argparse.Namespace(x=1)}),
                         r"holds a pickled object of type 'argparse\.Namespace', which we refuse to unpickle"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_unreadable_checkpoint_is_one_line_naming_the_file_and_the_problem(tmp_path, name):
    content, message = CASES[name]
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        safe_load(path)
    text = str(info.value)
    assert text.startswith(f"{path} ") and "\n" not in text
    assert "weights_only" not in text and "torch.load" not in text   # our words, not torch's advice


def test_the_readable_forms_still_load(tmp_path):
    """The classification only runs on failure: both torch formats still read."""
    for name, content in (("zip.pt", GOOD), ("legacy.pt", LEGACY)):
        (tmp_path / name).write_bytes(content)
        assert torch.equal(safe_load(tmp_path / name)["w"], torch.zeros(64))
