"""Counter-based random numbers: every value is a hash of integers (seed, tag, position, attempt, ...), never the
state of a generator, so a stream is a pure function of its seed whatever the number of ranks and workers
(docs/design.md "Work units, keys and determinism (contract)").

splitmix64's finaliser over uint64, on Python ints (:func:`mix64`) and vectorised over numpy arrays
(:func:`mix64_array`); the tags keep the kinds of random choice of the training stream apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

# Stream tags: each kind of random choice hashes under its own tag so that no two choices share bits.
TAG_SOURCE = 1
TAG_SYNTH_PICK = 2
TAG_SYNTH_CAT = 3
TAG_ROUND = 4
TAG_PERM = 5
TAG_RETRY = 6
TAG_PASTE = 7
TAG_AUG = 8
TAG_SEGMENT = 9
TAG_BATCH = 10  # exact composition: each rank's phase of the per-batch synthetic counts
TAG_GROUP = 11  # exact composition with grouping: the aspect group of an all-synthetic batch


def mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (a bijection of uint64 with full avalanche)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def mix64_array(x: np.ndarray | Sequence[int]) -> np.ndarray:
    """:func:`mix64` vectorised over a uint64 array (wrapping arithmetic); a new array."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
        return x ^ (x >> np.uint64(31))


def derive_key(*words: int) -> int:
    """A 64-bit key from a sequence of integers (seed, tag, position, attempt, ...); order matters."""
    k = 0x6A09E667F3BCC909
    for w in words:
        k = mix64((k + GOLDEN) ^ mix64(int(w) & _MASK64))
    return k


def hash_u64(key: int, counters: np.ndarray | Sequence[int]) -> np.ndarray:
    """splitmix64 outputs ``mix(key + (c + 1) * golden)`` for each counter ``c`` (uint64 array, vectorised)."""
    c = np.asarray(counters, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        return mix64_array(np.uint64(key) + (c + np.uint64(1)) * np.uint64(GOLDEN))


def uniform(key: int, counters: np.ndarray | Sequence[int]) -> np.ndarray:
    """Uniform float64 in [0, 1) for each counter, 53 random bits each."""
    return (hash_u64(key, counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform_scalar(key: int, counter: int = 0) -> float:
    """The scalar version of :func:`uniform` (same value for the same key and counter)."""
    x = mix64((key + (counter + 1) * GOLDEN) & _MASK64)
    return (x >> 11) * (1.0 / (1 << 53))


def philox(key: int) -> np.random.Generator:
    """A numpy Generator on a counter-based Philox bit generator keyed by a 64-bit hash."""
    return np.random.Generator(np.random.Philox(key=key & _MASK64))
