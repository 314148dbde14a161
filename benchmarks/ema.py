"""What an EMA of the weights buys: one training run, evaluated at its end with each EMA and with the raw weights.

    OMP_NUM_THREADS=2 python benchmarks/ema.py --data ../shared/data --json benchmarks/results/ema.json

One ``mnist_small`` run on real MNIST (the preset's official recipe at batch 32, as
``benchmarks/quality.py`` runs it on a CPU; its schedules laid over ``--steps``: the
epochs those steps reach, a one-epoch LR warm-up, the KL warm-up over the first 30%)
keeps one EMA per rate, all updated from the same weights after every applied step (the
first through ``TrainConfig.ema_rate``, the others beside it). ``--rules`` adds, for every
rate, EMAs that follow other rules for the share kept at each update: ``warmup`` is the
library's (``min(rate, n / (n + 9))`` after ``n`` updates, see ``nvae.training.ema``),
``constant`` the rule before it (the rate from the second update on, so ``rate^n`` of the
first weights stays in), ``bias`` Adam's bias correction (an average started at zero,
divided by ``1 - rate^n``). At the end the raw weights
and every EMA are scored on the same test images with the same random draws (test NLL,
importance-weighted with K = ``--num-samples``, and the NELBO): a paired comparison, so
the differences are the EMA's, not another run's luck. ``--compare-bn`` also scores each
EMA with the raw model's BN running statistics in place of the averaged ones (the
alternative to what ``nvae.training.ema`` does).

Time on a 2-core CPU (channels-last, about 0.6 s a step): the default 3,500 steps take
30-40 minutes; each evaluation of 1,000 images at K = 100 about 5 minutes more (the raw
weights and one per rate and rule: 20 minutes for three rates, twice that with ``--compare-bn``).
Check that it runs with tiny settings first: ``--steps 3 --batch-size 8 --test-images 4
--num-samples 2``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch
from torch.utils.data import DataLoader

from nvae import NVAE, NVAEConfig, speedups
from nvae.config import TrainConfig, parse_overrides
from nvae.data import build_dataset, prepare_batch
from nvae.training.ema import AVERAGED_BUFFERS, WeightEMA
from nvae.analysis.likelihood import EvalConfig, evaluate
from nvae.training.objective import kl_balance_alpha
from nvae.training.run_dir import write_json
from nvae.speedups.cpu import tune_cpu_allocator
from nvae.training.state import TrainState
from nvae.training.step import schedule, train_step
from nvae.training.loop import seed_everything


class ConstantEMA(WeightEMA):
    """The rule before the warm-up: a copy, then the configured rate at every update."""

    def decay(self, n: int) -> float:
        return self.rate if n else 0.0


class BiasCorrectedEMA(WeightEMA):
    """Adam's bias correction: ``m / (1 - rate^n)`` with ``m`` started at zero, written as the share kept
    (``m`` itself is never formed): ``rate * (1 - rate^n) / (1 - rate^(n + 1))``."""

    def decay(self, n: int) -> float:
        return self.rate * (1 - self.rate ** n) / (1 - self.rate ** (n + 1))


#: ``--rules``: the EMA classes compared; ``warmup`` is the library's.
RULES = {"warmup": WeightEMA, "constant": ConstantEMA, "bias": BiasCorrectedEMA}


def _rules(text: str):
    rules = [r.strip() for r in text.split(",") if r.strip()]
    if not rules or not set(rules) <= set(RULES):
        raise argparse.ArgumentTypeError(f"rules must be comma-separated names of {sorted(RULES)}, got {text!r}")
    return sorted(rules, key=list(RULES).index)


def _rates(text: str):
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or not all(0 < r < 1 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be comma-separated numbers in (0, 1), got {text!r}")
    return rates


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding MNIST (e.g. ../shared/data)")
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--rates", type=_rates, default=[0.99, 0.999, 0.9995], help="EMA rates, comma-separated")
    p.add_argument("--rules", type=_rules, default=["warmup"],
                   help="update rules, comma-separated: warmup (the library's), constant (before it), bias "
                        "(Adam's correction)")
    p.add_argument("--steps", type=int, default=3500, help="training steps (the schedules span them)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=100, help="K of the importance-weighted bound")
    p.add_argument("--test-images", type=int, default=1000, help="evaluate on the first N test images")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="train in the default memory format (channels-last is faster on CPUs)")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig overrides, as in `nvae train` (e.g. warmup_epochs=0)")
    p.add_argument("--compare-bn", action="store_true",
                   help="also score each EMA with the raw model's BN running statistics")
    p.add_argument("--json", default=None, help="write every result here too")
    return p.parse_args(argv)


def _train(model_cfg: NVAEConfig, cfg: TrainConfig, data, rates, rules, steps: int, progress: bool):
    """(state, {(rule, rate): WeightEMA}) after ``steps`` steps; the first rate's ``warmup`` is the library's own
    EMA."""
    from tqdm import tqdm
    seed_everything(cfg.seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    state = TrainState.create(model_cfg, cfg)
    emas = {(rule, rate): RULES[rule](rate) for rate in rates for rule in rules}
    emas[("warmup", rates[0])] = state.ema
    extra = [ema for ema in emas.values() if ema is not state.ema]
    alpha = kl_balance_alpha(model_cfg.groups_per_scale)
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress)
    state.net.train()
    while state.step < steps:
        for (x,) in loader:
            x = prepare_batch(x, model_cfg, state.data_generator)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            _, _, stepped = train_step(state, x, schedule(state.step, len(loader), cfg, alpha, state.lr_scale))
            if stepped:
                for ema in extra:
                    ema.update(state.model)
            if state.guard.needs_rollback:
                raise RuntimeError(f"training diverged at step {state.step}; lower the learning rate")
            bar.update(1)
            if not progress and state.step % 100 == 0:   # a run in the background says how far it is
                print(f"step {state.step} of {steps}", file=sys.stderr, flush=True)
            if state.step >= steps:
                break
    bar.close()
    return state, emas


def _ema_model(model_cfg: NVAEConfig, ema: WeightEMA, raw_bn_from=None, channels_last: bool = False) -> NVAE:
    model = ema.copy_to(speedups.apply(NVAE(model_cfg)))
    if channels_last:   # the raw model's layout, so both are scored at the same speed
        model = model.to(memory_format=torch.channels_last)
    if raw_bn_from is not None:   # the alternative: the raw model's running statistics
        raw = raw_bn_from.state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name.rsplit(".", 1)[-1] in AVERAGED_BUFFERS:
                    tensor.copy_(raw[name])
    return model.eval()


def main(argv=None) -> int:
    a = _parse(argv)
    tune_cpu_allocator()
    progress = sys.stderr.isatty()
    model_cfg = NVAEConfig.preset(a.preset)
    base = TrainConfig.preset(a.preset)
    batch = a.batch_size
    data = build_dataset(base.dataset, "train", a.data, image_size=model_cfg.image_size, channels=1)
    epochs = max(1, math.ceil(a.steps / (len(data) // batch)))
    fields = dict(batch_size=batch, epochs=epochs, warmup_epochs=min(base.warmup_epochs, max(1, epochs // 4)),
                  seed=a.seed, channels_last=a.channels_last, ema_rate=a.rates[0])
    cfg = dataclasses.replace(base, **{**fields, **parse_overrides(a.train, TrainConfig)})
    t0 = time.perf_counter()
    state, emas = _train(model_cfg, cfg, data, a.rates, a.rules, a.steps, progress)
    minutes = (time.perf_counter() - t0) / 60
    test = build_dataset(base.dataset, "test", a.data, image_size=model_cfg.image_size, channels=1)
    config = EvalConfig(num_samples=a.num_samples, max_images=a.test_images, seed=0)

    def score(model, name):
        result = evaluate(model, test, config, progress=progress)
        print(f"{name}: NLL {result.nll:.2f}, NELBO {result.nelbo:.2f}", file=sys.stderr, flush=True)
        return result

    raw = score(state.model.eval(), "raw")
    rows = []
    for (rule, rate), ema in emas.items():
        row = {"rate": rate, "rule": rule, "decay": ema.decay(ema.updates - 1),
               "ema": dataclasses.asdict(score(_ema_model(model_cfg, ema, channels_last=cfg.channels_last),
                                               f"EMA {rate:g} {rule}"))}
        if a.compare_bn:
            row["ema_raw_bn"] = dataclasses.asdict(score(_ema_model(model_cfg, ema, state.model, cfg.channels_last),
                                                         f"EMA {rate:g} {rule}, raw BN statistics"))
        rows.append(row)
    _print_table(a, state, minutes, raw, rows)
    if a.json:
        write_json(a.json, {"preset": a.preset, "steps": state.step, "batch_size": batch, "epochs": epochs,
                            "skipped_steps": state.guard.total, "minutes": round(minutes, 1),
                            "num_samples": a.num_samples, "rules": a.rules, "raw": dataclasses.asdict(raw),
                            "ema": rows})
    return 0


def _print_table(a, state, minutes, raw, rows) -> None:
    print(f"{a.preset} on MNIST: {state.step} steps of batch {a.batch_size} ({minutes:.1f} min, "
          f"{state.guard.total} skipped); test NLL with K = {a.num_samples} on {raw.num_images} images, nats")
    bn = " | EMA, raw BN stats" if a.compare_bn else ""
    print(f"\n| weights | rule | last decay | NLL | NELBO | NLL - raw{bn} |")
    print("|---|---|---|---|---|---|" + ("---|" if a.compare_bn else ""))
    print(f"| raw | | | {raw.nll:.2f} | {raw.nelbo:.2f} | |" + (" |" if a.compare_bn else ""))
    for row in rows:
        ema = row["ema"]
        extra = f" {row['ema_raw_bn']['nll']:.2f} |" if a.compare_bn else ""
        print(f"| EMA {row['rate']:g} | {row['rule']} | {row['decay']:.4f} | {ema['nll']:.2f} | {ema['nelbo']:.2f} | "
              f"{ema['nll'] - raw.nll:+.2f} |{extra}")


if __name__ == "__main__":
    sys.exit(main())
