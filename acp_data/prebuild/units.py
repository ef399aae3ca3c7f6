"""Work units: object combinations for each target concept, with companions drawn from the priors' co-occurrence
counts, and their partition over ranks (docs/design.md "Work units, keys and determinism (contract)").

A unit depends only on ``(seed, target, k)``: asking for more images per category appends units and never changes
the earlier ones, and any rank can rebuild the global list without talking to the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..stages import WorkUnit, stable_hash

if TYPE_CHECKING:
    from ..categories import CategoryTable
    from ..priors import Priors

logger = logging.getLogger(__name__)

__all__ = ["make_units", "unit_seed", "shard_units", "rank_world_from_env", "parse_shard", "ShardError"]


class ShardError(ValueError):
    """A rank/world-size setting that does not make sense (names the flag or variable at fault)."""


def unit_seed(seed: int, target: int, k: int) -> int:
    """The seed of unit ``k`` of concept ``target`` under global ``seed`` (31 bits, stable across machines)."""
    return int(stable_hash({"seed": int(seed), "target": int(target), "k": int(k)}, n=8), 16) & 0x7FFFFFFF


def _companion_weights(cooc: np.ndarray, target: int, num_categories: int) -> np.ndarray:
    """Weights over category ids 0..K for companions of ``target`` (index 0 and the target itself get 0).

    The target's co-occurrence row when it has any count; otherwise (a rare category seen alone) the overall
    co-occurrence mass of each category, so companions are at least common scene objects; uniform as a last resort.
    """
    w = np.asarray(cooc[target], dtype=np.float64).copy() if target < len(cooc) else np.zeros(num_categories + 1)
    w[0] = 0.0
    w[target] = 0.0
    if w.sum() <= 0:
        w = np.asarray(cooc, dtype=np.float64).sum(axis=0) - np.diag(np.asarray(cooc, dtype=np.float64))
        w[0] = 0.0
        w[target] = 0.0
    if w.sum() <= 0:
        w = np.ones(num_categories + 1)
        w[0] = 0.0
        w[target] = 0.0
    w = np.clip(w, 0.0, None)
    return w / w.sum() if w.sum() > 0 else w


def make_units(
    categories: CategoryTable,
    targets: Sequence[int],
    priors: Priors | None,
    images_per_category: int,
    seed: int,
    max_objects: int = 4,
    max_companions: int | None = None,
) -> list[WorkUnit]:
    """``images_per_category`` units per target concept, ordered round-robin over targets (unit ``k`` of every
    target before unit ``k + 1`` of any, so ``--max-units`` keeps the concepts balanced); ``index`` = position.

    Each combination is the target followed by 0..``max_companions`` distinct companions (default
    ``max_objects - 1``), drawn without replacement in proportion to the priors' co-occurrence counts with the
    target. Without priors a combination is the target alone.
    """
    if images_per_category < 1:
        raise ValueError(f"images_per_category must be >= 1, got {images_per_category}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if max_companions is None:
        max_companions = max_objects - 1
    if max_companions < 0 or max_companions > max_objects - 1:
        raise ValueError(f"max_companions must be in 0..max_objects-1 ({max_objects - 1}), got {max_companions}")
    k_cats = len(categories)
    targets = [int(t) for t in targets]
    if not targets:
        raise ValueError("no target concepts: the category selection is empty")
    for t in targets:
        if not 1 <= t <= k_cats:
            raise ValueError(f"target category id {t} is outside 1..{k_cats} of {categories.source or 'the table'}")
    if len(set(targets)) != len(targets):
        raise ValueError("target category ids contain duplicates")
    cooc = None
    if priors is not None and max_companions > 0:
        cooc = np.asarray(priors.cooccurrence())
        if cooc.shape != (k_cats + 1, k_cats + 1):
            raise ValueError(f"priors co-occurrence has shape {cooc.shape}, expected {(k_cats + 1, k_cats + 1)} for "
                             f"{k_cats} categories: the priors were built for another category table")
    weights: dict[int, np.ndarray] = {}
    units: list[WorkUnit] = []
    for k in range(images_per_category):
        for t in targets:
            s = unit_seed(seed, t, k)
            combo: tuple[int, ...] = (t,)
            if cooc is not None:
                if t not in weights:
                    weights[t] = _companion_weights(cooc, t, k_cats)
                w = weights[t]
                rng = np.random.default_rng(s)
                n = int(rng.integers(0, max_companions + 1))
                n = min(n, int(np.count_nonzero(w)))
                if n:
                    picks = rng.choice(len(w), size=n, replace=False, p=w)
                    combo = (t, *(int(c) for c in picks))
            units.append(WorkUnit(index=len(units), combo=combo, seed=s, target=t))
    return units


def shard_units(units: Sequence[WorkUnit], rank: int, world: int) -> list[WorkUnit]:
    """The units of rank ``rank`` of ``world``: those with ``index % world == rank``."""
    if world < 1:
        raise ShardError(f"world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ShardError(f"rank must be in 0..{world - 1} for world size {world}, got {rank}")
    return [u for u in units if u.index % world == rank]


def parse_shard(shard: str) -> tuple[int, int]:
    """``"r/W"`` -> ``(r, W)`` with ``0 <= r < W``."""
    parts = str(shard).strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        rank, world = int(parts[0]), int(parts[1])
    except ValueError:
        raise ShardError(f"--shard {shard!r} must look like RANK/WORLD, e.g. 0/4") from None
    if world < 1 or not 0 <= rank < world:
        raise ShardError(f"--shard {shard!r}: rank must be in 0..WORLD-1 and WORLD >= 1")
    return rank, world


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShardError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _env_pair(env: Mapping[str, str], rank_var: str, world_var: str) -> tuple[int, int] | None:
    has_r, has_w = rank_var in env, world_var in env
    if not has_r and not has_w:
        return None
    if has_r != has_w:
        missing = world_var if has_r else rank_var
        present = rank_var if has_r else world_var
        raise ShardError(f"{present} is set but {missing} is not; set both or pass --shard RANK/WORLD")
    rank, world = _env_int(env, rank_var), _env_int(env, world_var)
    if rank_var == "SLURM_ARRAY_TASK_ID":  # arrays may start anywhere and step (--array=1-20:2)
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if step < 1 or (rank - first) % step:
            raise ShardError(f"SLURM_ARRAY_TASK_ID={rank} is not on the array's grid (min {first}, step {step})")
        rank = (rank - first) // step
    if world < 1 or not 0 <= rank < world:
        raise ShardError(f"{rank_var}={env[rank_var]} and {world_var}={env[world_var]} do not give a rank in "
                         f"0..{world_var}-1 (rank {rank}, world {world})")
    return rank, world


def rank_world_from_env(shard: str | None = None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world)`` for prebuild: ``--shard r/W`` wins; else ``RANK``/``WORLD_SIZE`` (torchrun, detectron2
    launch), then a SLURM array (``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``
    of ``SLURM_ARRAY_TASK_COUNT``), then SLURM tasks (``SLURM_PROCID``/``SLURM_NTASKS``); else ``(0, 1)``."""
    if shard is not None and str(shard).strip():
        return parse_shard(shard)
    env = os.environ if env is None else env
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                                ("SLURM_PROCID", "SLURM_NTASKS")):
        got = _env_pair(env, rank_var, world_var)
        if got is not None:
            logger.info("rank %d of %d from %s/%s", got[0], got[1], rank_var, world_var)
            return got
    return 0, 1
