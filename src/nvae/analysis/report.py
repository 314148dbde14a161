"""One self-contained HTML page per run: training curves, images, KL per group, evaluations, configs.

The page carries everything inline (PNG images and plots as ``data:`` URIs, a few lines
of CSS), so it can be mailed, archived or opened offline; nothing refers to the network.
What the page shows is read from the run directory itself, generically, so that outputs
added by later commands appear without changes here:

* every scalar tag of the run's TensorBoard events is plotted, every logged point of it,
  and tabulated (tags ``PREFIX/group_N`` share one plot per prefix); each plot's axes say
  what they count (training step, or epoch for ``val/``) and in which unit (:data:`QUANTITIES`);
* every ``*.json`` file in the run directory other than the two configs is an evaluation
  and is shown as tables (a list of records, as ``validation.json``'s, one row per record);
* every PNG in the run directory that no other section shows, and that is not the same
  picture as one shown, goes to "Other images".

What a reader looks at first comes first: curves, then images, then numbers; the configs,
long and rarely read, come last, folded.

Images drawn from the checkpoint now (samples, reconstructions, partial posteriors) use a
fixed seed, so two reports of the same checkpoint show the same pictures.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..formats.checkpoint import CheckpointError, atomic_write, viewing_scale
from ..formats.opened import OpenedCheckpoint, open_checkpoint
from ..training.run_dir import check_output, load_weights, pair_columns

CONFIG_FILES = ("model_config.json", "train_config.json")
#: the curves a reader looks at first, in this order; every other tag follows (val/ first, then by name)
HEADLINE_TAGS = ("train/nelbo", "train/recon", "train/kl", "train/lr", "train/skipped_steps", "train/grad_norm")
GROUP_TAG = re.compile(r"^(?P<prefix>.+)/group_(?P<index>\d+)$")
Scalars = Dict[str, List[Tuple[int, float]]]
#: what each scalar the training logs measures, and its unit ("" for a pure number): the y axis of its curve.
#: Keys are tags, or the prefix of ``PREFIX/group_N`` tags. Validation (``val/``) is logged once per epoch.
QUANTITIES: Dict[str, Tuple[str, str]] = {
    "train/nelbo": ("NELBO", "nats/image"), "train/recon": ("reconstruction term", "nats/image"),
    "train/kl": ("KL, all groups", "nats/image"), "train/lr": ("learning rate", ""),
    "train/kl_coeff": ("KL weight beta", ""), "train/lambda": ("lambda, SR + BN weight", ""),
    "train/spectral_loss": ("spectral loss L_SR", ""), "train/bn_loss": ("BN loss L_BN", ""),
    "train/grad_norm": ("gradient norm (L2)", ""), "train/skipped_steps": ("steps skipped so far", "count"),
    "train/clipped_steps": ("steps clipped so far", "count"),
    "kl": ("KL", "nats/image"), "active": ("active channels", "count"), "kl_balance": ("KL balance coefficient", ""),
    "val/neg_log_p": ("-log p(x)", "nats/image"), "val/nelbo": ("NELBO", "nats/image"),
    "val/bpd_log_p": ("-log p(x)", "bits/dim"), "val/bpd_elbo": ("NELBO", "bits/dim"),
}
#: fewer training points than this and the page says how to log more
FEW_POINTS = 10
#: the run's own PNG grids narrower than this (pixels) are shown enlarged, so an 8x8 grid of digits is readable
RUN_PNG_WIDTH = 240


@dataclass(frozen=True)
class ReportOptions:
    """What :func:`write_report` draws, and from what.

    ``draw_images=False`` runs nothing through the model: the page then shows only the
    PNGs the run directory already holds, and the KL plot only from a ``kl_stats*.json``
    there. ``data`` / ``dataset`` default to what the checkpoint recorded (the digits
    data needs no folder); without data the sections that need it say so.
    """

    temperatures: Tuple[float, ...] = (0.6, 0.8, 1.0)
    draw_images: bool = True
    data: Optional[str] = None
    dataset: Optional[str] = None
    split: str = "test"
    num_samples: int = 36
    num_inputs: int = 8
    keep_groups: Optional[Tuple[int, ...]] = None   #: None: 0, 1, 2, 4, ... and every group
    partial_temperature: float = 0.8
    kl_images: int = 512
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    weights: str = "auto"   #: "ema", "raw" or "auto" (the EMA when the run kept one), as runs.load_weights

    def __post_init__(self):
        if not self.temperatures or any(not math.isfinite(t) or t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be finite numbers >= 0, at least one, got {self.temperatures}")
        for name in ("num_samples", "num_inputs", "kl_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not math.isfinite(self.partial_temperature) or self.partial_temperature < 0:
            raise ValueError(f"partial_temperature must be a finite number >= 0, got {self.partial_temperature}")
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")


@dataclass
class Section:
    """One part of the page: an anchor id, a heading, its HTML body (already escaped)."""

    id: str
    title: str
    body: str = ""
    images: List[Path] = field(default_factory=list)   #: run-directory PNGs this section shows

    def note(self, text: str) -> "Section":
        """Say in the page why (part of) this section has nothing to show."""
        self.body += f'<p class="note">{html.escape(text)}</p>\n'
        return self


# ------------------------------------------------------------------ reading the run
def read_scalars(run_dir: Union[str, Path]) -> Scalars:
    """Every scalar tag of the TensorBoard events in ``run_dir``: tag -> [(step, value), ...] by step.

    Resumed runs append to the same directory; TensorBoard's reader drops the steps a
    resume purged, so each step appears once, as the run finally logged it.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: float(e.value) for e in acc.Scalars(tag)}   # the last write of a step wins
        out[tag] = sorted(by_step.items())
    return out


def evaluation_files(run_dir: Path) -> List[Path]:
    """The JSON files of ``run_dir`` that are results (everything but the configs and partial sums)."""
    return sorted(p for p in run_dir.glob("*.json")
                  if p.name not in CONFIG_FILES and not p.name.endswith(".partial.json") and p.is_file())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return e


# ------------------------------------------------------------------ HTML pieces
def png_data_uri(png: bytes) -> str:
    """``png`` as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, min_width: int = 0) -> str:
    """An inline image; one narrower than ``min_width`` pixels is shown enlarged by a whole factor (pixelated)."""
    size = ""
    if min_width:
        from PIL import Image
        with Image.open(io.BytesIO(png)) as im:
            width = im.width
        zoom = min(4, -(-min_width // max(1, width)))
        size = f' width="{width * zoom}"' if zoom > 1 else ""
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt)}"{size}>'


def _figure(png: bytes, caption: str, min_width: int = 0) -> str:
    return f"<figure>{_img(png, caption, min_width)}<figcaption>{html.escape(caption)}</figcaption></figure>\n"


def _table(rows: Sequence[Sequence], header: Optional[Sequence[str]] = None) -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>{head}\n{body}</table>\n"


def _folded(summary: str, body: str) -> str:
    """``body`` folded under a one-line ``summary`` the reader clicks to open."""
    return f"<details><summary>{html.escape(summary)}</summary>\n{body}</details>\n"


def _text(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float):
        return f"{value:.6g}"
    if _numbers(value):
        shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:64])
        return shown + (f", ... ({len(value)} values)" if len(value) > 64 else "")
    if isinstance(value, (list, tuple)) and value and all(_numbers(v) for v in value):   # a matrix
        count = sum(len(v) for v in value)
        if count <= 64:
            return "; ".join(_text(v) for v in value)
        flat = [x for v in value for x in v]
        return f"{len(value)} lists, {count} numbers from {min(flat):.4g} to {max(flat):.4g} (in the file)"
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
        return text if len(text) <= 200 else text[:197] + "..."
    return str(value)


def _numbers(value) -> bool:
    """Whether ``value`` is a list of plain numbers."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _flatten(obj, prefix: str = "") -> List[Tuple[str, object]]:
    """A JSON object as (dotted key, value) rows; lists stay one value."""
    if not isinstance(obj, dict):
        return [(prefix or "(value)", obj)]
    rows = []
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        rows.extend(_flatten(value, name) if isinstance(value, dict) else [(name, value)])
    return rows


def tensor_png(images: torch.Tensor, nrow: int, min_side: int = 48) -> bytes:
    """A grid of images in [0, 1] as PNG bytes; small images scaled up (nearest) to ``min_side`` pixels."""
    from torchvision.utils import make_grid
    images = images.detach().float().clamp(0, 1).cpu()
    scale = max(1, min_side // images.shape[-1])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=max(1, nrow), padding=2, pad_value=1.0)
    from PIL import Image
    array = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="png")
    return buf.getvalue()


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------ sections without the model
def run_section(run_dir: Path, ckpt: Path, stored: dict, weights: str) -> Section:
    """What the run is: its checkpoint, step, the weights the images come from ("ema", "raw" or a
    reason there are none), its data and when this page was made."""
    from .. import __version__
    sec = Section("run", "Run")
    data = stored.get("data") or {}
    rows = [("run directory", str(run_dir.resolve())), ("checkpoint", ckpt.name),
            ("step", stored.get("step", "(not recorded)")),
            ("weights of the images drawn", weights),
            ("data set", data.get("dataset") or (stored.get("train_config") or {}).get("dataset", "(not recorded)")),
            ("data folder", data.get("root") or "(built in or not recorded)"),
            ("training images", data.get("train_images", "(not recorded)")),
            ("report written", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
            ("nvae version", __version__)]
    sec.body += _table(rows)
    return sec


def _config_of(run_dir: Path, stored: dict, name: str):
    """The config ``name`` (one of :data:`CONFIG_FILES`) as a dict: the run's JSON file, else the checkpoint's
    copy; an exception when the file cannot be read; None when there is neither."""
    path = run_dir / name
    if path.is_file():
        return _read_json(path)
    return stored.get(dict(zip(CONFIG_FILES, ("config", "train_config")))[name])


def configs_section(run_dir: Path, stored: dict) -> Section:
    """The model and training configs (the run's JSON files, else the checkpoint's copies), each folded."""
    sec = Section("configs", "Configs")
    for name in CONFIG_FILES:
        config = _config_of(run_dir, stored, name)
        if isinstance(config, dict):
            sec.body += _folded(f"{name}: {len(config)} fields", _table(sorted(config.items()), ("field", "value")))
        elif isinstance(config, Exception):
            sec.note(f"{run_dir / name} could not be read: {config}")
        else:
            sec.note(f"no {name} in the run directory and none in the checkpoint")
    return sec


def _plot_groups(scalars: Scalars) -> List[Tuple[str, List[str]]]:
    """(title, tags) per plot: ``PREFIX/group_N`` tags share a plot, every other tag has its own;
    ``train/`` first, then ``val/``, then the rest by name."""
    grouped: Dict[str, List[Tuple[int, str]]] = {}
    single = []
    for tag in scalars:
        m = GROUP_TAG.match(tag)
        if m:
            grouped.setdefault(m["prefix"], []).append((int(m["index"]), tag))
        else:
            single.append(tag)
    plots = [(tag, [tag]) for tag in single]
    plots += [(f"{prefix}/group_* ({len(tags)} groups)", [t for _, t in sorted(tags)])
              for prefix, tags in grouped.items()]

    def order(item):
        title = item[0]
        if title in HEADLINE_TAGS:
            return (0, HEADLINE_TAGS.index(title), title)
        head = title.split("/")[0]
        return ({"val": 1, "kl": 2, "train": 3}.get(head, 4), 0, title)
    return sorted(plots, key=order)


def _quantity(key: str) -> Tuple[str, str]:
    """(what, unit) of the tag or per-group prefix ``key``; a guess from its name for tags not in QUANTITIES."""
    if key in QUANTITIES:
        return QUANTITIES[key]
    name = key.rsplit("/", 1)[-1]
    if "bpd" in name:
        return name, "bits/dim"
    if any(word in name for word in ("nelbo", "nll", "neg_log_p", "kl", "recon")):
        return name, "nats/image"
    return name, "unit not recorded"


def axis_labels(tags: Sequence[str]) -> Tuple[str, str]:
    """(x label, y label) of the plot of ``tags`` (one tag, or the ``PREFIX/group_N`` tags of one prefix):
    validation is logged per epoch, everything else per training step; y says what and in which unit."""
    m = GROUP_TAG.match(tags[0])
    what, unit = _quantity(m["prefix"] if m else tags[0])
    x = "epoch (counted from 0)" if tags[0].startswith("val/") else "training step"
    return x, f"{what} ({unit})" if unit else what


def curve_figure(title: str, tags: List[str], scalars: Scalars):
    """The matplotlib figure of ``tags``: every logged point, axes labelled by :func:`axis_labels`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for tag in tags:
        steps, values = zip(*scalars[tag])
        label = tag.rsplit("/", 1)[-1]
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    if 1 < len(tags) <= 12:
        ax.legend(fontsize=6, ncol=2)
    finite = [v for tag in tags for _, v in scalars[tag] if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
        ax.set_yscale("log")   # a loss that falls by orders of magnitude stays readable
    from matplotlib.ticker import MaxNLocator
    xs = sorted({x for tag in tags for x, _ in scalars[tag]})
    if all(float(x).is_integer() for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))   # no "epoch 2.5"
    if len(xs) == 1:   # one validation so far: its epoch as the one tick, not a range of +-0.05
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
        ax.set_xticks([xs[0]])
    xlabel, ylabel = axis_labels(tags)
    if ylabel.endswith("(count)") and finite:   # whole numbers, 0 in view
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_ylim(min(0, min(finite)) - 0.5, max(1, max(finite)) + 0.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _few_points_note(scalars: Scalars, train_config) -> Optional[str]:
    """Why the curves are sparse and how to log more: training curves of fewer than FEW_POINTS points,
    validation curves of fewer than 3."""
    train = [points for tag, points in scalars.items() if not tag.startswith("val/")]
    val = [len(points) for tag, points in scalars.items() if tag.startswith("val/")]
    text = []
    if train and max(map(len, train)) < FEW_POINTS:
        last = max(points[-1][0] for points in train)
        every = train_config.get("log_every") if isinstance(train_config, dict) else None
        text.append(f"The training curves have at most {max(map(len, train))} points, each curve every point the "
                    "run logged: ")
        if every == 1:
            text.append(f"it logged every step, and it is {last} steps long.")
        else:
            how = f"every {every} steps (log_every)" if every else "every log_every steps"
            text.append(f"it logged its training scalars {how}, up to step {last}. For denser curves train with "
                        f"--train log_every=N, e.g. N = {max(1, last // 50)}.")
    if val and max(val) < 3:
        text.append(f" The validation curves have {max(val)} point{'s' * (max(val) != 1)}: one per validation, "
                    "which runs after every epoch of a run of up to 50 epochs, else after every 20th (the official "
                    "schedule), or every N epochs with --eval-every N.")
    return "".join(text).strip() or None


def curves_section(run_dir: Path, scalars: Scalars, train_config=None) -> Section:
    """Every scalar of the run's events: one plot per tag (per prefix for per-group tags) and a table.
    ``train_config`` (the run's, as a dict) says how often training logged, for the note on sparse curves."""
    sec = Section("curves", "Training curves")
    if not scalars:
        return sec.note(f"no TensorBoard events with scalars in {run_dir}; the run logged none "
                        "(or its events were removed)")
    note = _few_points_note(scalars, train_config)
    if note:
        sec.note(note)
    sec.body += '<div class="grid">\n'
    for title, tags in _plot_groups(scalars):
        xlabel, ylabel = axis_labels(tags)
        counts = sorted({len(scalars[t]) for t in tags})
        points = f"{counts[0]} point{'s' * (counts[0] != 1)}" if len(counts) == 1 else \
            f"{counts[0]} to {counts[-1]} points"
        sec.body += _figure(figure_png(curve_figure(title, tags, scalars)),
                            f"{title}: {points}; x: {xlabel}, y: {ylabel}")
    sec.body += "</div>\n"
    rows = []
    for tag, points in sorted(scalars.items()):
        values = [v for _, v in points]
        x = "epoch" if tag.startswith("val/") else "step"
        unit = _quantity((GROUP_TAG.match(tag) or {"prefix": tag})["prefix"])[1] or "-"
        rows.append((tag, unit, x, len(points), points[0][0], points[-1][0], points[-1][1], min(values),
                     max(values)))
    sec.body += _folded(f"Every scalar: {len(rows)} tags, their points, last value, min and max",
                        _table(rows, ("tag", "unit", "x", "points", "first x", "last x", "last value", "min",
                                      "max")))
    return sec


def _is_records(value) -> bool:
    """A list of JSON objects (as ``validation.json``'s evaluations): shown as a table, one row per object."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _evaluation_tables(content) -> str:
    """One result JSON as tables: its single values as key / value (/ unit) rows, then each list of records as
    a table of its own, a column per key; the units the file records (its ``units`` object) in the headers."""
    if not isinstance(content, dict):
        return _table(_flatten(content), ("key", "value"))
    units = content.get("units") if isinstance(content.get("units"), dict) else {}
    single = {k: v for k, v in content.items() if not _is_records(v) and not (k == "units" and units)}
    out = ""
    if single:
        rows = _flatten(single)
        if any(k in units for k, _ in rows):
            out += _table([(k, v, units.get(k, "")) for k, v in rows], ("key", "value", "unit"))
        else:
            out += _table(rows, ("key", "value"))
    for key, records in content.items():
        if not _is_records(records):
            continue
        flat = [dict(_flatten(r)) for r in records]
        columns = list(dict.fromkeys(c for r in flat for c in r))
        header = [f"{c} ({units[c]})" if c in units else c for c in columns]
        out += f"<p>{html.escape(key)}: {len(flat)} record{'s' * (len(flat) != 1)}</p>\n"
        out += _table([[r.get(c, "") for c in columns] for r in flat], header)
    return out


def evaluations_section(run_dir: Path) -> Section:
    """Every result JSON of the run directory, as tables."""
    sec = Section("evaluations", "Evaluations")
    files = evaluation_files(run_dir)
    if not files:
        return sec.note("no evaluation JSON in the run directory; nvae eval RUN, nvae fid RUN or nvae kl-stats RUN "
                        "write them there")
    for path in files:
        sec.body += f"<h3>{html.escape(path.name)}</h3>\n"
        content = _read_json(path)
        if isinstance(content, Exception):
            sec.note(f"could not be read: {content}")
        else:
            sec.body += _evaluation_tables(content)
    return sec


def other_images_section(run_dir: Path, shown: set) -> Section:
    """Every PNG of the run directory that no other section shows, and that is not the same picture
    (byte for byte) as one they show."""
    sec = Section("other-images", "Other images")
    seen = {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in sorted(shown) if p.is_file()}
    rest, same = [], []
    for path in sorted(run_dir.glob("*.png")):
        if path.resolve() in shown or not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            same.append(f"{path.name} (= {seen[digest]})")
        else:
            seen[digest] = path.name
            rest.append(path)
    if rest:
        sec.body += '<div class="grid">\n'
        for path in rest:
            _run_png(sec, path, path.name)
        sec.body += "</div>\n"
    if same:
        sec.note("not repeated, the same picture as one shown: " + ", ".join(same))
    if not rest and not same:
        sec.note("no other PNG in the run directory")
    return sec


def _png_ok(data: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return data[:8] == b"\x89PNG\r\n\x1a\n"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def _run_png(sec: Section, path: Path, caption: str) -> None:
    """Show the run's PNG ``path`` in ``sec`` (or say it is damaged), and mark it shown."""
    data = path.read_bytes()
    sec.images.append(path.resolve())
    if _png_ok(data):
        sec.body += _figure(data, caption, min_width=RUN_PNG_WIDTH)
    else:
        sec.note(f"{path.name} is not a readable PNG (damaged or truncated); not shown")


# ------------------------------------------------------------------ sections drawn from the model
def default_keep_groups(num_groups: int) -> List[int]:
    """0, 1, 2, 4, 8, ... below ``num_groups``, then ``num_groups``: rows from a prior sample to the
    reconstruction, denser where the coarse groups decide the most."""
    keep, k = [0], 1
    while k < num_groups:
        keep.append(k)
        k *= 2
    return keep + [num_groups]


def _generator(options: ReportOptions) -> torch.Generator:
    return torch.Generator(device=options.device).manual_seed(options.seed)


def samples_section(model, run_dir: Path, options: ReportOptions) -> Section:
    """Prior samples at each temperature (drawn now, seeded), and the sample grids the run holds."""
    sec = Section("samples", "Samples")
    if model is None:
        sec.note("not drawn from the checkpoint (--no-images / draw_images=False)")
    sec.body += '<div class="grid">\n'
    if model is not None:
        n = options.num_samples
        for t in options.temperatures:
            images = model.sample(n, t, _generator(options))
            sec.body += _figure(tensor_png(images, nrow=max(1, int(math.sqrt(n)))),
                                f"temperature {t:g}: {n} samples from the prior, seed {options.seed}, "
                                "the checkpoint's BN statistics")
    found = [p for p in [run_dir / "samples.png", *sorted(run_dir.glob("samples_*.png"))] if p.is_file()]
    for path in found:
        _run_png(sec, path, f"{path.name}: " + ("the last grid written during training (temperature 1)"
                                                 if path.name == "samples.png" else "written by nvae sample"))
    validation = sorted(p for p in run_dir.glob("val_samples_t*.png") if p.is_file())
    for path in validation:
        t = path.stem[len("val_samples_t"):]
        _run_png(sec, path, f"{path.name}: the grid of the latest validation, temperature {t} (BN in eval mode)")
    found += validation
    sec.body += "</div>\n"
    if model is None and not found:
        sec.note("the run directory holds no samples*.png either")
    return sec


def _inputs(model, data, options: ReportOptions) -> torch.Tensor:
    """The first ``num_inputs`` images of the split, as the model sees them (binarised / quantised)."""
    from ..data import prepare_batch
    x = torch.stack([data[i][0] for i in range(min(options.num_inputs, len(data)))]).to(options.device)
    return prepare_batch(x, model.config, _generator(options))


def reconstructions_section(model, inputs: Optional[torch.Tensor], why: str, run_dir: Path,
                            image_size: Optional[int] = None) -> Section:
    """Inputs beside their reconstructions (posterior means), each pair on one row (``pair_columns``), and the
    run's own grid (its layout read from its size, given the model's ``image_size``)."""
    from .sampling import reconstructions
    sec = Section("reconstructions", "Reconstructions")
    if inputs is None:
        sec.note(f"not drawn now: {why}")
    sec.body += '<div class="grid">\n'
    if inputs is not None:
        pairs = reconstructions(model, inputs, 0.0)
        columns = pair_columns(len(inputs))
        sec.body += _figure(tensor_png(pairs, nrow=columns),
                            f"{len(inputs)} inputs, each with its reconstruction from the posterior means on its "
                            f"right: {columns // 2} pairs per row")
    path = run_dir / "reconstructions.png"
    if path.is_file():
        columns = _grid_columns(path, image_size)
        layout = "input, reconstruction" if columns is None else (
            f"{columns // 2} (input, reconstruction) pairs per row" if columns % 2 == 0 else
            f"{columns} images per row, an odd number (a run of an older nvae): read it as input, reconstruction, "
            "input, ... in reading order; a pair can wrap onto the next row")
        _run_png(sec, path, f"reconstructions.png: the last grid written during training, {layout}")
    sec.body += "</div>\n"
    if not path.is_file() and inputs is None:
        sec.note("the run directory holds no reconstructions.png either")
    return sec


def _grid_columns(path: Path, image_size: Optional[int]) -> Optional[int]:
    """Images per row of a grid the training wrote (``run_dir.save_grid``: tiles of ``image_size`` scaled up,
    1 pixel apart), or None where its size does not say."""
    from PIL import Image
    if not image_size:
        return None
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, ValueError):
        return None
    # Grids of older runs were enlarged less (8x8 digits by 2, now 4); both are read.
    for scale in (viewing_scale(image_size), max(1, 128 // (image_size * 8))):
        tile = image_size * scale + 1
        if (width - 1) % tile == 0 and (height - 1) % tile == 0:
            return (width - 1) // tile
    return None


def partial_posterior_section(model, inputs: Optional[torch.Tensor], why: str,
                              options: ReportOptions) -> Section:
    """One row per k: the first k groups from q(z|x) (means), the rest from the prior at a temperature."""
    sec = Section("partial-posterior", "Partial posteriors")
    if inputs is None:
        return sec.note(f"not drawn: {why}")
    keep = list(options.keep_groups) if options.keep_groups is not None else default_keep_groups(model.num_groups)
    t = options.partial_temperature
    sec.body += (f"<p>Row k: the first k of {model.num_groups} latent groups (coarsest first) from q(z|x) at their "
                 f"means, the others from the prior at temperature {t:g} (seed {options.seed}); each image is the "
                 "mean of p(x|z). k = 0 is a prior sample, k = all groups the reconstruction.</p>\n")
    rows = [("input", tensor_png(inputs, nrow=len(inputs)))]
    for k in keep:
        logits = model.partial_posterior_logits(inputs, keep=k, temperature=t, generator=_generator(options))
        rows.append((f"k = {k}", tensor_png(model.output_distribution(logits).mean(), nrow=len(inputs))))
    sec.body += "<table>\n" + "".join(f"<tr><th>{html.escape(label)}</th><td>{_img(png, label)}</td></tr>\n"
                                      for label, png in rows) + "</table>\n"
    return sec


def _kl_from_json(run_dir: Path):
    """(KLStats, file name) from the first readable kl_stats*.json of the run, or (None, None)."""
    from dataclasses import MISSING, fields

    from .likelihood import KLStats
    names = [f.name for f in fields(KLStats)]
    required = [f.name for f in fields(KLStats) if f.default is MISSING]
    for path in sorted(run_dir.glob("kl_stats*.json")):
        content = _read_json(path)
        if isinstance(content, dict) and all(n in content for n in required):
            return KLStats(**{n: content[n] for n in names if n in content}), path.name
    return None, None


def _kl_png(stats) -> bytes:
    plt = _pyplot()
    groups = range(len(stats.kl_per_group))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(4.5, 0.25 * len(groups)), 4.2))
    top.bar(groups, stats.kl_per_group)
    top.set_ylabel("KL (nats/image)", fontsize=8)
    top.set_title(f"KL and active units per group, {stats.num_images} images", fontsize=9)
    bottom.bar(groups, stats.active_units, color="tab:orange")
    bottom.axhline(stats.units_per_group, color="grey", linewidth=0.8, linestyle="--")
    bottom.set_ylabel(f"active (of {stats.units_per_group})", fontsize=8)
    bottom.set_xlabel("latent group (coarsest first)", fontsize=8)
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return figure_png(fig)


def kl_section(model, data, why: str, run_dir: Path, options: ReportOptions) -> Section:
    """Per-group KL and active units (``evaluate.kl_statistics``) over the split, or from the run's
    ``kl_stats*.json`` when the model cannot be run on data."""
    from .likelihood import kl_statistics
    sec = Section("kl", "KL and active units per group")
    plots = sorted(p for p in run_dir.glob("kl_stats*.png") if p.is_file())   # nvae kl-stats's plots of the same
    if model is not None and data is not None:
        stats = kl_statistics(model, data, max_images=options.kl_images, progress=options.progress,
                              generator=_generator(options))
        source = f"computed now on the {options.split} split ({stats.num_images} images, seed {options.seed})"
    else:
        stats, name = _kl_from_json(run_dir)
        if stats is None:
            sec.note(f"not computed: {why}; and the run directory holds no kl_stats*.json "
                     "(nvae kl-stats RUN writes one)")
            for path in plots:
                _run_png(sec, path, f"{path.name}: written by nvae kl-stats")
            return sec
        source = f"read from {name} (not computed now: {why})"
    sec.body += (f"<p>{html.escape(source)}; a unit is active when its average KL exceeds "
                 f"{stats.threshold:g} nats.</p>\n")
    sec.body += _figure(_kl_png(stats), "KL per group (top) and active units (bottom)")
    if plots:   # the same kind of plot, of the same statistics: shown once
        sec.images += [p.resolve() for p in plots]
        sec.body += (f"<p>Not repeated: {html.escape(', '.join(p.name for p in plots))}, nvae kl-stats's plot of "
                     "the same statistics (over its own split and number of images: its numbers are under "
                     "Evaluations).</p>\n")
    rows = [(i, kl, active) for i, (kl, active) in enumerate(zip(stats.kl_per_group, stats.active_units))]
    sec.body += _table(rows, ("group", "KL (nats/image)", f"active units (of {stats.units_per_group})"))
    return sec


# ------------------------------------------------------------------ the page
def _report_data(source, model, options: ReportOptions):
    """The split the image sections draw on; a ValueError / OSError saying why there is none."""
    from ..training.run_dir import split_of
    return split_of(source, model.config, options.split, options.dataset, options.data)[1]


def _opened(ckpt: Path) -> Optional[OpenedCheckpoint]:
    """The checkpoint read once, or None where it cannot be read (the sections that need it say so)."""
    try:
        return open_checkpoint(ckpt)
    except CheckpointError:
        return None


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
h2{border-bottom:1px solid #ccc;padding-top:.5em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 8px;font-size:13px;text-align:left;vertical-align:middle}
.grid{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}figure{margin:4px}
figcaption{font-size:12px;color:#555;max-width:380px}#curves figure{width:380px}
img{image-rendering:pixelated}.note{color:#8a4b00;background:#fff6e5;padding:4px 8px}
summary{cursor:pointer;margin:.5em 0;font-size:14px}"""


def render_page(title: str, sections: Sequence[Section]) -> str:
    """The HTML document: a table of contents, then each section under its heading."""
    toc = "".join(f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{s.id}">\n<h2>{html.escape(s.title)}</h2>\n{s.body}</section>\n' for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
            f"</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n<ul>{toc}</ul>\n"
            f"{body}</body>\n</html>\n")


def _locate(run: Union[str, Path]) -> Tuple[Path, Path]:
    """(run directory, checkpoint) from a run directory or a checkpoint file."""
    path = Path(run)
    run_dir, ckpt = (path, path / "checkpoint.pt") if path.is_dir() else (path.parent, path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}; pass a run directory (holding checkpoint.pt) "
                                "or a checkpoint file")
    return run_dir, ckpt


def _model_and_inputs(source: Union[Path, OpenedCheckpoint], options: ReportOptions):
    """(model or None, "ema"/"raw" weights, data or None, inputs or None, why there are no data)."""
    if not options.draw_images:
        return None, "none (--no-images)", None, None, "images are not drawn from the checkpoint (--no-images)"
    model, _, weights, source = load_weights(source, options.device, options.weights)
    bad = [k for k in options.keep_groups or () if not 0 <= k <= model.num_groups]
    if bad:
        raise ValueError(f"keep groups {bad} are out of range: the model has {model.num_groups} latent groups, "
                         f"so k must be in 0..{model.num_groups}")
    try:
        data = _report_data(source, model, options)
    except (ValueError, OSError) as e:
        return model, weights, None, None, f"the {options.split} data could not be loaded ({e}); pass --data DIR"
    return model, weights, data, _inputs(model, data, options), ""


def build_report(run: Union[str, Path], options: ReportOptions = ReportOptions()) -> str:
    """The HTML page of the run in ``run`` (a run directory or a checkpoint file in one), as text.

    Sections: run, training curves, samples, reconstructions, partial posteriors, KL and active
    units, evaluations, other images, configs (folded); one that lacks its inputs says why.
    """
    from tqdm import tqdm
    run_dir, ckpt = _locate(run)
    source = _opened(ckpt)
    stored = source.state if source is not None else {}
    # an unreadable checkpoint is read once more only to say why, when images are asked for
    model, weights, data, inputs, why = _model_and_inputs(source or ckpt, options)
    model_config = _config_of(run_dir, stored, "model_config.json")
    image_size = model.config.image_size if model is not None else \
        model_config.get("image_size") if isinstance(model_config, dict) else None
    steps = [
        lambda: run_section(run_dir, ckpt, stored, weights),
        lambda: curves_section(run_dir, read_scalars(run_dir), _config_of(run_dir, stored, "train_config.json")),
        lambda: samples_section(model, run_dir, options),
        lambda: reconstructions_section(model, inputs, why, run_dir, image_size),
        lambda: partial_posterior_section(model, inputs, why, options),
        lambda: kl_section(model, data, why, run_dir, options),
        lambda: evaluations_section(run_dir),
    ]
    sections = [make() for make in tqdm(steps, desc="report sections", disable=not options.progress)]
    shown = {p for s in sections for p in s.images}
    sections.append(other_images_section(run_dir, shown))
    sections.append(configs_section(run_dir, stored))
    return render_page(f"nvae run {run_dir.resolve().name}", sections)


def write_report(run: Union[str, Path], output: Optional[Union[str, Path]] = None,
                 options: ReportOptions = ReportOptions()) -> Path:
    """Write :func:`build_report`'s page to ``output`` (default ``RUN/report.html``) atomically; its path."""
    run_dir, _ = _locate(run)
    output = check_output(output if output is not None else run_dir / "report.html", ".html")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"the folder {output.parent} of the output does not exist; create it or choose "
                                "another --output")
    page = build_report(run, options)
    atomic_write(output, lambda f: f.write(page.encode("utf-8")))
    return output
