"""Validation during training, on the official schedule (paper, Section 5; the official ``evaluate.py``).

The official ``train.py`` evaluates the model on the validation split after
every epoch of a run of at most 50 epochs, and after every 20th epoch (epochs
0, 20, 40, ... counted from 0) of a longer run, and always after the last epoch.
Each evaluation gives the NELBO and the importance-weighted NLL with K = 10 and
draws a 4x4 grid of prior samples, BN in eval mode, at each temperature 0.7,
0.8, 0.9 and 1.0. After the last epoch it evaluates once more with K = 1000.

Here the same, through :func:`nvae.analysis.likelihood.evaluate` (sharded and reduced under
torchrun), with ``TrainConfig.eval_every`` / ``eval_samples`` /
``final_eval_samples`` / ``eval_max_images`` to change it. What it writes in the run
directory (rank 0 only):

* TensorBoard scalars ``val/neg_log_p``, ``val/nelbo`` (nats per image) and
  ``val/bpd_log_p``, ``val/bpd_elbo`` (bits/dim), at x = the epoch counted from 0 as
  the official code logs them (the final evaluation at x = ``epochs``); images
  ``generated_0.7`` ... ``generated_1.0`` at the global step;
* ``validation.json``: every evaluation so far (epoch, step, numbers);
* ``val_samples_t0.7.png`` ... ``val_samples_t1.0.png``: the latest grids (overwritten);
* ``validation_final.json``: the final evaluation, with the keys of ``nvae eval``'s JSON
  plus ``step`` and ``epoch``. It is resumable (``validation_final.partial.json``).

Validation leaves the training untouched: it runs in eval mode without gradients (BN
running statistics unchanged), draws from generators seeded by ``(seed, epoch)``,
restores every global random stream afterwards, and hands the model back in the mode
it was in. A resumed run neither repeats nor skips an evaluation: ``validation.json``
counts only evaluations of steps up to the checkpoint's, and an epoch that ended
exactly at the checkpoint's step (a signal stops the run before validating) is
evaluated when the run resumes.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import Dataset

from ..config import TrainConfig
from ..distributed import waiting_for_peers
from ..analysis.likelihood import EvalConfig, EvalResult, PartialFile, evaluate, partial_path_for
from ..model.network import NVAE, training_mode
from ..seeds import VALIDATION_EVAL, VALIDATION_SAMPLES, derived_seed
from .resume import capture_rng, restore_rng
from .run_dir import RunLog, save_grid, write_json

if TYPE_CHECKING:
    from .state import TrainState

log = logging.getLogger("nvae.training.loop")

#: Temperatures of the sample grids, and samples per grid (official ``train.py``).
TEMPERATURES = (0.7, 0.8, 0.9, 1.0)
GRID_SAMPLES = 16
#: Official schedule: every epoch for runs of up to ``OFFICIAL_SHORT_RUN`` epochs, else every ``OFFICIAL_EVERY``.
OFFICIAL_SHORT_RUN = 50
OFFICIAL_EVERY = 20
HISTORY_FILE = "validation.json"
FINAL_FILE = "validation_final.json"
HISTORY_FORMAT = "nvae-validation"
#: The split validation runs on (the data set's held-out split, as the official ``valid_queue``).
SPLIT = "test"
#: TensorBoard tag -> field of :class:`~nvae.analysis.likelihood.EvalResult`.
TAGS = {"val/neg_log_p": "nll", "val/nelbo": "nelbo", "val/bpd_log_p": "bpd", "val/bpd_elbo": "bpd_elbo"}


def eval_interval(cfg: TrainConfig) -> int:
    """Epochs between validations: ``cfg.eval_every``, or the official rule when it is None (0: never)."""
    if cfg.eval_every is not None:
        return cfg.eval_every
    return 1 if cfg.epochs <= OFFICIAL_SHORT_RUN else OFFICIAL_EVERY


def is_due(epoch: int, cfg: TrainConfig) -> bool:
    """Whether the run validates after ``epoch`` (counted from 0): every ``eval_interval`` epochs from
    epoch 0, and after the last epoch."""
    every = eval_interval(cfg)
    return every > 0 and (epoch % every == 0 or epoch == cfg.epochs - 1)


@torch.no_grad()
def sample_grids(model: NVAE, generator: torch.Generator, n: int = GRID_SAMPLES) -> Dict[float, torch.Tensor]:
    """``n`` prior samples in [0, 1] at each of :data:`TEMPERATURES`, with the model as it is (no BN
    re-adjustment): Bernoulli means for binary data, else a draw of p(x|z) at the same temperature (the
    logistic scales multiplied by t; the official training's grids divide them by t, see
    :meth:`~nvae.model.distributions.DiscMixLogistic.sample`)."""
    grids = {}
    for t in TEMPERATURES:
        out = model.output_distribution(model.sample_logits(n, t, generator))
        grids[t] = out.mean() if model.config.decoder == "bernoulli" else out.sample(t, generator)
    return grids


@contextmanager
def isolated(model: NVAE, device: torch.device) -> Iterator[NVAE]:
    """``model`` in eval mode without gradients; afterwards its mode and every global random stream
    (torch, CUDA, NumPy, Python) are as before, so the training that follows cannot tell."""
    streams = capture_rng(None, device)
    try:
        with training_mode(model, False), torch.no_grad():
            yield model
    finally:
        restore_rng(streams, None, device)


@contextmanager
def validated_weights(state: "TrainState") -> Iterator[Tuple[NVAE, str]]:
    """``(state.model, "ema" or "raw")``: the model holding the weights validation scores. With an EMA
    of the weights (``ema_rate`` > 0) that is the EMA, as ``nvae eval`` reads a run by default; the
    weights as trained are put back afterwards, exactly."""
    ema = getattr(state, "ema", None)
    if ema is None or not ema.weights:
        yield state.model, "raw"
        return
    trained = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    ema.copy_to(state.model)
    try:
        yield state.model, "ema"
    finally:
        state.model.load_state_dict(trained)


def read_history(path: Path) -> list:
    """The evaluations recorded in ``validation.json`` (an empty list when there is none or it is damaged)."""
    try:
        stored = json.loads(path.read_text())
        entries = stored["evaluations"] if stored.get("format") == HISTORY_FORMAT else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and {"epoch", "step"} <= set(e)
                                                     for e in entries):
            raise ValueError("not a validation history")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, AttributeError) as e:
        log.warning("%s cannot be read (%s); its evaluations will not be counted as done", path, e)
        return []
    return entries


def _read_final(path: Path) -> Optional[dict]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


@dataclass
class Validation:
    """The validation of one run: what it evaluated so far and how to evaluate the next epoch.

    ``data``: the validation split; ``per_epoch``: training steps per epoch. Every process of a
    torchrun job holds one and calls the same methods.
    """

    cfg: TrainConfig
    data: Dataset
    log: RunLog
    run_dir: Path
    per_epoch: int
    progress: bool = True
    done: Dict[int, dict] = field(default_factory=dict)    #: epoch -> its entry of ``validation.json``

    def start(self, state: "TrainState") -> None:
        """Take over the evaluations of steps up to ``state.step`` from ``validation.json``, and run the
        one of the epoch that ended at ``state.step`` if it is due and was not run (the run stopped first)."""
        entries = read_history(self.run_dir / HISTORY_FILE) if state.dist.is_main else None
        entries = state.dist.from_main(entries)
        self.done = {int(e["epoch"]): e for e in entries if int(e["step"]) <= state.step}
        self.after_step(state)

    def after_step(self, state: "TrainState") -> Optional[EvalResult]:
        """Validate if ``state.step`` ends an epoch that is due and not yet evaluated."""
        if state.step == 0 or state.step % self.per_epoch:
            return None
        epoch = state.step // self.per_epoch - 1
        if epoch in self.done or not is_due(epoch, self.cfg):
            return None
        return self.evaluate_epoch(state, epoch)

    def evaluate_epoch(self, state: "TrainState", epoch: int) -> EvalResult:
        """Evaluate with K = ``eval_samples`` after ``epoch``, log it and draw the sample grids."""
        dist_ctx, seed = state.dist, derived_seed(VALIDATION_EVAL, self.cfg.seed, epoch)
        config = EvalConfig(num_samples=self.cfg.eval_samples, batch_size=self.cfg.batch_size,
                            max_images=self.cfg.eval_max_images, seed=seed)
        with validated_weights(state) as (model, weights), isolated(model, dist_ctx.device):
            with waiting_for_peers(f"the validation after epoch {epoch}", dist_ctx):
                result = evaluate(model, self.data, config, dist_ctx=dist_ctx,
                                  progress=self.progress and dist_ctx.is_main)
            if self.log.enabled:
                gen = torch.Generator(dist_ctx.device)
                gen.manual_seed(derived_seed(VALIDATION_SAMPLES, self.cfg.seed, epoch))
                self._write_grids(sample_grids(model, gen), state.step)
        self._log_result(result, epoch, f"validation after epoch {epoch} (step {state.step})")
        self.done[epoch] = {"epoch": epoch, "step": state.step, "seed": seed, "weights": weights,
                            **_numbers(result)}
        if self.log.enabled:
            write_json(self.run_dir / HISTORY_FILE,
                       {"format": HISTORY_FORMAT, "version": 1, "units": result.to_dict()["units"],
                        "evaluations": [self.done[e] for e in sorted(self.done)]})
        return result

    def final(self, state: "TrainState", dataset: str) -> Optional[EvalResult]:
        """After the last step of the schedule: evaluate with K = ``final_eval_samples`` into
        ``validation_final.json`` (resumable), unless that file already holds this step's evaluation."""
        k = self.cfg.final_eval_samples
        if k == 0 or state.step < self.cfg.epochs * self.per_epoch:
            return None
        path, dist_ctx = self.run_dir / FINAL_FILE, state.dist
        before = dist_ctx.from_main(_read_final(path) if dist_ctx.is_main else None)
        images = len(self.data) if self.cfg.eval_max_images is None else min(self.cfg.eval_max_images, len(self.data))
        if before is not None and (before.get("step"), before.get("num_samples"), before.get("num_images")) == \
                (state.step, k, images):
            return None
        seed = derived_seed(VALIDATION_EVAL, self.cfg.seed, self.cfg.epochs)
        config = EvalConfig(num_samples=k, batch_size=self.cfg.batch_size, max_images=self.cfg.eval_max_images,
                            seed=seed)
        identity = {"dataset": dataset, "split": SPLIT, "step": state.step}
        with validated_weights(state) as (model, weights), isolated(model, dist_ctx.device), \
                waiting_for_peers(f"the final validation (K={k})", dist_ctx):
            try:
                partial = PartialFile(partial_path_for(path), resume=True, identity=identity)
                result = evaluate(model, self.data, config, dist_ctx=dist_ctx, partial=partial,
                                  progress=self.progress and dist_ctx.is_main)
            except ValueError as e:   # partial sums of another evaluation: start over
                self.log.warning("final validation: %s; starting it over", e)
                partial = PartialFile(partial_path_for(path), resume=False, identity=identity)
                result = evaluate(model, self.data, config, dist_ctx=dist_ctx, partial=partial,
                                  progress=self.progress and dist_ctx.is_main)
        self._log_result(result, self.cfg.epochs, f"final validation (step {state.step})")
        if self.log.enabled and None not in _numbers(result).values():
            write_json(path, {"checkpoint": str(self.run_dir / "checkpoint.pt"), "weights": weights,
                              "dataset": dataset,
                              "split": SPLIT, "seed": seed, "step": state.step, "epoch": self.cfg.epochs,
                              **result.to_dict()})
        return result

    def _log_result(self, result: EvalResult, x: int, what: str) -> None:
        if not self.log.enabled:
            return
        for tag, name in TAGS.items():
            self.log.writer.add_scalar(tag, getattr(result, name), x)
        self.log.writer.flush()
        if None in _numbers(result).values():
            self.log.warning("%s gave non-finite numbers; the model has diverged (JSON records them as null, and "
                             "no final JSON is written)", what)
        self.log.info("%s, K=%d on %d images: nelbo %.4f neg_log_p %.4f bpd_elbo %.4f bpd_log_p %.4f", what,
                      result.num_samples, result.num_images, result.nelbo, result.nll, result.bpd_elbo, result.bpd)

    def _write_grids(self, grids: Dict[float, torch.Tensor], step: int) -> None:
        from torchvision.utils import make_grid
        for t, images in grids.items():
            images = images.float().cpu()
            save_grid(images, self.run_dir / f"val_samples_t{t:.1f}.png")
            self.log.writer.add_image(f"generated_{t:.1f}", make_grid(images, nrow=4), step)


def _numbers(result: EvalResult) -> dict:
    """The result's numbers for JSON: a non-finite one (a diverged model) as None."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None
            for k, v in result.to_dict().items() if k != "units"}
