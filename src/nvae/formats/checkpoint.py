"""Our checkpoint format: plain data + tensors, written atomically, read with ``weights_only=True``.

Format 2 stores the state dict of the current module tree (latent groups as modules);
format 1 (nvae 0.1) stored the same tensors under flat tower names, and is upgraded on
loading (:func:`upgrade`), optimiser state included, so older runs load and resume.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional, Union

import torch

from ..config import NVAEConfig
from .keymap import key_map, layout

FORMAT = "nvae-checkpoint"
VERSION = 2


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message says why and what to do."""


def _read_umask() -> int:
    """The process umask without changing it: Linux's /proc/self/status, else the one read at import."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _import_umask() -> int:
    """Set-and-restore, once, while the module is imported (``os.umask`` is process-wide: not per write)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _import_umask()


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s directory, fsync, then rename it to ``path``.

    A reader never sees a half-written file, and the previous file at ``path`` stays intact
    until the new one is complete. Temporary files carry their writer's PID, so those left by
    a killed process are removed by the next write to ``path``. A full disk is said plainly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):   # mkstemp makes 0600; give the mode a plain open() gives (0666 & ~umask)
                os.fchmod(f.fileno(), 0o666 & ~_read_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if _out_of_space(e):
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path} ({kept}); free some "
                                        "space and run again") from None
        raise
    with contextlib.suppress(OSError):   # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` or anything it was raised from is a full disk (or quota)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _remove_orphans(path: Path) -> None:
    """Delete temporary files for ``path`` whose writing process no longer exists."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


#: How many pixels a side the images of a grid meant to be looked at get at least (8x8 digits: x4).
VIEWING_SIDE = 32


def viewing_scale(side: int, min_side: int = VIEWING_SIDE) -> int:
    """The whole factor that enlarges images of ``side`` pixels to at least ``min_side`` (1 if they are that large)."""
    return max(1, -(-min_side // side))


def save_png(images: torch.Tensor, path: Union[str, Path], nrow: int, padding: int = 2,
             min_side: Optional[int] = None) -> None:
    """A PNG grid of images in [0, 1], written atomically; with ``min_side``, images smaller than that are
    enlarged by a whole factor (nearest neighbour, so every pixel stays a sharp square) to at least it."""
    from torchvision.utils import save_image
    images = images.float().clamp(0, 1).cpu()
    scale = viewing_scale(images.shape[-1], min_side) if min_side else 1
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    atomic_write(path, lambda f: save_image(images, f, nrow=max(1, nrow), padding=padding, format="png"))


def safe_load(path: Union[str, Path], map_location="cpu", allowed_globals=()) -> Any:
    """``torch.load`` that never unpickles anything beyond tensors, plain data and ``allowed_globals``.

    A file it cannot read is a :class:`CheckpointError` of one line in our own words
    (:func:`_unreadable`): torch's own message is advice about ``weights_only`` that does not say
    what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means "not a checkpoint"
        raise CheckpointError(f"{path} {_unreadable(path, e)}") from None


#: how a torch checkpoint starts: a zip archive (torch >= 1.6), or the pickled magic number (older torch)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_CUT = "; it was cut short (a copy or a write that did not finish): use an intact copy"
_OTHER = "; check that the path names a checkpoint written by nvae or torch.save"


def _unreadable(path: Path, error: Exception) -> str:
    """What is wrong with the checkpoint ``path`` that ``torch.load`` failed to read with ``error``: empty,
    truncated, not a torch checkpoint at all, or holding objects we refuse to unpickle (the refused type
    named when torch's message names it)."""
    import pickle
    import re
    try:
        with open(path, "rb") as f:
            head, size = f.read(len(_LEGACY_MAGIC)), os.fstat(f.fileno()).st_size
    except OSError as e:
        return f"could not be opened ({e.strerror or e}); check its permissions"
    if size == 0:
        return "is empty (0 bytes)" + _CUT
    named = re.search(r"GLOBAL ([\w.]+)", str(error))   # torch's refusal of a class or function, by name
    refused = named is not None or isinstance(error, pickle.UnpicklingError) and "WeightsUnpickler" in str(error)
    if named:
        return (f"holds a pickled object of type '{named.group(1)}', which we refuse to unpickle (a checkpoint "
                "holds tensors and plain data only); it was not written by nvae: convert it where it was made, "
                "if you trust it")
    if not head.startswith((_ZIP_MAGIC, _LEGACY_MAGIC)):
        kind = "a plain pickle" if head.startswith(b"\x80") else "neither a zip archive nor an old-style torch file"
        return f"is not a torch checkpoint ({kind})" + _OTHER
    if refused:
        return ("holds pickled data we refuse to unpickle (a checkpoint holds tensors and plain data only); it was "
                "not written by nvae: convert it where it was made, if you trust it")
    if head.startswith(_ZIP_MAGIC):
        if "central directory" in str(error) or isinstance(error, EOFError):
            return f"is truncated or damaged ({size} bytes, its zip archive is incomplete)" + _CUT
        return "is a zip archive but not a torch checkpoint" + _OTHER
    return f"is truncated or damaged ({size} bytes, an old-style torch file that ends early)" + _CUT


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of ``model``'s state dict (names, dtypes, shapes and bytes): which weights were evaluated."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_model(model, path: Union[str, Path], **extra: Any) -> None:
    """Write ``model`` (config, weights, buffers) and any ``extra`` plain entries to ``path``."""
    state = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
             "state_dict": model.state_dict(), **extra}
    atomic_torch_save(state, path)


def read_checkpoint(path: Union[str, Path], map_location="cpu") -> Dict[str, Any]:
    """Read and check one of our checkpoints; returns its dict."""
    return check_ours(safe_load(path, map_location), path)


def check_ours(state: Any, path: Union[str, Path]) -> Dict[str, Any]:
    """``state``, read from ``path``, if it is one of our checkpoints in a format this nvae reads; else a
    :class:`CheckpointError` saying what it is instead."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        hint = (" It looks like an official NVAE checkpoint: use NVAE.from_official."
                if isinstance(state, dict) and "args" in state else "")
        raise CheckpointError(f"{path} is not an nvae checkpoint.{hint}")
    version = state.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path} is damaged: its format version is {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer nvae (format {version}); upgrade nvae")
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{path} is damaged: it lacks its config or weights")
    return state


def upgrade(state: Dict[str, Any], model) -> Dict[str, Any]:
    """``state`` (a checkpoint dict read by :func:`read_checkpoint`) in the current format, for ``model``.

    Format 1 keys map by name (:func:`nvae.formats.keymap.key_map`); the optimiser state, which
    is kept per parameter index, follows its parameters to their new places.
    """
    if state["version"] == VERSION:
        return state
    names = key_map(model, "format1")
    old = state["state_dict"]
    missing = [o for o, t in names.items() if t not in old]
    unused = sorted(set(old) - set(names.values()))
    if missing or unused:
        what = f"lacks {names[missing[0]]}" if missing else f"holds {unused[0]}, which the model has no place for"
        raise CheckpointError(f"a format-1 checkpoint {what}; it does not match its own config")
    out = {**state, "version": VERSION, "state_dict": {o: old[t] for o, t in names.items()}}
    if isinstance(state.get("optimizer"), dict):
        out["optimizer"] = _reorder_optimizer(state["optimizer"], model, names)
    return out


def _reorder_optimizer(opt_state: Dict[str, Any], model, names: Dict[str, str]) -> Dict[str, Any]:
    groups = opt_state["param_groups"]
    ours = [n for n, _ in model.named_parameters()]
    if len(groups) != 1 or len(groups[0]["params"]) != len(ours):
        raise CheckpointError("a format-1 checkpoint's optimiser state is not one group over every parameter; "
                              "start a new run from its weights instead")
    # Format 1 registered parameters in the official order.
    old_order = ["h0"] + [f"{p.format1}.{n}" for p in layout(model) if p.module is not None
                          for n, _ in p.module.named_parameters()]
    old_index = {name: i for i, name in enumerate(old_order)}
    old_ids = groups[0]["params"]
    state = {j: opt_state["state"][old_ids[old_index[names[name]]]] for j, name in enumerate(ours)
             if old_ids[old_index[names[name]]] in opt_state["state"]}
    return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(ours)))}]}


def load_model(cls, path: Union[str, Path], map_location="cpu"):
    """Rebuild the model of class ``cls`` (:class:`~nvae.NVAE`) stored at ``path``."""
    state = read_checkpoint(path, map_location)
    try:
        model = cls(NVAEConfig.from_dict(state["config"]))
        model.load_state_dict(upgrade(state, model)["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is damaged or inconsistent: {str(e).splitlines()[0][:300]}") from None
    return model.to(map_location)
