"""``torch.compile`` of the training loss and of the importance-weighted evaluation's inner pass, each traced
whole: one graph, no graph break.

What compiles:

- :func:`compile_loss`: the objective, :func:`nvae.training.objective.nvae_loss`: the posterior pass (encoder,
  top-down walk with its KL terms and log-densities, p(x|z)), KL balancing, and the spectral (power iteration) and
  BN regularisers. Its backward pass comes compiled with it (AOTAutograd).
- :func:`compile_eval`: :meth:`~nvae.model.network.NVAE.posterior_pass`, the pass
  :meth:`~nvae.model.network.NVAE.importance_sample` runs once per chunk of samples.

Both hold for the plain model and with every option of :func:`nvae.speedups.apply` (and channels-last inputs), in
fp32 and under autocast (``tests/speedups/test_compile.py`` checks each preset's structure with
``torch._dynamo.explain``). Inside a trace the options that manage memory by hand step aside for the compiler, which
plans what to keep for backward itself: recompute-BN, offset-summed depthwise gradients, folded evaluation and kept
forward weights take the plain path; checkpointed cells stay tagged for recomputation, which AOTAutograd (inductor's
front end; not dynamo's debugging backend ``"eager"``) does from the graph, so BN counts each batch once.

What stays outside the compiled region, and why:

- One-time initialisations. The spectral regulariser's first call runs ``first_call_factor`` times the power
  iterations from its random start, and ``res_elu`` convolutions initialise from the first batch; buffers record
  whether that happened, and choosing a branch by a tensor's value is data-dependent control flow. The loss runs
  eagerly until they are done (the first training step), compiled after, seeing the model as it is then.
- Draws from a ``torch.Generator``, which cannot enter a graph. The evaluation draws each chunk's eps before the
  compiled pass, in the order, shapes and dtype the eager walk draws them: the same samples, so estimates equal to the
  eager ones up to rounding. (Training draws from the default generator inside the graph; inductor's kernels draw
  their own stream from it, so a compiled run is reproducible but not bit-identical to an eager one.)
- The step's decisions, in :func:`nvae.training.step.train_step`: the backward call, the gradient norm and clipping,
  the skip guard (a non-finite or outlying norm against a running quantile: data-dependent Python), putting back the
  buffers of a skipped step, the optimiser step and the EMA; and :meth:`~nvae.model.network.NVAE.importance_sample`'s
  loop over chunks and the ``logsumexp`` over K.

Mode: on CUDA ``"max-autotune-no-cudagraphs"``: inductor benchmarks its kernel choices for the convolutions and
matrix products at compile time (a slower first step), without CUDA graphs. ``"reduce-overhead"`` (CUDA graphs) does
not suit this step: it turns every Python float into a constant, and the KL coefficient and the regulariser weight
change at every step of the warm-up (a recompilation per step, soon past dynamo's limit); a replay writes its outputs
into the same buffers, so the loss terms of one step would change under the logger at the next; and its private
memory pool competes with the activations that bound NVAE's batch, for little gain: a step over large feature maps
is long beside the kernel launches CUDA graphs save. On the CPU: inductor's default mode.

Shapes and coefficients: the first compiled call specialises on its shapes and on beta and lambda; the next one with
other values recompiles once with them symbolic (dynamo's automatic dynamic), and so does the step where beta reaches
1 and KL balancing stops. Evaluation recompiles once for a shorter last chunk.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..model.layers import WNConv2d
from ..model.network import NVAE, BottomUp
from ..model.regularizers import SpectralRegularizer

#: The ``torch.compile`` backend when none is asked for (tests set a backend that generates no code).
BACKEND = "inductor"


def default_mode(device: Union[str, torch.device]) -> Optional[str]:
    """The inductor mode for ``device``: ``"max-autotune-no-cudagraphs"`` on CUDA, inductor's default elsewhere
    (see the module docstring)."""
    return "max-autotune-no-cudagraphs" if torch.device(device).type == "cuda" else None


def _compiled(fn: Callable, model: NVAE, mode: Optional[str], backend: Optional[str]) -> Callable:
    backend = backend or BACKEND
    if backend != "inductor":
        mode = None   # the modes are inductor's
    elif mode is None:
        mode = default_mode(next(model.parameters()).device)
    return torch.compile(fn, fullgraph=True, backend=backend, mode=mode)


# ------------------------------------------------------------------- training
class _WarmSpectral(SpectralRegularizer):
    """The spectral regulariser as a compiled step sees it: past its first call (checked before the compiled region),
    so the number of power iterations is known without reading the buffer that records it."""

    def power_iterations(self) -> int:
        return self.num_power_iter


def _data_init_convs(model: NVAE) -> List[WNConv2d]:
    return [m for m in model.modules() if isinstance(m, WNConv2d) and m.data_init]


def pending_initialisation(model: NVAE, lam: float) -> bool:
    """Whether the next training step of ``model`` runs a one-time initialisation: the spectral regulariser's first
    call (where ``lam`` turns it on) or a ``res_elu`` convolution's data-dependent initialisation."""
    if not model.training:
        return False
    return bool(lam and not bool(model.spectral.initialized)) or any(not bool(m.init_done)
                                                                     for m in _data_init_convs(model))


@contextlib.contextmanager
def as_initialised(model: NVAE, convs: Optional[List[WNConv2d]] = None) -> Iterator[None]:
    """``model`` for the block as a compiled step traces it, past its one-time initialisations: the spectral
    regulariser runs its usual number of iterations and the data-initialised convolutions skip the check, so the trace
    reads no buffer to choose a branch. Only for a model that :func:`pending_initialisation` has cleared; it is as it
    was afterwards. ``convs``: the model's data-initialised convolutions, when the caller has them already."""
    spectral = model.spectral
    convs = _data_init_convs(model) if convs is None else convs
    was = type(spectral)
    spectral.__class__ = _WarmSpectral
    for m in convs:
        m.data_init = False
    try:
        yield
    finally:
        spectral.__class__ = was
        for m in convs:
            m.data_init = True


def compile_loss(model: NVAE, objective: Callable, mode: Optional[str] = None,
                 backend: Optional[str] = None) -> Callable:
    """``objective`` (:func:`nvae.training.objective.nvae_loss`) for ``model``, compiled whole: a callable taking
    ``(net, x, beta, lam, alpha, balance=True)`` as the objective does (``net``: ``model`` or its DDP wrapper) and
    returning its result.

    While a one-time initialisation is pending (:func:`pending_initialisation`: the first step) the objective runs
    eagerly; after that, compiled with ``fullgraph=True``, under :func:`as_initialised`. ``mode`` (None:
    :func:`default_mode`) and ``backend`` (None: :data:`BACKEND`) go to ``torch.compile``; nothing compiles before the
    first compiled call.
    """
    compiled = _compiled(objective, model, mode, backend)
    convs = _data_init_convs(model)
    done = False   # every one-time initialisation has run: nothing to check again (each check reads a buffer, a
    #                device synchronisation on a GPU, at every step)

    def loss(net: torch.nn.Module, x: torch.Tensor, beta: float, lam: float, alpha: Optional[torch.Tensor],
             balance: bool = True):
        nonlocal done
        if not done:
            if pending_initialisation(model, lam):
                return objective(net, x, beta, lam, alpha, balance)
            done = bool(model.spectral.initialized) and all(bool(m.init_done) for m in convs)
        with as_initialised(model, convs):
            return compiled(net, x, beta, lam, alpha, balance)

    return loss


# ----------------------------------------------------------------- evaluation
def posterior_noise(model: NVAE, n: int, device: Union[str, torch.device],
                    generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """Every group's eps for ``n`` images, drawn as the eager walk draws them: from ``generator``, group by group in
    decoder order, each of the posterior's shape and dtype (under autocast the autocast dtype, which the posterior
    heads' convolutions give; else the weights' dtype). A pass fed these samples what the eager pass samples."""
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = model.groups[0].posterior_head.weight.dtype
    return [torch.randn((n, *shape), generator=generator, device=device, dtype=dtype) for shape in model.latent_shapes]


def compile_eval(model: NVAE, mode: Optional[str] = None, backend: Optional[str] = None) -> Callable:
    """:meth:`NVAE.posterior_pass <nvae.model.network.NVAE.posterior_pass>` of ``model`` compiled whole, for
    :meth:`~nvae.model.network.NVAE.importance_sample`'s ``posterior_pass``: a callable
    ``(x, bottom_up, generator=None) -> (log_w, nelbo)``.

    The eps are drawn from ``generator`` before the compiled pass (:func:`posterior_noise`): the same samples as
    the eager pass, so the same estimates up to rounding. ``mode`` and ``backend`` as in :func:`compile_loss`.
    """
    compiled = _compiled(model.posterior_pass, model, mode, backend)

    def posterior_pass(x: torch.Tensor, bottom_up: BottomUp,
                       generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return compiled(x, bottom_up, noise=posterior_noise(model, x.shape[0], x.device, generator))

    return posterior_pass


__all__: Sequence[str] = ("BACKEND", "as_initialised", "compile_eval", "compile_loss", "default_mode",
                          "pending_initialisation", "posterior_noise")
