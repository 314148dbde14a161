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
from nvae.analysis.report import ReportOptions, default_keep_groups, tensor_png, write_report

SECTIONS = ["run", "configs", "curves", "evaluations", "samples", "reconstructions", "partial-posterior", "kl",
            "other-images"]
SMALL = dict(temperatures=(0.5, 1.0), num_samples=4, num_inputs=3, kl_images=16, progress=False)


class Page(HTMLParser):
    """What a test needs from the page: sections with their text, tables and images, and every URL."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.urls, self.tags = {}, [], set()
        self._section = self._cell = None
        self._rows = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action", "data", "poster") and v]
        if tag == "section":
            self._section = self.sections.setdefault(attrs["id"], {"text": "", "images": [], "rows": []})
        elif self._section is not None and tag == "img":
            self._section["images"].append(attrs["src"])
        elif self._section is not None and tag == "tr":
            self._section["rows"].append([])
        elif self._section is not None and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
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
    assert set(SECTIONS) <= set(page.sections)
    for name in SECTIONS:
        assert page.sections[name]["text"].strip(), name
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    for url in page.urls:   # embedded data or an anchor on the page; nothing fetched from anywhere
        assert url.startswith(("data:image/png;base64,", "#")), url[:60]
    for section in page.sections.values():
        for uri in section["images"]:
            decode(uri)


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


def test_the_curves_show_every_scalar_of_the_events(full, run):
    events = scalars_of(run)
    assert {"train/nelbo", "train/lr", "train/skipped_steps", "train/grad_norm", "kl/group_0"} <= set(events)
    rows = {r[0]: r for r in full.sections["curves"]["rows"][1:]}
    assert set(rows) == set(events)
    for tag, points in events.items():
        values = [v for _, v in points]
        assert rows[tag][1:] == [str(len(points)), str(points[0][0]), str(points[-1][0]), f"{values[-1]:.6g}",
                                 f"{min(values):.6g}", f"{max(values):.6g}"], tag
    # one plot per tag, the per-group tags of a prefix together
    per_group = {t.rsplit("/", 1)[0] for t in events if "/group_" in t}
    single = [t for t in events if "/group_" not in t]
    assert len(full.sections["curves"]["images"]) == len(single) + len(per_group)


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
    shutil.copy(copy / "samples.png", copy / "partial_keep.png")
    out = write_report(copy, options=ReportOptions(draw_images=False, progress=False))
    assert out == copy / "report.html"
    page = Page(out.read_text())
    check_self_contained(page)
    rows = {r[0]: r for r in page.sections["curves"]["rows"][1:]}
    assert rows["val/nelbo"][1:5] == ["2", "1", "3", "88.25"]
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
