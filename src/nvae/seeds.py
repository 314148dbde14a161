"""Every seed nvae derives from another: one place, so that no two random streams share seeds by accident.

Two derivations, each kept exactly as the files and results written so far were drawn with it:

* :func:`derived_seed` ``(namespace, *parts)``: a 63-bit BLAKE2b hash of ``"namespace/part/part/..."``.
  Streams of their own (an evaluation's batch ``b``, a latent export's batch, a validation
  after an epoch) take a namespace of their own below, so they never meet.
* :func:`sequence_seed` ``(*entropy, bits=32)``: NumPy's ``SeedSequence(entropy)``, its first
  ``bits // 32`` words of state read as one number (the first word the most significant).
  Used for each process's streams (``bits=32``) and the generators of bulk-sampling chunks
  (``bits=64``).

Neighbouring inputs give unrelated seeds in both. Changing a namespace, the order of the
parts or a derivation changes every number drawn from it (and makes resumed evaluations and
sample folders refuse to continue): add new ones instead.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derived_seed", "sequence_seed", "EVAL_BATCH", "LATENTS_ENCODE", "LATENTS_KL", "VALIDATION_EVAL",
           "VALIDATION_SAMPLES", "REFERENCE_IMAGE"]

#: Global batch ``b`` of an evaluation (:func:`nvae.analysis.likelihood.evaluate`) and of the FID
#: protocol's images: ``derived_seed(EVAL_BATCH, seed, b)``.
EVAL_BATCH = "nvae-eval"
#: Global batch ``b`` of a latent export (:func:`nvae.analysis.latent_export.encode_dataset`), and of
#: its pass that finds the active channels: ``derived_seed(LATENTS_ENCODE, seed, b)``.
LATENTS_ENCODE = "nvae-latents/encode"
LATENTS_KL = "nvae-latents/kl"
#: The validation after ``epoch`` of a run seeded ``seed`` (:mod:`nvae.training.validation`), its
#: evaluation and its sample grids: ``derived_seed(VALIDATION_EVAL, seed, epoch)``.
VALIDATION_EVAL = "nvae-validation/eval"
VALIDATION_SAMPLES = "nvae-validation/samples"
#: Image ``k`` of the official FID reference images (:class:`nvae.analysis.fid_protocol.OfficialReference`),
#: whose flips and binarisation draw from ``derived_seed(REFERENCE_IMAGE, seed, k)``.
REFERENCE_IMAGE = "nvae-fid/reference-image"

_MASK_63 = 2 ** 63 - 1


def derived_seed(namespace: str, *parts) -> int:
    """A 63-bit seed of ``parts`` (integers, or short names) in ``namespace``: the first 8 bytes of the
    BLAKE2b hash of ``"namespace/part/..."`` (each part as an f-string writes it), little-endian, top bit cleared.
    """
    text = "/".join([namespace, *(f"{p}" for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def sequence_seed(*entropy: int, bits: int = 32) -> int:
    """A ``bits``-bit seed (a multiple of 32) from NumPy's ``SeedSequence(list(entropy))``: its first
    ``bits // 32`` 32-bit words of state, the first one the most significant."""
    if bits < 32 or bits % 32:
        raise ValueError(f"bits must be a positive multiple of 32, got {bits}")
    words = np.random.SeedSequence(list(entropy)).generate_state(bits // 32, dtype=np.uint32)
    value = 0
    for word in words:
        value = value << 32 | int(word)
    return value
