"""`nvae report`: one self-contained HTML page per run (nvae.analysis.report)."""
import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from nvae import NVAE
from nvae.cli import main
from nvae.analysis.report import (FEW_POINTS, QUANTITIES, ReportOptions, axis_labels, curve_figure,
                                  curves_section, default_keep_groups, tensor_png, write_report)
from nvae.training.run_dir import pair_columns, save_grid

#: in page order: what a reader looks at first (curves, images) before the numbers and the configs
SECTIONS = ["run", "curves", "samples", "reconstructions", "partial-posterior", "kl", "evaluations", "other-images",
            "configs"]
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base"}
SMALL = dict(temperatures=(0.5, 1.0), num_samples=4, num_inputs=3, kl_images=16, progress=False)


class Page(HTMLParser):
    """What a test needs from the page: sections (in page order) with their text, tables, images and image
    captions (alt), every URL and id, and every tag left open or closed out of order."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.urls, self.tags, self.ids = {}, [], set(), []
        self.misnested, self._open = [], []
        self._section = self._cell = None
        self._rows = []
        self.feed(text)
        self.close()
        self.misnested += [f"<{t}> never closed" for t in self._open]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag not in VOID:
            self._open.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action", "data", "poster") and v]
        if tag == "section":
            self._section = self.sections.setdefault(attrs["id"], {"text": "", "images": [], "rows": [], "alts": [],
                                                                   "folded": 0})
        elif self._section is not None and tag == "details":
            self._section["folded"] += 1
        elif self._section is not None and tag == "img":
            self._section["images"].append(attrs["src"])
            self._section["alts"].append(attrs.get("alt") or "")
        elif self._section is not None and tag == "tr":
            self._section["rows"].append([])
        elif self._section is not None and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if self._open and self._open[-1] == tag:
            self._open.pop()
        else:
            self.misnested.append(f"</{tag}> while {self._open[-1:] or 'nothing'} is open")
        if tag == "section":
            self._section = None
        elif tag in ("td", "th") and self._cell is not None:
            self._section["rows"][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._section is not None:
            self._section["text"] += data
        if self._cell is not None:
            self._cell += data


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,"), uri[:40]
    png = base64.b64decode(uri.split(",", 1)[1], validate=True)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        im.load()
        return np.asarray(im)


def check_self_contained(page: Page) -> None:
    """The page parses into well-nested HTML, every section is there and says something, every link is an
    anchor on the page, and every image is embedded, decodes as PNG and has a caption (alt)."""
    assert not page.misnested, page.misnested[:5]
    assert len(page.ids) == len(set(page.ids)), "duplicate ids"
    assert set(SECTIONS) <= set(page.sections)
    for name in SECTIONS:
        assert page.sections[name]["text"].strip(), name
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    for url in page.urls:   # embedded data or an anchor on the page; nothing fetched from anywhere
        assert url.startswith(("data:image/png;base64,", "#")), url[:60]
        assert not url.startswith("#") or url[1:] in page.ids, url
    for section in page.sections.values():
        assert all(section["alts"]), "an image without alt text"
        for uri in section["images"]:
            decode(uri)


def every_image(page: Page) -> list:
    return [uri for section in page.sections.values() for uri in section["images"]]


def grid_columns(image: np.ndarray, side: int, padding: int) -> int:
    """Tiles per row of a make_grid image of ``side``-pixel tiles ``padding`` apart (its width must say so)."""
    width = image.shape[1]
    assert (width - padding) % (side + padding) == 0, (width, side, padding)
    return (width - padding) // (side + padding)


def scalars_of(run_dir):
    """Every scalar of the run's events, read here independently of nvae.analysis.report."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "3", "--batch-size", "16",
                 "--model", "num_channels_enc=4", "--model", "num_channels_dec=4",
                 "--train", "log_every=1", "--train", "image_every=3"]) == 0
    return run


@pytest.fixture(scope="module")
def full(run, tmp_path_factory):
    """The page drawn from the Python API, every section from the checkpoint and the digits test split."""
    out = tmp_path_factory.mktemp("page") / "page.html"
    assert write_report(run, out, ReportOptions(**SMALL)) == out
    return Page(out.read_text())


def test_every_section_is_there_and_every_image_decodes(full, run):
    check_self_contained(full)
    model = NVAE.from_checkpoint(run / "checkpoint.pt")
    # two drawn sample grids plus the run's samples.png; the run's reconstructions.png beside the drawn one
    assert len(full.sections["samples"]["images"]) == 3
    assert len(full.sections["reconstructions"]["images"]) == 2
    assert len(full.sections["partial-posterior"]["images"]) == 1 + len(default_keep_groups(model.num_groups))
    assert len(full.sections["kl"]["images"]) == 1 and not full.sections["other-images"]["images"]
    assert "model_config.json" in full.sections["configs"]["text"]
    assert ["num_channels_enc", "4"] in full.sections["configs"]["rows"]


def test_curves_and_images_come_first_and_the_configs_last_folded(full):
    assert list(full.sections) == SECTIONS
    assert full.sections["configs"]["folded"] == 2   # model_config.json and train_config.json, one fold each
    assert full.sections["curves"]["folded"] == 1    # the long table of every scalar, under the plots


def test_no_picture_is_shown_twice(full):
    images = every_image(full)
    assert len(images) == len(set(images))


def test_the_curves_show_every_scalar_of_the_events(full, run):
    events = scalars_of(run)
    assert {"train/nelbo", "train/lr", "train/skipped_steps", "train/grad_norm", "kl/group_0"} <= set(events)
    rows = {r[0]: r for r in full.sections["curves"]["rows"][1:]}
    assert set(rows) == set(events)
    for tag, points in events.items():
        values = [v for _, v in points]
        assert rows[tag][3:] == [str(len(points)), str(points[0][0]), str(points[-1][0]), f"{values[-1]:.6g}",
                                 f"{min(values):.6g}", f"{max(values):.6g}"], tag
        assert rows[tag][2] == "step"
    assert rows["train/nelbo"][1] == "nats/image" and rows["active/group_0"][1] == "count"
    # one plot per tag, the per-group tags of a prefix together
    per_group = {t.rsplit("/", 1)[0] for t in events if "/group_" in t}
    single = [t for t in events if "/group_" not in t]
    assert len(full.sections["curves"]["images"]) == len(single) + len(per_group)
    # every tag the training logs has its quantity and unit written down (a new tag must be added to QUANTITIES)
    assert set(single) | per_group <= set(QUANTITIES)
    # the run logged every step, three of them: the page says why the curves are short
    curves = full.sections["curves"]["text"]
    assert "at most 3 points" in curves and "logged every step" in curves


def test_each_curve_labels_its_axes_with_what_and_the_unit():
    scalars = {"val/nelbo": [(0, 90.0), (1, 85.0)], "val/bpd_elbo": [(0, 0.3), (1, 0.25)],
               "train/nelbo": [(50, 100.0), (100, 95.0)], "train/lr": [(50, 1e-3), (100, 9e-4)],
               "active/group_0": [(50, 3.0)], "active/group_1": [(50, 4.0)], "train/skipped_steps": [(50, 0.0)],
               "mystery/tag": [(1, 2.0)]}
    expected = {("val/nelbo",): ("epoch", "nats/image"), ("val/bpd_elbo",): ("epoch", "bits/dim"),
                ("train/nelbo",): ("training step", "nats/image"), ("train/lr",): ("training step", "learning rate"),
                ("active/group_0", "active/group_1"): ("training step", "(count)"),
                ("train/skipped_steps",): ("training step", "(count)"),
                ("mystery/tag",): ("training step", "unit not recorded")}
    import matplotlib.pyplot as plt
    for tags, (x, y) in expected.items():
        fig = curve_figure("t", list(tags), scalars)   # the labels drawn on the plot itself
        try:
            xlabel, ylabel = fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
        finally:
            plt.close(fig)
        assert (xlabel, ylabel) == axis_labels(list(tags))
        assert xlabel.startswith(x) and y in ylabel, (tags, xlabel, ylabel)
    assert "step" not in axis_labels(["val/neg_log_p"])[0]


def test_short_runs_say_how_to_log_more(tmp_path):
    sparse = {"train/nelbo": [(50, 100.0), (100, 95.0), (120, 94.0)], "val/nelbo": [(0, 99.0)]}
    page = Page(f'<section id="curves">{curves_section(tmp_path, sparse, {"log_every": 50}).body}</section>')
    text = page.sections["curves"]["text"] + " ".join(page.sections["curves"]["alts"])
    assert "--train log_every=N" in text and "every 50 steps" in text and "at most 3 points" in text
    assert "3 points; x: training step" in text and "1 point; x: epoch" in text
    assert "validation curves have 1 point" in text and "--eval-every N" in text
    dense = {"train/nelbo": [(i, 1.0) for i in range(FEW_POINTS)], "val/nelbo": [(0, 99.0), (1, 98.0), (2, 97.0)]}
    assert 'class="note"' not in curves_section(tmp_path, dense, {"log_every": 1}).body


def test_drawn_images_are_the_models_with_the_fixed_seed(full, run):
    model = NVAE.from_checkpoint(run / "checkpoint.pt").eval()
    first = model.sample(4, 0.5, torch.Generator().manual_seed(0))
    assert np.array_equal(decode(full.sections["samples"]["images"][0]), decode_png(tensor_png(first, nrow=2)))
    from nvae.data import build_dataset, prepare_batch
    data = build_dataset("digits", "test")
    x = prepare_batch(torch.stack([data[i][0] for i in range(3)]), model.config, torch.Generator().manual_seed(0))
    recon = model.output_distribution(model(x, temperature=0.0).logits).mean()
    last_row = full.sections["partial-posterior"]["images"][-1]     # k = every group: the reconstruction
    assert np.array_equal(decode(last_row), decode_png(tensor_png(recon, nrow=3)))
    assert np.array_equal(decode(full.sections["partial-posterior"]["images"][0]), decode_png(tensor_png(x, nrow=3)))
    # reconstructions: input, reconstruction, input, ... with an even number of columns, so no pair wraps
    drawn = decode(full.sections["reconstructions"]["images"][0])
    pairs = torch.stack([x, recon], dim=1).flatten(0, 1)
    assert np.array_equal(drawn, decode_png(tensor_png(pairs, nrow=pair_columns(3))))
    side = decode_png(tensor_png(x[:1], nrow=1)).shape[1]   # one image as the page scales it (alone: no padding)
    assert grid_columns(drawn, side, 2) % 2 == 0
    # the run's own grid: 16 fixed test images, the layout said in its caption
    caption = full.sections["reconstructions"]["alts"][1]
    assert f"{pair_columns(16) // 2} (input, reconstruction) pairs per row" in caption


def decode_png(png: bytes) -> np.ndarray:
    return decode("data:image/png;base64," + base64.b64encode(png).decode())


def test_later_outputs_appear_without_being_named(run, tmp_path):
    """New scalar tags, result JSONs and PNGs in the run directory show up; a kl_stats JSON feeds the KL plot."""
    from torch.utils.tensorboard import SummaryWriter
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with SummaryWriter(str(copy)) as w:
        for step, value in ((1, 91.5), (3, 88.25)):
            w.add_scalar("val/nelbo", value, step)
    (copy / "eval_test_K7.json").write_text(json.dumps({"nll": 123.456, "bits": {"per_dim": 0.25}}))
    (copy / "eval_test_K7.partial.json").write_text("{}")
    (copy / "kl_stats_test.json").write_text(json.dumps(
        {"kl_per_group": [1.5, 2.5], "active_units": [3, 4], "units_per_group": 4, "threshold": 0.1,
         "num_images": 9}))
    save_grid(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), copy / "partial_keep.png")
    out = write_report(copy, options=ReportOptions(draw_images=False, progress=False))
    assert out == copy / "report.html"
    page = Page(out.read_text())
    check_self_contained(page)
    rows = {r[0]: r for r in page.sections["curves"]["rows"][1:]}
    assert rows["val/nelbo"][1:7] == ["nats/image", "epoch", "2", "1", "3", "88.25"]
    val = [alt for alt in page.sections["curves"]["alts"] if alt.startswith("val/nelbo")]
    assert val == ["val/nelbo: 2 points; x: epoch (counted from 0), y: NELBO (nats/image)"]
    evals = page.sections["evaluations"]
    assert ["nll", "123.456"] in evals["rows"] and ["bits.per_dim", "0.25"] in evals["rows"]
    assert "partial.json" not in evals["text"] and "model_config" not in evals["text"]
    assert ["group", "KL (nats/image)", "active units (of 4)"] in page.sections["kl"]["rows"]
    assert ["1", "2.5", "4"] in page.sections["kl"]["rows"] and "kl_stats_test.json" in page.sections["kl"]["text"]
    assert "partial_keep.png" in page.sections["other-images"]["text"]
    assert len(page.sections["other-images"]["images"]) == 1
    assert "--no-images" in page.sections["partial-posterior"]["text"]


def test_missing_inputs_are_said_in_their_sections(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "checkpoint.pt", bare / "checkpoint.pt")
    options = ReportOptions(**{**SMALL, "temperatures": (1.0,), "num_samples": 1}, dataset="mnist",
                            data=str(tmp_path / "no_mnist_here"))
    page = Page(write_report(bare, options=options).read_text())
    check_self_contained(page)
    assert "no TensorBoard events" in page.sections["curves"]["text"]
    assert "no evaluation JSON" in page.sections["evaluations"]["text"]
    for name in ("reconstructions", "partial-posterior", "kl"):
        assert "could not be loaded" in page.sections[name]["text"] and "--data" in page.sections[name]["text"]
    assert len(page.sections["samples"]["images"]) == 1
    assert ["num_channels_dec", "4"] in page.sections["configs"]["rows"]   # from the checkpoint's copy


def test_cli_writes_the_page(run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run), "-o", str(out), "--samples-temperatures", "0.7", "-n", "4", "--inputs", "2",
                 "--keep-groups", "0,2", "--kl-images", "8", "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    page = Page(out.read_text())
    check_self_contained(page)
    assert len(page.sections["partial-posterior"]["images"]) == 3
    assert "temperature 0.7" in page.sections["samples"]["text"]


@pytest.mark.parametrize("extra", [["--samples-temperatures", "0.5,hot"], ["--samples-temperatures", ","],
                                   ["--keep-groups", "0,99"],
                                   ["--keep-groups", "x"], ["-o", "{tmp}/r.txt"], ["-o", "{tmp}/missing/r.html"],
                                   ["-o", "{run}/model_config.json"]])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, extra):
    extra = [a.format(tmp=tmp_path, run=run) for a in extra]
    before = sorted(p.name for p in run.iterdir())
    assert main(["report", str(run), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert "nvae: error:" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == before and not list(tmp_path.rglob("*.html"))


def test_a_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "report.html").exists()


def test_options_are_checked():
    for bad in (dict(temperatures=()), dict(temperatures=(float("nan"),)), dict(num_samples=0),
                dict(partial_temperature=-1.0), dict(split="valid")):
        with pytest.raises(ValueError):
            ReportOptions(**bad)
    assert default_keep_groups(6) == [0, 1, 2, 4, 6] and default_keep_groups(1) == [0, 1]
    assert default_keep_groups(8) == [0, 1, 2, 4, 8]


def validation_history(epochs):
    """A validation.json as the training writes it (nvae.training.validation), for ``epochs``."""
    from nvae.analysis.likelihood import EvalResult
    from nvae.training.validation import HISTORY_FORMAT
    units = EvalResult(nll=1.0, nelbo=1.0, bpd=1.0, bpd_elbo=1.0, num_images=1, num_samples=1,
                       data_dims=1).to_dict()["units"]
    return {"format": HISTORY_FORMAT, "version": 1, "units": units,
            "evaluations": [{"epoch": e, "step": 23 * (e + 1), "seed": 9118556707104075072 + e, "weights": "raw",
                             "nll": 138.125 - e, "nelbo": 144.5 - e, "bpd": 3.125, "bpd_elbo": 3.25,
                             "num_images": 297, "num_samples": 10, "data_dims": 64} for e in epochs]}


def test_validation_history_is_a_table_one_row_per_epoch(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    history = validation_history(range(12))
    (copy / "validation.json").write_text(json.dumps(history, indent=2))
    page = Page(write_report(copy, options=ReportOptions(draw_images=False, progress=False)).read_text())
    check_self_contained(page)
    rows = page.sections["evaluations"]["rows"]
    header = ["epoch", "step", "seed", "weights", "nll (nats/image)", "nelbo (nats/image)", "bpd (bits/dim)",
              "bpd_elbo (bits/dim)", "num_images", "num_samples", "data_dims"]
    start = rows.index(header)
    body = rows[start + 1:start + 13]
    assert [r[0] for r in body] == [str(e) for e in range(12)]
    assert body[11][:2] == ["11", "276"] and body[11][4] == "127.125" and body[0][2] == "9118556707104075072"
    text = page.sections["evaluations"]["text"]
    assert "evaluations: 12 records" in text
    assert '"epoch"' not in text and "..." not in text   # no raw (or truncated) JSON
    assert ["format", "nvae-validation"] in rows and ["units.nll", "nats/image"] not in rows   # units: in headers


def test_a_plot_or_file_shown_once_is_not_repeated_in_other_images(run, tmp_path):
    from nvae.analysis.likelihood import KLStats, plot_kl_stats
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    stats = KLStats(kl_per_group=[1.5, 2.5], active_units=[3, 4], units_per_group=4, threshold=0.1, num_images=9)
    (copy / "kl_stats_test.json").write_text(json.dumps(stats.to_dict()))
    plot_kl_stats(stats, copy / "kl_stats_test.png")          # nvae kl-stats's plot: the KL section's own
    shutil.copy(copy / "reconstructions.png", copy / "again.png")   # the same picture under another name
    page = Page(write_report(copy, options=ReportOptions(draw_images=False, progress=False)).read_text())
    check_self_contained(page)
    images = every_image(page)
    assert len(images) == len(set(images))
    assert not page.sections["other-images"]["images"]
    assert "again.png (= reconstructions.png)" in page.sections["other-images"]["text"]
    kl = page.sections["kl"]
    assert len(kl["images"]) == 1 and "Not repeated: kl_stats_test.png" in kl["text"]


def test_a_grid_written_before_the_larger_enlargement_is_still_read(run, tmp_path):
    """Older runs enlarged 8x8 images by 2 (17-pixel tiles), where save_grid now enlarges by 4."""
    from nvae.formats.checkpoint import save_png
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    side = NVAE.from_checkpoint(run / "checkpoint.pt").config.image_size
    assert side == 8
    old = torch.nn.functional.interpolate(torch.rand(30, 1, side, side), scale_factor=2, mode="nearest")
    save_png(old, copy / "reconstructions.png", nrow=5, padding=1)
    page = Page(write_report(copy, options=ReportOptions(draw_images=False, progress=False)).read_text())
    assert "5 images per row, an odd number" in page.sections["reconstructions"]["alts"][0]


def test_an_old_reconstruction_grid_with_odd_columns_is_said_to_wrap(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model = NVAE.from_checkpoint(run / "checkpoint.pt")
    side = model.config.image_size
    save_grid(torch.rand(32, 1, side, side), copy / "reconstructions.png", nrow=5)   # sqrt(32): the old layout
    page = Page(write_report(copy, options=ReportOptions(draw_images=False, progress=False)).read_text())
    caption = page.sections["reconstructions"]["alts"][0]
    assert "5 images per row, an odd number" in caption and "wrap" in caption
