"""The counter-based noise generator of the evolution strategies (docs/design.md, "Search spaces").

Every perturbation is a pure function of a key and a counter, never of a generator's history:

    key     = (run seed, stream)              stream: the matrix index of a seeded space's target
                                              (0, 1, ... in the space's module order), or OPTIMIZER_STREAM
                                              for the es optimizer's own explicit vectors
    counter = (0, 0, noise index, generation) the words numpy's Philox4x64-10 counts up from

``np.random.Philox`` (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) is a
counter-based bijection: a draw consumes counter[0] upwards, so two (generation, noise index) pairs
never overlap (they would need 2^128 blocks), and another matrix or run seed is another key, an
independent stream. This is why two same-shape matrices get different noise: es-at-scale's per-tensor
``torch.manual_seed(seed)`` gives every same-shape tensor the same draw. The normals come from numpy's
ziggurat on those bits, on the CPU: the same numbers on every rank, machine and device (a torch
generator on CUDA would differ from the CPU's), at the price of a host-to-device copy.
"""

from __future__ import annotations

import numpy as np

OPTIMIZER_STREAM = 2**64 - 1  # the es optimizer's explicit vectors (svd_lora); matrices count from 0
MASK64 = 2**64 - 1


def generator(run_seed: int, gen: int, index: int, stream: int) -> np.random.Generator:
    """The Philox generator of (run seed, generation, noise index, stream); see the module doc."""
    key = np.array([run_seed & MASK64, stream & MASK64], dtype=np.uint64)
    counter = np.array([0, 0, index & MASK64, gen & MASK64], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(counter=counter, key=key))


def normal(run_seed: int, gen: int, index: int, stream: int, n: int, dtype: type = np.float32) -> np.ndarray:
    """n standard normals of (run seed, generation, noise index, stream), float32 unless asked."""
    if gen < 0 or index < 0:
        raise ValueError(f"noise: generation {gen} and noise index {index} must be >= 0")
    return generator(run_seed, gen, index, stream).standard_normal(int(n), dtype=dtype)
