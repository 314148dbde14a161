"""Fréchet Inception Distance of samples from the prior, with pytorch-fid and local weights.

FID compares two Gaussians fitted to Inception-v3 features: one of a data set, computed
once and stored as ``.npz`` statistics (``mu``, ``sigma``: the same files pytorch-fid
reads and writes), and one of the model's samples. The network, its weights and the
distance are pytorch-fid's (``pip install pytorch-fid`` or ``pip install 'nvae[fid]'``);
this module only feeds it.

Weights are never downloaded. pytorch-fid normally fetches
``pt_inception-2015-12-05-6726825d.pth`` from its GitHub releases; here the user gives
the path of a copy (``--inception-weights PATH``). The file is read with
``torch.load(weights_only=True)``, and while pytorch-fid builds its network its fetch
function is replaced by one that hands over that state dict, so pytorch-fid's own code
checks every key and shape. Any other request to download fails with :class:`FIDError`.

What the network sees, for data and samples alike:

* images in [0, 1] (anything else is an error), rounded to 8 bits as if saved to PNG
  (so the numbers match pytorch-fid run on PNG files of the same images), unless
  ``quantize`` is off (the official protocol feeds its float means as they are);
* grey images repeated to three channels;
* resized by pytorch-fid to 299x299 (bilinear) and scaled to [-1, 1].

:func:`model_fid` feeds :meth:`nvae.NVAE.sample` at the given temperature (Bernoulli means for
binary models, a sample of p(x|z) for colour models); :mod:`nvae.analysis.fid_protocol` draws the images
of the official protocol (and of ours) sharded over processes, which ``nvae fid`` uses. Images
keep the model's resolution, borders
included: an MNIST model draws 32x32 images with the 2-pixel zero border its training
data had, and ``nvae fid-stats --dataset mnist`` gives statistics of the same padded
32x32 images. Statistics computed elsewhere from 28x28 MNIST are not comparable.
Our data statistics use the data set's images as stored (no binarisation, no reduction to
``num_x_bits``, no random flips); ``nvae fid-stats --protocol official`` takes the official
script's images instead (:func:`nvae.analysis.fid_protocol.official_reference_dataset`: shuffled,
``drop_last``, training transforms, MNIST and Omniglot binarised). A statistics file may carry
``meta``, a JSON string saying how it was made (protocol, seed, data set, splits, image count).

Standard FID uses the 2048 features of the last pooling layer; ``dims`` 64, 192 or 768
select earlier layers, as pytorch-fid allows (cheaper, but not comparable with published
FIDs). Numbers depend on the number of images: the paper's protocol uses 50,000 samples.
"""
from __future__ import annotations

import contextlib
import pickle
import re
import threading
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..distributed import DistributedContext

__all__ = ["FIDError", "FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "FEATURE_DIMS", "InceptionFeatures",
           "load_inception_weights", "activation_statistics", "dataset_statistics", "sample_statistics",
           "frechet_distance", "model_fid", "save_statistics", "load_statistics", "load_statistics_info",
           "file_sha256", "FeatureMoments", "REDUCTIONS"]

#: The file pytorch-fid's FID Inception weights come in, and where a copy can be fetched by hand.
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"

#: Feature sizes pytorch-fid's InceptionV3 offers; 2048 is the standard FID.
FEATURE_DIMS = (64, 192, 768, 2048)

Stats = Tuple[np.ndarray, np.ndarray]

_INSTALL_HINT = "pip install pytorch-fid (or pip install 'nvae[fid]')"
_GET_WEIGHTS = (f"download {FID_WEIGHTS_FILE} from the pytorch-fid releases ({FID_WEIGHTS_URL}) on a machine "
                "with network access, copy it here, and pass its path with --inception-weights PATH")
NO_WEIGHTS_MESSAGE = ("FID needs the Inception weights stored locally; nothing is downloaded at run time. "
                      f"To compute FID, {_GET_WEIGHTS}")


class FIDError(ValueError):
    """FID cannot be computed as asked; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- pytorch-fid
def _pytorch_fid():
    """pytorch-fid's ``inception`` and ``fid_score`` modules, or a clear error."""
    try:
        from pytorch_fid import fid_score, inception
    except ImportError as e:
        raise FIDError(f"FID needs the pytorch-fid package, which is not installed ({e}): {_INSTALL_HINT}") from None
    if not all(hasattr(inception, n) for n in ("InceptionV3", "fid_inception_v3", "load_state_dict_from_url")):
        raise FIDError("this version of pytorch-fid builds its network differently from the one nvae knows; "
                       "install pytorch-fid 0.3: pip install 'pytorch-fid>=0.3,<0.4'")
    return inception, fid_score


_FETCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _fetch_from_memory(inception_module, state_dict: dict):
    """While active, pytorch-fid's weight 'download' returns ``state_dict`` and nothing touches the network."""
    def fetch(url, *args, **kwargs):
        name = str(url).rsplit("/", 1)[-1]
        if name != FID_WEIGHTS_FILE:
            raise FIDError(f"pytorch-fid asked to download {url}; nvae never downloads, and the weights it "
                           f"was given are {FID_WEIGHTS_FILE}. Use pytorch-fid 0.3 (pip install "
                           "'pytorch-fid>=0.3,<0.4') or compute FID with pytorch-fid directly")
        return state_dict

    with _FETCH_LOCK:
        original = inception_module.load_state_dict_from_url
        inception_module.load_state_dict_from_url = fetch
        try:
            yield
        finally:
            inception_module.load_state_dict_from_url = original


def load_inception_weights(path: Union[str, Path, None]) -> dict:
    """The state dict stored at ``path``, read with ``weights_only=True``; clear errors otherwise.

    Only the file is checked here (readable, a dict of tensors); that its keys and shapes are
    those of the FID Inception is checked when :class:`InceptionFeatures` loads it.
    """
    if path is None:
        raise FIDError(NO_WEIGHTS_MESSAGE)
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"no Inception weights at {path}; {_GET_WEIGHTS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means "not a state dict we accept"
        if isinstance(e, pickle.UnpicklingError):
            reason = "not a file torch.save wrote, or it holds Python objects besides tensors, which are refused"
        else:
            reason = f"{type(e).__name__}: {(str(e).splitlines() or ['empty or truncated file'])[0][:200]}"
        raise FIDError(f"{path} could not be read as a PyTorch state dict ({reason}); "
                       f"it should be pytorch-fid's {FID_WEIGHTS_FILE}") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FIDError(f"{path} is not a state dict (a mapping of names to tensors); "
                       f"it should be pytorch-fid's {FID_WEIGHTS_FILE}")
    return state


def _mismatch(error: RuntimeError, path: Path) -> FIDError:
    """A short summary of ``load_state_dict``'s complaint about ``path``."""
    parts, mismatched = [], []
    for line in str(error).splitlines()[1:]:
        line = line.strip()
        head, _, rest = line.partition(": ")
        keys = re.findall(r'"([^"]+)"', rest)
        if "key(s)" in head and keys:
            parts.append(f"{head.split(' key')[0].lower()} keys: {len(keys)}, e.g. {', '.join(keys[:3])}")
        elif line.startswith("size mismatch"):
            mismatched.append(line.rstrip("."))
        elif line:
            parts.append(line[:200])
    if mismatched:
        more = f" (and {len(mismatched) - 2} more)" if len(mismatched) > 2 else ""
        parts.append("; ".join(mismatched[:2]) + more)
    detail = "; ".join(parts) or str(error)[:300]
    return FIDError(f"{path} is not the FID Inception state dict ({detail}). FID needs pytorch-fid's "
                    f"{FID_WEIGHTS_FILE}, not torchvision's Inception or another network; {_GET_WEIGHTS}")


# ----------------------------------------------------------------------------- features
class InceptionFeatures(nn.Module):
    """pytorch-fid's InceptionV3 with the FID weights read from a local file; images -> features.

    ``weights_path`` is a copy of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
    (``None`` or a missing file raises :class:`FIDError` saying where to get it); nothing is
    downloaded. ``dims`` picks the feature layer (2048: standard FID). Calling the module on
    images (B, 1 or 3, H, W) in [0, 1] returns float32 features (B, dims); see the module
    docstring for what the network sees. ``quantize`` (an attribute too) rounds images to
    8 bits first.
    """

    def __init__(self, weights_path: Union[str, Path, None], device: Union[str, torch.device] = "cpu",
                 dims: int = 2048, quantize: bool = True):
        super().__init__()
        if dims not in FEATURE_DIMS:
            raise FIDError(f"dims must be one of {FEATURE_DIMS} (2048 is the standard FID), got {dims!r}")
        inception, _ = _pytorch_fid()
        state = load_inception_weights(weights_path)
        block = inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
        try:
            with _fetch_from_memory(inception, state):
                net = inception.InceptionV3([block], resize_input=True, normalize_input=True)
        except RuntimeError as e:   # load_state_dict: missing / unexpected keys, wrong shapes
            raise _mismatch(e, Path(weights_path)) from None
        self.net = net
        self.dims = dims
        self.quantize = quantize
        self.weights_path = Path(weights_path)
        self.to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise FIDError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-4 or hi > 1 + 1e-4 or not np.isfinite(lo + hi):
            raise FIDError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                           "rescale them (e.g. (x + 1) / 2 for images in [-1, 1])")
        x = x.clamp(0, 1)
        if self.quantize:
            x = torch.round(x * 255) / 255                   # 8 bits, as a PNG would hold them
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        self.net.eval()
        out = self.net(x)[0]
        if out.shape[2:] != (1, 1):                          # earlier blocks: average over space
            out = torch.nn.functional.adaptive_avg_pool2d(out, (1, 1))
        return out.flatten(1)


# ----------------------------------------------------------------------------- statistics
#: How statistics computed by several processes are combined: ``pooled`` gives the mean and covariance
#: of all features together (the same numbers whatever the number of processes); ``average`` averages
#: each process's own mean and covariance, as the official ``test_vae_fid`` does over GPUs.
REDUCTIONS = ("pooled", "average")


class FeatureMoments:
    """Count, sum and sum of outer products (float64) of features seen so far.

    Memory stays at D x D however many images are added (50,000 x 2048 features
    would take 800 MB as an array), and moments of disjoint sets of images add
    up: summed over processes they give the statistics of all images at once.
    """

    def __init__(self, dims: int):
        self.count = 0
        self.total = np.zeros(dims)
        self.outer = np.zeros((dims, dims))

    @property
    def dims(self) -> int:
        return self.total.shape[0]

    def add(self, features) -> None:
        """Add the features (N, D) of N more images."""
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else features
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dims:
            raise FIDError(f"expected features of shape (N, {self.dims}), got {f.shape}")
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def statistics(self) -> Stats:
        """``(mu, sigma)``: the mean and the unbiased covariance (``np.cov``'s) of everything added."""
        n = self.count
        if n < 2:
            raise FIDError(f"FID statistics need at least 2 images, got {n}")
        mu = self.total / n
        sigma = (self.outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2

    def reduce(self, dist_ctx: DistributedContext = DistributedContext(), reduction: str = "pooled") -> Stats:
        """``(mu, sigma)`` over every process of ``dist_ctx`` (a :class:`~nvae.distributed.DistributedContext`).

        ``pooled``: counts, sums and outer products are summed over processes, so the result is
        :meth:`statistics` of all their images together. ``average``: the mean of each process's
        ``(mu, sigma)`` (every process needs 2 images or more), the official code's reduction,
        which lacks the spread of the per-process means and so depends on the number of processes.
        One process: :meth:`statistics` either way.
        """
        if reduction not in REDUCTIONS:
            raise FIDError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not dist_ctx.enabled:
            return self.statistics()
        import torch.distributed as dist
        d = self.dims
        if reduction == "pooled":
            parts = [np.array([float(self.count)]), self.total, self.outer.ravel()]
        else:
            parts = list(self.statistics())
            parts[1] = parts[1].ravel()
        packed = torch.from_numpy(np.concatenate(parts)).to(dist_ctx.device)
        dist.all_reduce(packed)
        packed = packed.cpu().numpy()
        if reduction == "average":
            packed = packed / dist_ctx.world_size
            return packed[:d], packed[d:].reshape(d, d)
        merged = FeatureMoments(d)
        merged.count = int(round(packed[0]))
        merged.total, merged.outer = packed[1:d + 1], packed[d + 1:].reshape(d, d)
        return merged.statistics()


def activation_statistics(batches: Iterable[torch.Tensor], inception: InceptionFeatures,
                          total: Optional[int] = None, desc: str = "FID features", progress: bool = True) -> Stats:
    """Mean and covariance (float64) of the features of every image in ``batches``."""
    from tqdm import tqdm

    moments = FeatureMoments(inception.dims)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for x in batches:
            moments.add(inception(x))
            bar.update(len(x))
    return moments.statistics()


def dataset_statistics(data, inception: InceptionFeatures, batch_size: int = 50, max_images: Optional[int] = None,
                       num_workers: int = 0, progress: bool = True, subset_seed: Optional[int] = None) -> Stats:
    """``(mu, sigma)`` of the Inception features of a data set's images, in order.

    ``data`` is a tensor of images (N, C, H, W) in [0, 1] or a data set whose items are
    images or tuples starting with one (as :func:`nvae.data.build_dataset` gives);
    ``max_images`` uses only the first N, or with ``subset_seed`` N images drawn at random
    without replacement (ours; the official selection is
    :func:`nvae.analysis.fid_protocol.official_reference_dataset`, passed here as ``data``).
    """
    from torch.utils.data import DataLoader, Subset, TensorDataset

    if isinstance(data, torch.Tensor):
        data = TensorDataset(data)
    if batch_size < 1:
        raise FIDError(f"batch_size must be at least 1, got {batch_size}")
    n = len(data) if max_images is None else min(max_images, len(data))
    if n < len(data):
        if subset_seed is None:
            data = Subset(data, range(n))
        else:
            chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(subset_seed))[:n]
            data = Subset(data, chosen.sort().values.tolist())
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    batches = (b[0] if isinstance(b, (list, tuple)) else b for b in loader)
    return activation_statistics(batches, inception, total=n, desc="data features", progress=progress)


def sample_statistics(model, inception: InceptionFeatures, num_samples: int = 10000, temperature=1.0,
                      batch_size: int = 100, generator: Optional[torch.Generator] = None,
                      progress: bool = True) -> Stats:
    """``(mu, sigma)`` of the Inception features of ``num_samples`` prior samples of ``model``.

    Samples are ``model.sample(b, temperature, generator)`` in eval mode, ``batch_size`` at
    a time, on the model's device (``generator`` must live there too).
    """
    if num_samples < 2:
        raise FIDError(f"FID needs at least 2 samples, got {num_samples}")
    if batch_size < 1:
        raise FIDError(f"batch_size must be at least 1, got {batch_size}")

    def batches():
        left = num_samples
        while left > 0:
            b = min(batch_size, left)
            yield model.sample(b, temperature, generator).float()
            left -= b

    was_training = model.training
    model.eval()
    try:
        return activation_statistics(batches(), inception, total=num_samples, desc="sample features",
                                     progress=progress)
    finally:
        model.train(was_training)


def _check_stats(mu, sigma, where: str) -> Stats:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{where}: mu must have shape (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}; "
                       "recompute the statistics with nvae fid-stats")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{where}: the statistics hold NaN or infinite values; recompute them with nvae fid-stats")
    return mu, sigma


def frechet_distance(a: Stats, b: Stats) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` between two ``(mu, sigma)`` pairs."""
    _, fid_score = _pytorch_fid()
    mu1, s1 = _check_stats(*a, "first statistics")
    mu2, s2 = _check_stats(*b, "second statistics")
    if mu1.shape != mu2.shape:
        raise FIDError(f"statistics of {mu1.shape[0]} and {mu2.shape[0]} features cannot be compared; "
                       "compute both with the same --dims")
    return float(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))


def model_fid(model, stats: Union[Stats, str, Path], inception: InceptionFeatures, num_samples: int = 10000,
              temperature=1.0, batch_size: int = 100, generator: Optional[torch.Generator] = None,
              progress: bool = True) -> float:
    """FID of ``num_samples`` prior samples of ``model`` against data statistics.

    ``stats`` is ``(mu, sigma)`` or the path of a statistics file (:func:`load_statistics`);
    its feature size must match ``inception.dims``. See :func:`sample_statistics` for how
    samples are drawn.
    """
    if not isinstance(stats, (tuple, list)):
        stats = load_statistics(stats)
    mu, sigma = _check_stats(*stats, "data statistics")
    if mu.shape[0] != inception.dims:
        raise FIDError(f"the data statistics hold {mu.shape[0]} features but the Inception extractor gives "
                       f"{inception.dims}; use InceptionFeatures(..., dims={mu.shape[0]}) or recompute the statistics")
    samples = sample_statistics(model, inception, num_samples, temperature, batch_size, generator, progress)
    return frechet_distance((mu, sigma), samples)


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (which Inception weights a FID was computed with)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_statistics(path: Union[str, Path], mu, sigma, info: Optional[dict] = None) -> Path:
    """Write ``mu`` and ``sigma`` to the ``.npz`` file ``path`` (pytorch-fid's format), atomically.

    ``info`` (how the statistics were made) goes in as ``meta``, a JSON string array that
    pytorch-fid and the official code ignore (:func:`load_statistics_info` reads it back).
    """
    import json
    path = Path(path)
    if path.suffix != ".npz":
        raise FIDError(f"statistics files end in .npz (pytorch-fid recognises them by it), got {path}")
    mu, sigma = _check_stats(mu, sigma, str(path))
    arrays = dict(mu=mu, sigma=sigma)
    if info is not None:
        arrays["meta"] = np.array(json.dumps(info, sort_keys=True))
    from ..formats.checkpoint import atomic_write
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_statistics_info(path: Union[str, Path]) -> Optional[dict]:
    """The ``info`` a statistics file was saved with (:func:`save_statistics`), or None if it has none."""
    import json
    with np.load(Path(path), allow_pickle=False) as f:
        return json.loads(str(f["meta"])) if "meta" in f.files else None


def load_statistics(path: Union[str, Path]) -> Stats:
    """``(mu, sigma)`` from a statistics file written by :func:`save_statistics` or pytorch-fid."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"no FID statistics at {path}; compute them with "
                       "nvae fid-stats --dataset NAME --inception-weights PATH --output STATS.npz")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"mu", "sigma"} <= keys:
                raise FIDError(f"{path} lacks {sorted({'mu', 'sigma'} - keys)} (it holds {sorted(keys)}); "
                               "FID statistics hold 'mu' and 'sigma': compute them with nvae fid-stats")
            mu, sigma = f["mu"], f["sigma"]
    except FIDError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, pickle or format errors all mean "not a statistics file"
        raise FIDError(f"{path} could not be read as a .npz statistics file ({type(e).__name__}: "
                       f"{str(e)[:200]}); compute statistics with nvae fid-stats") from None
    return _check_stats(mu, sigma, str(path))
