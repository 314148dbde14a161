"""Run directories: the checks before a run is written or resumed, what it logs, and reading models back.

A run directory holds ``model_config.json``, ``train_config.json``, ``checkpoint.pt``
(:meth:`nvae.training.state.TrainState.save`), TensorBoard ``events.*``, ``samples.png``,
``reconstructions.png`` and ``log.txt``. :func:`load_weights` (and :func:`load_any`) reads a
model from a run directory, one of our checkpoints or an official one, with the EMA of its
weights when the run kept one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ..formats.checkpoint import VIEWING_SIDE, CheckpointError, atomic_write, read_checkpoint, save_png
from .. import speedups
# RUN_CONTROL: the options a resumed run may change, from TrainConfig's field metadata
from ..config import PRESETS, RUN_CONTROL, TRAIN_PRESETS, NVAEConfig, TrainConfig
from ..data import prepare_batch
from ..model.network import NVAE, training_mode
from ..formats.opened import WEIGHTS, OpenedCheckpoint, open_checkpoint

log = logging.getLogger("nvae.training.loop")


class RunDirError(ValueError):
    """The run directory does not fit the request (holds another run, or nothing to resume)."""


# ------------------------------------------------------------------ checks
def holds_run(run_dir: Path) -> bool:
    return (run_dir / "checkpoint.pt").exists() or (run_dir / "model_config.json").exists()


def stored_run_configs(run_dir: Path):
    """(model config dict, train config dict, checkpoint dict or None) of an existing run directory."""
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.is_file():
        state = read_checkpoint(ckpt)
        if not isinstance(state.get("train_config"), dict):
            raise CheckpointError(f"{ckpt} holds a model but no training state; it cannot be resumed")
        check_checkpoint_belongs(run_dir, state)
        return state["config"], state["train_config"], state
    try:
        return (json.loads((run_dir / "model_config.json").read_text()),
                json.loads((run_dir / "train_config.json").read_text()), None)
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} holds no run to resume (no checkpoint.pt or configs); check the path, "
                          "or start a new run without --resume") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{run_dir} holds damaged configs ({e}); start a new run in another --run-dir") from None


def _as_stored(cls, config: dict) -> dict:
    """``config`` as its class reads it (absent fields at their defaults), in JSON's types (lists, not tuples)."""
    try:
        config = cls.from_dict(config).to_dict()
    except (TypeError, ValueError):   # unknown or malformed fields: compared as they are
        pass
    return json.loads(json.dumps(config, default=str))


def config_differences(in_checkpoint: dict, on_disk: dict, cls, where: Path, skip=()) -> list:
    """``"FIELD is A in the checkpoint and B in WHERE"`` for each field (but ``skip``) where a checkpoint's
    config (of class ``cls``: :class:`NVAEConfig` or :class:`TrainConfig`) and the JSON file ``where`` differ."""
    a, b = _as_stored(cls, in_checkpoint), _as_stored(cls, on_disk)
    missing = "(absent)"
    return [f"{k} is {json.dumps(a.get(k, missing))} in the checkpoint and {json.dumps(b.get(k, missing))} in {where}"
            for k in sorted(set(a) | set(b)) if k not in skip and a.get(k, missing) != b.get(k, missing)]


#: The configs a run directory holds beside its checkpoint: (key in checkpoint.pt, file, class, fields not compared).
_RUN_CONFIGS = (("config", "model_config.json", NVAEConfig, ()),
                ("train_config", "train_config.json", TrainConfig, RUN_CONTROL))


def check_checkpoint_belongs(run_dir: Path, state: dict) -> None:
    """Refuse a ``RUN/checkpoint.pt`` whose model or training config is not the one ``RUN/model_config.json``
    and ``RUN/train_config.json`` hold (all but :data:`RUN_CONTROL`): another run's checkpoint, or configs
    edited by hand. A config file that is absent is not compared. Nothing is written."""
    problems = []
    for key, name, cls, skip in _RUN_CONFIGS:
        path = run_dir / name
        try:
            on_disk = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path} is damaged ({e}); restore it, or start a new run in another --run-dir") from None
        if isinstance(state.get(key), dict) and isinstance(on_disk, dict):
            problems += config_differences(state[key], on_disk, cls, path, skip)
    if problems:
        raise RunDirError(f"{run_dir / 'checkpoint.pt'} does not belong to this run: {'; '.join(problems)}. "
                          "Put back the run's own checkpoint or configs (options that may change on a resume "
                          "are given as flags, e.g. --max-steps), or train into another --run-dir")


def check_same_run(stored_model: dict, stored_train: dict, model_config: NVAEConfig, cfg: TrainConfig,
                   where: Path) -> None:
    """Refuse to continue a run under a different configuration (only :data:`RUN_CONTROL` may change)."""
    model_diff = sorted(k for k, v in model_config.to_dict().items() if stored_model.get(k, v) != v)
    model_diff += sorted(set(stored_model) - set(model_config.to_dict()))
    train_diff = sorted(k for k, v in cfg.to_dict().items()
                        if k not in RUN_CONTROL and stored_train.get(k, v) != v)
    if model_diff or train_diff:
        parts = [f"model {', '.join(model_diff)}" if model_diff else "", f"training {', '.join(train_diff)}"
                 if train_diff else ""]
        raise RunDirError(f"{where} holds a run with a different configuration ({'; '.join(p for p in parts if p)} "
                          f"differ); resume it without those overrides, or train into another --run-dir")


def checkpoint_to_resume(run_dir: Path, model_config: NVAEConfig, cfg: TrainConfig, resume: bool) -> Optional[dict]:
    """The checkpoint a run continues from (None: a new run, or nothing saved yet), after checking
    that ``run_dir`` fits the request. Nothing is written."""
    if not resume:
        if holds_run(run_dir):
            raise RunDirError(f"{run_dir} already holds a run; continue it with --resume, or choose another --run-dir")
        return None
    stored_model, stored_train, state = stored_run_configs(run_dir)
    check_same_run(stored_model, stored_train, model_config, cfg, run_dir)
    return state


def data_identity(dataset: str, root: Optional[str], train_images: int) -> dict:
    """What identifies a run's training data: the data set, its folder and the number of images."""
    return {"dataset": dataset, "root": None if root is None else str(Path(root).resolve()),
            "train_images": train_images}


def check_same_data(stored: Optional[dict], identity: dict, allowed: bool, where: Path) -> None:
    """Refuse to resume a run on other data than it trained on (its schedules would change mid-run)."""
    before = (stored or {}).get("data")
    if before is None or before == identity or allowed:
        return
    def text(d):  # noqa: E306
        return f"{d['dataset']} in {d['root'] or '(built in)'}, {d['train_images']} training images"
    raise RunDirError(f"{where} trained on {text(before)}; now it is given {text(identity)}. Resume with the same "
                      "--data, or pass --allow-data-change to continue on the new data")


def run_configs(preset: Optional[str], resume_dir: Optional[Path], model_overrides: dict,
                train_overrides: dict) -> Tuple[str, NVAEConfig, TrainConfig]:
    """``(name, model config, training config)`` of a run: a preset (default ``digits``) with overrides,
    or, resuming without a preset, the stored configs of ``resume_dir`` with overrides (which
    :func:`check_same_run` later limits to :data:`RUN_CONTROL`)."""
    if resume_dir is not None and preset is None:
        stored_model, stored_train, _ = stored_run_configs(resume_dir)
        stored_train = {k: v for k, v in stored_train.items() if k != "allow_data_change"}   # asked anew each time
        model_cfg = dataclasses.replace(NVAEConfig.from_dict(stored_model), **model_overrides)
        return preset_name(model_cfg, stored_train.get("dataset")), model_cfg, TrainConfig.from_dict({**stored_train, **train_overrides})
    name = preset or "digits"
    base = TrainConfig.preset(name) if name in TRAIN_PRESETS else TrainConfig()
    return name, NVAEConfig.preset(name, **model_overrides), TrainConfig.from_dict({**base.to_dict(),
                                                                                     **train_overrides})


def preset_name(config: NVAEConfig, dataset: Optional[str] = None) -> str:
    """The preset ``config`` is, or the nearest one with the fields that differ (``digits (num_channels_enc=4)``):
    how a resumed run, whose checkpoint records configs but not the preset's name, is announced. Of presets
    that fit equally (``celebahq256`` and ``ffhq256`` are one architecture) the one named as ``dataset`` wins."""
    mine = config.to_dict()
    differences = {}
    for name, preset in PRESETS.items():
        theirs = preset.to_dict()
        differences[name] = {k: v for k, v in mine.items() if theirs.get(k) != v}
    name = min(differences, key=lambda n: (len(differences[n]), n != dataset))
    changed = differences[name]
    return name if not changed else f"{name} ({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})"


def new_run_dir(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS``: where a run goes when no directory is given."""
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunLock:
    """Exclusive ownership of a run directory while a process trains into it.

    An ``flock`` on ``RUN/.nvae.lock`` (which records the holder's PID): the kernel
    releases it when the process ends, killed or not, so a stale lock never blocks a
    resume. A second ``nvae train`` into the same directory, or a ``--resume`` of a run
    still training, is refused with the holder's PID. Under torchrun rank 0 holds it.
    """

    NAME = ".nvae.lock"

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self._fd = run_dir, run_dir / self.NAME, None
        self._made_dir = self._made_file = False

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:   # not a POSIX system: no lock, as before
            return self
        self._made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._made_file = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.run_dir} is in use by another nvae process (PID {holder}); wait for it to "
                              "finish or stop it, or train into another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self, keep: bool = True) -> None:
        """Give the directory up; with ``keep=False`` remove what taking the lock created."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if not keep and self._made_file:
            self.path.unlink(missing_ok=True)
            if self._made_dir and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()


def check_output(path: Union[str, Path], suffix: str) -> Path:
    """``path`` if a command may write its ``suffix`` file there; a clear error where the write would
    destroy something it did not make for that purpose (a run's checkpoint, configs or log, a
    directory, a file of another kind)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the output {path} is a directory; give a file name ending in {suffix}")
    run_files = {"checkpoint.pt", "model_config.json", "train_config.json", "log.txt", RunLock.NAME}
    if path.name in run_files or path.name.startswith("events.out.tfevents."):
        raise ValueError(f"refusing to write over {path}: it belongs to a run; choose another --output")
    if path.suffix != suffix:
        raise ValueError(f"the output {path} should end in {suffix} (the file this command writes)")
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """A clear error now, before the work, when ``path`` could not be written at the end: its folder (or the
    nearest one that exists, which the write would create the rest in) is not writable, or the file there is
    read-only."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"the output {path} cannot be written: {folder} is not a folder; choose another --output")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the output {path} cannot be written: the folder {folder} is not writable; make it "
                         "writable (chmod u+w) or choose another --output")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"the output {path} cannot be replaced: the file is read-only; make it writable "
                         "(chmod u+w) or choose another --output")


def write_configs(run_dir: Path, model_config: NVAEConfig, cfg: TrainConfig) -> None:
    """Both configs as JSON in ``run_dir``."""
    write_json(run_dir / "model_config.json", model_config.to_dict(), sort_keys=True)
    write_json(run_dir / "train_config.json", cfg.to_dict())


def _file_version(path: Path) -> Optional[tuple]:
    """(modification time, size) of a file, or None: whether it changed since it was read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class RunDirectory:
    """The folder a run trains into, in the order training uses it: check what is there, read the checkpoint
    to resume from, take the lock, write the configs, open the log; the checkpoint's path.

    Only the main process (``is_main``) writes: it claims the folder; the other processes of a torchrun
    job read what they resume from.
    """

    def __init__(self, path: Union[str, Path], is_main: bool = True):
        self.path, self.is_main = Path(path), is_main
        self.lock = RunLock(self.path)
        self._seen: Optional[tuple] = None

    @property
    def checkpoint(self) -> Path:
        """Where the run's training state is written and resumed from."""
        return self.path / "checkpoint.pt"

    def to_resume(self, model_config: NVAEConfig, cfg: TrainConfig, resume: bool) -> Optional[dict]:
        """The checkpoint to continue from (None when starting), after the checks of
        :func:`checkpoint_to_resume`; remembers which version of the file it read."""
        self._seen = _file_version(self.checkpoint)
        return checkpoint_to_resume(self.path, model_config, cfg, resume)

    def check_data(self, stored: Optional[dict], identity: dict, allowed: bool) -> None:
        """:func:`check_same_data` for this run."""
        check_same_data(stored, identity, allowed, self.path)

    def claim(self, model_config: NVAEConfig, cfg: TrainConfig, resume: bool, stored: Optional[dict]):
        """Main process: take the lock, read the checkpoint again if it changed since :meth:`to_resume`
        read it (or when starting afresh: no other process can write the folder now), write both configs;
        returns what to resume from."""
        self.lock.acquire()
        try:
            if not resume or _file_version(self.checkpoint) != self._seen:
                stored = checkpoint_to_resume(self.path, model_config, cfg, resume)
            _refuse_symlinked_log(self.path)     # before anything is written, not when the log opens
        except RunDirError:
            self.lock.release(keep=False)
            raise
        write_configs(self.path, model_config, cfg)
        return stored

    def open_log(self, purge_step: Optional[int] = None) -> "RunLog":
        """The run's log (``log.txt``, events, image grids); silent on processes other than the main one."""
        return RunLog(self.path, self.is_main, purge_step=purge_step)

    def release(self) -> None:
        """Give the folder back (the lock, where this process took it)."""
        self.lock.release()


def write_json(path: Union[str, Path], obj, sort_keys: bool = False) -> None:
    """``obj`` as indented JSON, written atomically. A number that is not finite (which JSON cannot
    hold, and which means the result is garbage) is an error, and nothing is written."""
    bad = _non_finite(obj)
    if bad is not None:
        raise ValueError(f"not writing {path}: {bad[0]} is {bad[1]}, not a finite number; the model or the data "
                         "hold NaN or inf (check the checkpoint)")
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _non_finite(obj, where: str = "a value"):
    """(where, value) of the first non-finite float in a JSON-like ``obj``, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, str(key))
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------ logging
class RunLog:
    """What the main process writes while a run trains: ``log.txt``, TensorBoard events, image grids.

    On other processes every method does nothing.
    """

    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int] = None):
        self.run_dir, self.enabled = run_dir, enabled
        self.writer = self.handler = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            _refuse_symlinked_log(run_dir)
            self.handler = _NoFollowFileHandler(run_dir / "log.txt")
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(self.handler)
            log.setLevel(logging.INFO)
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def info(self, msg: str, *args) -> None:
        if self.enabled:
            log.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        if self.enabled:
            log.warning(msg, *args)

    def scalars(self, step: int, stats: dict, extra: dict) -> None:
        """Batch means of the loss terms (``stats``) and per-step values (``extra``) at ``step``."""
        if not self.enabled:
            return
        for name in ("nelbo", "recon", "kl"):
            self.writer.add_scalar(f"train/{name}", stats[name].item(), step)
        for name, value in extra.items():
            self.writer.add_scalar(f"train/{name}", float(value), step)
        active = (stats["kl_channels"] > 0.1).sum(1)   # the official threshold, per latent channel
        for i in range(stats["kl_groups"].shape[0]):
            self.writer.add_scalar(f"kl/group_{i}", stats["kl_groups"][i].item(), step)
            self.writer.add_scalar(f"active/group_{i}", active[i].item(), step)
            self.writer.add_scalar(f"kl_balance/group_{i}", stats["kl_coeffs"][i].item(), step)

    @torch.no_grad()
    def images(self, model: NVAE, fixed: torch.Tensor, step: int) -> None:
        """Prior samples, and the reconstructions of the test images ``fixed``, as PNG grids."""
        if not self.enabled:
            return
        from torchvision.utils import make_grid
        with training_mode(model, False):
            # A generator of its own: writing images must not move the training's random streams.
            gen = torch.Generator(device=fixed.device).manual_seed(step)
            samples = model.sample(64, temperature=1.0, generator=gen, mean=True)
            x = prepare_batch(fixed, model.config, gen)
            recon = model.output_distribution(model(x, temperature=0.0).logits).mean()
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)
        for name, images, nrow in (("samples", samples, 8), ("reconstructions", pairs, pair_columns(len(x)))):
            save_grid(images, self.run_dir / f"{name}.png", nrow=nrow)
            self.writer.add_image(name, make_grid(images, nrow=nrow), step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            log.removeHandler(self.handler)
            self.handler.close()


class _NoFollowFileHandler(logging.FileHandler):
    """A ``FileHandler`` that appends to its file only if the file is not a symbolic link: resuming a run whose
    ``log.txt`` links elsewhere must not write into the link's target (``O_NOFOLLOW`` where the system has it,
    so the check and the open are one step)."""

    def _open(self):
        path = Path(self.baseFilename)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        if path.is_symlink():   # the check where O_NOFOLLOW is missing, and the clear error where it is not
            raise _symlink_error(path)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError:
            if path.is_symlink():   # made between the check and the open: O_NOFOLLOW refused it
                raise _symlink_error(path) from None
            raise
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def _symlink_error(path: Path) -> RunDirError:
    return RunDirError(f"{path} is a symbolic link; a run writes only its own files, never through a link. "
                       "Replace it with a plain file (or remove it), or train into another --run-dir")


def _refuse_symlinked_log(run_dir: Path) -> None:
    """A :class:`RunDirError` when ``log.txt`` or a TensorBoard events file of ``run_dir`` is a symbolic link.
    (SummaryWriter names each new file after the time, host and process, so it never opens an existing one; a
    linked one in the run is still refused, as it says the folder is not only the run's. The other files are
    replaced by a rename, which replaces a link itself, never its target.)"""
    for path in [run_dir / "log.txt", *sorted(run_dir.glob("events.out.tfevents.*"))]:
        if path.is_symlink():
            raise _symlink_error(path)


def pair_columns(n_pairs: int) -> int:
    """Grid columns for ``n_pairs`` (input, reconstruction) pairs: even, so no pair wraps across rows."""
    return 2 * max(1, int(math.sqrt(n_pairs)))


def save_grid(images: torch.Tensor, path: Path, nrow: Optional[int] = None) -> None:
    """A run's PNG grid, ``nrow`` images per row (default: square), 1 pixel apart, each image enlarged (nearest)
    to at least :data:`~nvae.formats.checkpoint.VIEWING_SIDE` pixels as every grid of the command line is;
    written atomically."""
    save_png(images, path, nrow=nrow or int(math.sqrt(images.shape[0])), padding=1, min_side=VIEWING_SIDE)


# ------------------------------------------------------------------ reading back
class LoadedModel(NamedTuple):
    """What :func:`load_weights` returns."""

    model: NVAE
    checkpoint: Path
    weights: str        #: "ema" (the run's EMA of the weights) or "raw" (the weights as trained)
    source: OpenedCheckpoint   #: the checkpoint as read (config, training config, data), for what comes next


def load_weights(path: Union[str, Path, OpenedCheckpoint], device: Union[str, torch.device] = "cpu",
                 weights: str = "auto") -> LoadedModel:
    """The model of a run directory, one of our checkpoints, or an official one, in eval mode with
    :data:`nvae.speedups.DEFAULT` applied; ``path`` may be a checkpoint already opened
    (:func:`nvae.formats.open_checkpoint`), which is not read again.

    ``weights="auto"`` gives the EMA of the weights when the run kept one (``ema_rate`` > 0)
    and the raw weights otherwise; ``"ema"`` insists on the EMA, ``"raw"`` never uses it. The
    returned :attr:`LoadedModel.weights` says which was used; fingerprints of the model
    (:func:`nvae.formats.checkpoint.model_fingerprint`, so the BN re-adjustment cache) follow it.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    source = open_checkpoint(path)
    disagreement = config_disagreement(source)
    if disagreement:   # (with no handler set up, as in the commands, logging prints it to stderr)
        logging.getLogger("nvae").warning("nvae: warning: %s", disagreement)
    model, used = source.model(weights, device)
    return LoadedModel(speedups.apply(model), source.path, used, source)


def config_disagreement(source: OpenedCheckpoint) -> Optional[str]:
    """Where the ``model_config.json`` beside one of our checkpoints disagrees with the checkpoint's own
    config (one line), or None: the checkpoint's weights decide what is computed, not the file."""
    path = source.path.parent / "model_config.json"
    if source.kind != "ours" or not isinstance(source.state.get("config"), dict) or not path.is_file():
        return None
    try:
        on_disk = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{path} cannot be read ({e}); the model comes from {source.path}"
    diff = config_differences(source.state["config"], on_disk, NVAEConfig, path) if isinstance(on_disk, dict) else []
    if not diff:
        return None
    return (f"{path} disagrees with {source.path} ({'; '.join(diff)}); "
            f"the checkpoint's weights and config are used")


def load_any(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
             weights: str = "auto") -> Tuple[NVAE, Path]:
    """``(model in eval mode, checkpoint path)``: :func:`load_weights` without saying which weights."""
    loaded = load_weights(path, device, weights)
    return loaded.model, loaded.checkpoint


def split_of(checkpoint: Union[str, Path, OpenedCheckpoint], config: NVAEConfig, split: str, dataset: Optional[str] = None,
             root: Optional[str] = None, **options) -> Tuple[str, torch.utils.data.Dataset]:
    """``(data set name, split)`` to evaluate a model of ``config`` read from ``checkpoint`` on.

    ``dataset`` and ``root`` default to what the checkpoint recorded (the folder only when the
    data set is the recorded one); images come at the model's size and channel count, and a
    data set whose images do not fit the model is a clear error. ``options`` go to
    :func:`nvae.data.build_dataset` (e.g. ``flip=False``)."""
    from ..data import build_dataset, check_images_fit
    from ..data.registry import native_shape
    recorded, recorded_root = None, None
    if not (dataset and root):
        try:
            recorded, recorded_root = data_of(checkpoint)
        except ValueError:
            if not dataset:   # nothing recorded and nothing given
                raise
    name = dataset or recorded
    folder = root or (recorded_root if name == recorded else None)
    if native_shape(name) is None:   # resized to the model's size; a fixed shape is checked below
        options = {"image_size": config.image_size, "channels": config.in_channels, **options}
    return name, check_images_fit(build_dataset(name, split, folder, **options), config, name)


def data_of(checkpoint: Union[str, Path, OpenedCheckpoint]) -> Tuple[str, Optional[str]]:
    """``(data set, data folder or None)`` a checkpoint was trained on (:meth:`OpenedCheckpoint.data`)."""
    return open_checkpoint(checkpoint).data()
