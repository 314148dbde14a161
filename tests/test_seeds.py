"""Seed derivation (nvae.seeds): every seed is the one the formulas used before they were gathered here.

The old formulas are written out below, as they stood in their modules, so that a change to
``nvae.seeds`` that moves any seed (and with it every number drawn from it: evaluations,
latent files, sample chunks, validations, resumed runs) fails here.
"""
import hashlib
import itertools

import numpy as np
import pytest
import torch

from nvae.analysis.bulk_samples import chunk_generator
from nvae.distributed import DistributedContext
from nvae.seeds import (EVAL_BATCH, LATENTS_ENCODE, LATENTS_KL, VALIDATION_EVAL, VALIDATION_SAMPLES, derived_seed,
                        sequence_seed)
from nvae.training.state import TrainState

SEEDS = (0, 1, 7, 12345, 2 ** 31 - 1, 2 ** 32 + 5, 2 ** 62 - 1)
INDICES = (0, 1, 2, 99, 100, 65537)


# ------------------------------------------------------------ the formulas as they were
def old_batch_seed(seed, index):            # nvae.analysis.likelihood.batch_seed
    digest = hashlib.blake2b(f"nvae-eval/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def old_latents_seed(seed, index, stream="encode"):     # nvae.analysis.latent_export.latents_seed
    digest = hashlib.blake2b(f"nvae-latents/{stream}/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def old_validation_seed(seed, epoch, purpose):         # nvae.training.validation.validation_seed
    digest = hashlib.blake2b(f"nvae-validation/{purpose}/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def old_chunk_seed(seed, index):            # nvae.analysis.bulk_samples.chunk_generator
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def old_rank_seed(seed, rank):              # nvae.training.state.rank_seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


# ------------------------------------------------------------ pinned
@pytest.mark.parametrize("seed", SEEDS)
def test_hashed_seeds_are_those_of_the_old_formulas(seed):
    for index in INDICES:
        assert derived_seed(EVAL_BATCH, seed, index) == old_batch_seed(seed, index)
        assert derived_seed(LATENTS_ENCODE, seed, index) == old_latents_seed(seed, index)
        assert derived_seed(LATENTS_ENCODE, seed, index) == old_latents_seed(seed, index, "encode")
        assert derived_seed(LATENTS_KL, seed, index) == old_latents_seed(seed, index, "kl")
        assert derived_seed(VALIDATION_EVAL, seed, index) == old_validation_seed(seed, index, "eval")
        assert derived_seed(VALIDATION_SAMPLES, seed, index) == old_validation_seed(seed, index, "samples")


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_seeds_are_those_of_the_old_formulas(seed):
    for index in INDICES:
        assert sequence_seed(seed, index) == old_rank_seed(seed, index)
        assert sequence_seed(seed, index, bits=64) == old_chunk_seed(seed, index)
        # the chunk generator itself is seeded with it
        assert chunk_generator(seed, index).initial_seed() == old_chunk_seed(seed, index)


def test_a_process_resumed_by_another_number_of_processes_is_seeded_as_before():
    for step, rank in [(0, 0), (5, 1), (1234, 3)]:
        model = torch.nn.Linear(1, 1)
        state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=step,
                           dist=DistributedContext(rank=rank, world_size=rank + 2))
        with torch.random.fork_rng(devices=[]):
            state._load_rng([])      # no stream for this number of processes: fresh ones, from (step, rank)
            assert torch.initial_seed() == old_rank_seed(step, rank)
        assert state.data_generator.initial_seed() == old_rank_seed(step, rank) + 1


def test_seeds_of_neighbouring_inputs_and_namespaces_differ():
    hashed = {derived_seed(ns, s, i) for ns in (EVAL_BATCH, LATENTS_ENCODE, LATENTS_KL, VALIDATION_EVAL,
                                                 VALIDATION_SAMPLES) for s, i in itertools.product(range(4), range(4))}
    assert len(hashed) == 5 * 16 and all(0 <= v < 2 ** 63 for v in hashed)
    words = {sequence_seed(s, i, bits=64) for s, i in itertools.product(range(4), range(4))}
    assert len(words) == 16 and all(0 <= v < 2 ** 64 for v in words)
    assert all(0 <= sequence_seed(s, 0) < 2 ** 32 for s in range(4))
    with pytest.raises(ValueError, match="multiple of 32"):
        sequence_seed(1, 2, bits=48)
