"""``build_acp_train_loader(cfg)``: real data from ``DATASETS.TRAIN`` plus the lazy synthetic dataset of
``ACP.CACHE_DIRS``, mixed by the counter-based samplers and mapped by :class:`ACPDatasetMapper`.

The synthetic data never goes through ``DATASETS.TRAIN`` (detectron2 would materialise it as a list). The sampler
yields ``SampleRef(position, source, index, version)``; :class:`MixedDataset` resolves it, seeds the augmentation
RNG from ``(SEED, position)`` and maps the record itself (``build_detection_train_loader`` gets ``mapper=None``), so
a rejected sample is replaced from the same source at an index derived from ``(SEED, position, attempt)`` instead of
detectron2's ``MapDataset`` retry with a random index of the whole dataset.

At start the loader checks, with one clear error each: the sampler is supported, the cache's CategoryTable matches
the real dataset's, synthetic samples survive the load-time selection (which filter removed what), paste mode has a
non-empty crop store; then it writes ``OUTPUT_DIR/acp_run.json`` (mask format, mix mode, counts, effective synthetic
fraction), which :func:`acp_data.d2.runfile.check_same_mask_format` reads to refuse comparing runs trained with
different mask formats.

Two layers, as detectron2's ``build_detection_train_loader``: :func:`_train_loader_from_config` (the checks,
``MIX_MODE`` resolved once, the record) and the ``@configurable`` :func:`build_acp_train_loader` over explicit parts
(docs/design.md "The stream contract").
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data as torchdata
from detectron2.config import configurable

from ..categories import GROUP_NAMES, CategoryError, CategoryTable
from ..fsio import atomic_write_json
from ..rng import TAG_AUG, TAG_PASTE, derive_key
from .batching import aspect_groups, build_batch_sampler, real_aspect_groups
from .runfile import RUN_FILE
from .sampler import (
    REAL,
    SOURCE_NAMES,
    ConcatSampler,
    ImageCategories,
    MixSampler,
    PoolSchedule,
    RatioSampler,
    SampleRef,
    SynthPool,
    describe_concat_factors,
    image_repeat_factors,
)

logger = logging.getLogger(__name__)

SUPPORTED_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler")


class ACPLoaderError(ValueError):
    """A configuration or data problem found when the ACP train loader starts; the message says what to change."""


# ----- the dataset wrapper -------------------------------------------------------------------------------------------
class StaticVersions:
    """``version -> dataset`` for a synthetic pool that never changes (every version is the one dataset)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __call__(self, version: int) -> Any:
        return self.dataset


class MixedDataset(torchdata.Dataset):
    """Map-style dataset indexed by :class:`SampleRef`: fetches the record from its source, maps it, and replaces a
    rejected sample from the same source (``sampler.replacement``) up to ``max_attempts`` times.

    ``synthetic`` maps a pool version to the synthetic dataset (:class:`StaticVersions`, or the online schedule's
    ``dataset``); ``None`` when the stream has no synthetic images.
    """

    def __init__(self, real: Any, synthetic: Callable[[int], Any] | None, mapper: Any, sampler: MixSampler,
                 seed: int, max_attempts: int = 32):
        self.real = real
        self.synthetic = synthetic
        self.mapper = mapper
        self.sampler = sampler
        self.seed = int(seed)
        self.max_attempts = int(max_attempts)

    def _synthetic(self, version: int) -> Any:
        if self.synthetic is None:
            raise RuntimeError(f"the stream asked for a synthetic sample (pool version {version}) but the loader has "
                               "no synthetic dataset")
        return self.synthetic(version)

    def record(self, ref: SampleRef) -> dict[str, Any] | None:
        if ref.source == REAL:
            return self.real[ref.index]
        return self._synthetic(ref.version)[ref.index]

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        ref = SampleRef(*ref)
        first = ref
        for attempt in range(self.max_attempts):
            record = self.record(ref)
            if record is not None:
                # detectron2's augmentations draw from numpy's (and python's) global RNG: seed them from the position
                # so the mapped sample is the same in any worker layout.
                aug = derive_key(self.seed, TAG_AUG, ref.position, attempt)
                np.random.seed(aug & 0xFFFFFFFF)
                random.seed(aug)
                out = self.mapper(record, sample_key=derive_key(self.seed, TAG_PASTE, ref.position, attempt))
                if out is not None:
                    return out
            ref = self.sampler.replacement(first, attempt + 1)
        raise RuntimeError(f"{self.max_attempts} {SOURCE_NAMES[first.source]} samples in a row were rejected at "
                           f"stream position {first.position} (broken samples or none with instances left); run "
                           "`acp-data verify CACHE` and check the load-time selection")


# ----- helpers ---------------------------------------------------------------------------------------------------------
def _real_category_table(dataset_names: Sequence[str]) -> tuple[CategoryTable, str]:
    from .lvis_format import metadata_category_table

    name = dataset_names[0]
    try:
        table = metadata_category_table(name)
    except (KeyError, ValueError) as e:
        raise ACPLoaderError(f"cannot get the categories of DATASETS.TRAIN[0] = {name!r}: {e}") from e
    return table, f"dataset {name!r} ({table.source or 'registered metadata'})"


def check_categories(real: CategoryTable, real_source: str, cache_dirs: Sequence[str]) -> None:
    """The real dataset and every cache manifest must list the same categories under the same ids."""
    from ..cache.manifest import load_manifest

    for d in cache_dirs:
        mf = load_manifest(d)
        try:
            mf.categories.check_same(real, f"cache manifest {mf.path}", real_source, names_only=True)
        except CategoryError as e:
            raise ACPLoaderError(f"the cache's CategoryTable does not match the training data: {e}. Build the cache "
                                 "with the categories of DATASETS.TRAIN (acp-data prebuild --categories-from JSON)"
                                 ) from e


def _describe_selection(stats: dict[str, int], cfg: Any) -> str:
    a = cfg.ACP
    parts = [f"{stats.get('samples', 0)} samples in the caches"]
    steps = [("duplicates", "duplicates", None),
             ("after_select", f"ACP.SELECT = {a.SELECT!r}", "kept"),
             ("after_min_clis_l", f"ACP.MIN_CLIS_L = {a.MIN_CLIS_L}", "kept"),
             ("dropped_target_samples", f"ACP.CATEGORIES = {a.CATEGORIES!r} (samples by target)", "removed"),
             ("dropped_min_clis_i", f"ACP.MIN_CLIS_I = {a.MIN_CLIS_I}", "instances dropped"),
             ("dropped_categories", f"ACP.CATEGORIES = {a.CATEGORIES!r} (instances)", "instances dropped"),
             ("empty_skipped", "images left without instances", "removed"),
             ("capped", f"ACP.MAX_IMAGES = {a.MAX_IMAGES}", "removed")]
    for key, what, verb in steps:
        if key in stats:
            parts.append(f"{what}: {stats[key]} {verb or 'removed'}")
    return "; ".join(parts)


def synth_pool(dataset: Any) -> SynthPool:
    """The sampler's view of a SyntheticDataset: which (contiguous) categories each kept image contains, and each
    image's aspect group from the cache index's sizes (for aspect-ratio grouping; nothing is decoded)."""
    pos, cats = dataset.result.sample_category_pairs()
    res = dataset.result
    widths, heights = np.zeros(len(dataset), np.int64), np.zeros(len(dataset), np.int64)
    for ci, reader in enumerate(dataset.readers):
        sel = np.flatnonzero(np.asarray(res.cache_index) == ci)
        if sel.size:
            rows = np.asarray(res.sample_row)[sel]
            widths[sel], heights[sel] = reader.column("width")[rows], reader.column("height")[rows]
    return SynthPool(ImageCategories.from_rows(pos, np.asarray(cats, np.int64) - 1, len(dataset)),
                     groups=aspect_groups(widths, heights))


def _frequency_of(table: CategoryTable) -> dict[int, str]:
    """Contiguous category id -> r/c/f."""
    return {c.id - 1: c.frequency for c in table}


def _instances_per_group(counts: dict[int, int], freq: dict[int, str]) -> dict[str, int]:
    out = {GROUP_NAMES[g]: 0 for g in ("r", "c", "f")}
    for c, n in counts.items():
        out[GROUP_NAMES[freq.get(c, "r")]] += n
    return out


def _repeat_settings(cfg: Any) -> tuple[float, bool]:
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name not in SUPPORTED_SAMPLERS:
        raise ACPLoaderError(f"config key DATALOADER.SAMPLER_TRAIN = {name!r} is not supported with ACP.ENABLED; use "
                             f"one of {', '.join(SUPPORTED_SAMPLERS)} (the ACP samplers reproduce them)")
    if name == "TrainingSampler":
        return 0.0, True
    return float(cfg.DATALOADER.REPEAT_THRESHOLD), bool(getattr(cfg.DATALOADER, "REPEAT_SQRT", True))




def build_paste_source(cfg: Any, selection: Any, table: CategoryTable) -> Any:
    """Crops of the instances the load-time selection keeps, over all caches, with the priors' size statistics."""
    from dataclasses import replace

    from ..cache.crops import CropStore
    from ..cache.layout import CacheError
    from ..cache.reader import CacheReader
    from ..cache.selection import candidate_hash, select
    from .mapper import PasteSource

    stores, ids = [], []
    for d in cfg.ACP.CACHE_DIRS:
        try:
            store = CropStore(d)
        except CacheError as e:
            raise ACPLoaderError(f"ACP.MIX_MODE = {cfg.ACP.MIX_MODE!r} pastes cut-outs from the crop store, but {e}")\
                from e
        if len(store) == 0:
            raise ACPLoaderError(f"ACP.MIX_MODE = {cfg.ACP.MIX_MODE!r}: the crop store of {d} is empty; build it with "
                                 f"`acp-data crops {d}` (after the cache has samples)")
        reader = CacheReader(d)
        if {s.name: s.generation for s in reader.shards} != store.meta.get("built_from"):
            logger.warning("the crop store of %s was built from other shards or index generations than the cache "
                           "now has; rebuild it with `acp-data crops %s` to paste from every sample", d, d)
        res = select(reader, replace(selection, categories_apply_to="instances"))  # the pool: chosen categories' crops
        kh = reader.column("key_hash")[res.sample_row]
        ci = reader.column("candidate_idx")[res.sample_row]
        counts = np.diff(res.inst_offsets)
        kept = candidate_hash(0, np.repeat(kh, counts), np.repeat(ci, counts), salt=0x57A7) \
            ^ np.asarray(res.inst_local, np.uint64)
        have = candidate_hash(0, np.asarray(store.column("key_hash")), np.asarray(store.column("candidate_idx")),
                              salt=0x57A7) ^ np.asarray(store.column("instance"), np.uint64)
        stores.append(store)
        ids.append(np.flatnonzero(np.isin(have, kept)))
    n = sum(len(i) for i in ids)
    if n == 0:
        raise ACPLoaderError(f"ACP.MIX_MODE = {cfg.ACP.MIX_MODE!r}: none of the {sum(len(s) for s in stores)} crops in "
                             f"the crop stores of {list(cfg.ACP.CACHE_DIRS)} belongs to an instance kept by the "
                             f"load-time selection (ACP.SELECT {cfg.ACP.SELECT!r}, MIN_CLIS_I {cfg.ACP.MIN_CLIS_I}, "
                             f"CATEGORIES {cfg.ACP.CATEGORIES!r}); loosen it or rebuild with `acp-data crops CACHE`")
    stats: dict[int, tuple[float, float, float, float]] = {}
    if cfg.ACP.PASTE.SCALE_FROM_PRIORS:
        from ..priors import Priors

        try:
            priors = Priors.load(cfg.ACP.PRIORS)
        except ValueError as e:
            raise ACPLoaderError(f"config key ACP.PRIORS (paste scale, ACP.PASTE.SCALE_FROM_PRIORS): {e}") from e
        cats = np.unique(np.concatenate([np.asarray(s.column("category_id"))[i] for s, i in zip(stores, ids)]))
        for c in cats.tolist():
            st = priors.size_stats(int(c))
            if st is not None:
                stats[int(c)] = st
        missing = [table[c].name for c in cats.tolist() if int(c) not in stats]
        if missing:
            logger.warning("the priors %s have no boxes of %d pasted categories (%s); those use ACP.PASTE.SCALE_RANGE",
                           cfg.ACP.PRIORS, len(missing), ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
    return PasteSource(stores, ids, stats)


# ----- the loader -----------------------------------------------------------------------------------------------------
def _online_replay_dir(cfg: Any) -> str:
    from .online import REPLAY_ENV

    return str(cfg.ACP.ONLINE_REPLAY or os.environ.get(REPLAY_ENV, ""))


@dataclass(frozen=True)
class MixMode:
    """``ACP.MIX_MODE`` (with ``ACP.SYNTH_RATIO``) resolved once: what the stream is made of (docs/mixing.md)."""

    name: str
    images: bool  # whole synthetic images in the stream: always in concat, in the ratio modes when the ratio is > 0
    ratio: float  # ratio modes: the synthetic fraction of stream positions (0 without synthetic images)
    paste: bool  # cut-outs from the crop store pasted onto real images

    @property
    def concat(self) -> bool:
        """Repeat-factor sampling over the union of real and synthetic images (the paper's method)."""
        return self.name == "concat"

    @classmethod
    def from_cfg(cls, cfg: Any) -> MixMode:
        """From a validated config (``validate_acp_config``)."""
        mode = cfg.ACP.MIX_MODE
        images = mode == "concat" or (mode in ("ratio", "ratio+paste") and float(cfg.ACP.SYNTH_RATIO) > 0)
        ratio = float(cfg.ACP.SYNTH_RATIO) if images and mode != "concat" else 0.0
        return cls(name=mode, images=images, ratio=ratio, paste="paste" in mode)


def _prepare_synthetic(cfg: Any) -> tuple[CategoryTable, Any, Any, Any]:
    """Checks, in order (each failure one ``ACPLoaderError``): config values, the sampler, the categories of
    DATASETS.TRAIN against every cache manifest, usable synthetic samples, the crop store (paste modes). Returns the
    real CategoryTable, the selection, the lazy synthetic dataset (registered as ``acp_synth_<train name>``) and the
    paste source (or None)."""
    from detectron2.data import DatasetCatalog

    from ..cache.selection import SelectionError, selection_from_cfg
    from .config import ConfigError, validate_acp_config
    from .datasets import register_acp_synthetic

    try:
        validate_acp_config(cfg)
    except ConfigError as e:
        raise ACPLoaderError(str(e)) from e
    a = cfg.ACP
    if not a.ENABLED:
        raise ACPLoaderError("config key ACP.ENABLED is False: use detectron2's build_detection_train_loader")
    mix = MixMode.from_cfg(cfg)
    _repeat_settings(cfg)
    table, real_source = _real_category_table(cfg.DATASETS.TRAIN)
    check_categories(table, real_source, a.CACHE_DIRS)
    try:
        selection = selection_from_cfg(cfg, table)
    except (CategoryError, ValueError) as e:
        raise ACPLoaderError(f"config key ACP.CATEGORIES = {a.CATEGORIES!r}: {e}") from e
    name = register_acp_synthetic(cfg.DATASETS.TRAIN[0], list(a.CACHE_DIRS), cfg.DATASETS.TRAIN[0], selection,
                                  box_mode=a.BOX)
    try:
        synth = DatasetCatalog.get(name)
    except SelectionError as e:  # settings the caches cannot serve (names the key)
        raise ACPLoaderError(str(e)) from e
    if mix.images and len(synth) == 0:
        raise ACPLoaderError(f"ACP.MIX_MODE = {mix.name!r}" + (f" with ACP.SYNTH_RATIO = {a.SYNTH_RATIO}"
                             if not mix.concat else "") + " but no synthetic sample is usable after the load-time "
                             f"selection: {_describe_selection(synth.result.stats, cfg)}. Loosen the filters or add "
                             f"samples to {list(a.CACHE_DIRS)}")
    paste_source = build_paste_source(cfg, selection, table) if mix.paste else None
    return table, selection, synth, paste_source


def check_acp_train_data(cfg: Any) -> None:
    """The start-up checks of :func:`build_acp_train_loader` without building it (for ``tools/train_net.py``'s data
    stage: datasets must be registered). Raises ``ACPLoaderError`` with one clear message."""
    _prepare_synthetic(cfg)


def _train_loader_from_config(cfg: Any, mapper: Any = None) -> dict[str, Any]:
    """The arguments of :func:`build_acp_train_loader` from a config: runs the start-up checks (one ``ACPLoaderError``
    each), resolves ``ACP.MIX_MODE`` once into a sampler and a paste source (in the default mapper), starts the online
    schedule (``ACP.ONLINE``), and writes ``OUTPUT_DIR/acp_run.json`` (rank 0). A ``mapper`` given replaces the
    default ``ACPDatasetMapper(cfg, True, paste_source=...)``."""
    from detectron2.data import get_detection_dataset_dicts
    from detectron2.utils import comm

    from .mapper import ACPDatasetMapper

    table, selection, synth, paste_source = _prepare_synthetic(cfg)
    a = cfg.ACP
    mix = MixMode.from_cfg(cfg)
    seed = int(cfg.SEED)
    thresh, rsqrt = _repeat_settings(cfg)
    rank, world = comm.get_rank(), comm.get_world_size()

    # real data, as detectron2 loads it
    real_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    if isinstance(real_dicts, torchdata.Dataset):
        raise ACPLoaderError(f"DATASETS.TRAIN = {list(cfg.DATASETS.TRAIN)} is a torch Dataset; the ACP loader needs "
                             "datasets registered as lists of dicts (e.g. ACP.REGISTER_LVIS)")
    real_cats = ImageCategories.from_dataset_dicts(real_dicts)
    real_factors = image_repeat_factors(real_cats, thresh, rsqrt)
    freq = _frequency_of(table)
    if mapper is None:
        mapper = ACPDatasetMapper(cfg, True, paste_source=paste_source)

    # the stream
    online = bool(a.ONLINE) and mix.images
    schedule: PoolSchedule
    publisher = None
    synthetic_of: Any = StaticVersions(synth)
    if online:
        schedule, publisher, synthetic_of = _online_schedule(cfg, selection, synth, rank, world)
    else:
        schedule = PoolSchedule(synth_pool(synth))
    common = dict(seed=seed, num_real=len(real_dicts), real_factors=real_factors, schedule=schedule,
                  synth_sampling=a.SYNTH_SAMPLING, rank=rank, world_size=world)
    if mix.concat:
        sampler: MixSampler = ConcatSampler(real_categories=real_cats, repeat_thresh=thresh, repeat_sqrt=rsqrt,
                                            **common)
    else:
        sampler = RatioSampler(ratio=mix.ratio, **common)

    # what the run will see, logged and recorded
    summary = _summarise(cfg, real_dicts, real_cats, synth, freq, sampler, thresh, rsqrt, mix, paste_source)
    summary["batch_composition"] = a.BATCH_COMPOSITION
    if a.BATCH_COMPOSITION == "exact" and mix.images:  # planned per batch: exact in the long run
        summary["effective_synthetic_fraction"] = build_batch_sampler(
            sampler, composition="exact", batch_size=int(cfg.SOLVER.IMS_PER_BATCH) // world,
            real_groups=None).synthetic_fraction(100_000)
    _log_summary(summary)
    if rank == 0:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        summary["synthetic_set"] = _record_synthetic_set(cfg.OUTPUT_DIR, synth, mix)
        atomic_write_json(Path(cfg.OUTPUT_DIR) / RUN_FILE, summary)

    return {"dataset": real_dicts, "synthetic": synthetic_of if mix.images else None, "sampler": sampler,
            "mapper": mapper, "seed": seed, "total_batch_size": int(cfg.SOLVER.IMS_PER_BATCH),
            "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            "num_workers": cfg.DATALOADER.NUM_WORKERS, "online": online, "publisher": publisher,
            "batch_composition": a.BATCH_COMPOSITION}


@configurable(from_config=_train_loader_from_config)
def build_acp_train_loader(dataset: Any, *, synthetic: Callable[[int], Any] | None, sampler: MixSampler, mapper: Any,
                           total_batch_size: int, aspect_ratio_grouping: bool = True, num_workers: int = 0,
                           seed: int | None = None, online: bool = False, publisher: Any = None,
                           batch_composition: str = "stream") -> Any:
    """The train loader of an ACP run, as detectron2's ``build_detection_train_loader``: ``build_acp_train_loader(cfg)``
    (``tools/train_net.py``; see the module docstring), or from explicit parts:

    ``dataset`` the real dataset dicts (a list, or a map-style dataset); ``synthetic`` pool version -> synthetic
    dataset (:class:`StaticVersions`, the online schedule's lookup; ``None``: no synthetic images); ``sampler`` a
    :class:`MixSampler` over both; ``mapper`` called as ``mapper(record, sample_key=...)``; ``seed`` keys the
    augmentation and paste choices (default ``sampler.seed``); ``online`` wraps the loader so that ``publisher`` (rank
    0 of a live online run, else ``None``) publishes the next snapshot every refresh interval.

    Batches are formed in the sampler (:func:`acp_data.d2.batching.build_batch_sampler`): ``batch_composition``
    ``stream`` or ``exact``, grouped by aspect when ``aspect_ratio_grouping``; detectron2 then batches the flat
    stream as it comes (its own grouping off), so the batches do not depend on ``num_workers``.
    """
    from detectron2.data import DatasetFromList, build_detection_train_loader

    real = DatasetFromList(dataset, copy=False) if isinstance(dataset, list) else dataset
    if total_batch_size % sampler.world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH = {total_batch_size} is not divisible by the world size "
                         f"{sampler.world_size}")
    batches = build_batch_sampler(sampler, composition=batch_composition,
                                  batch_size=total_batch_size // sampler.world_size,
                                  real_groups=real_aspect_groups(dataset if isinstance(dataset, list) else real)
                                  if aspect_ratio_grouping else None)
    mixed = MixedDataset(real, synthetic, mapper, batches, sampler.seed if seed is None else seed)
    loader = build_detection_train_loader(dataset=mixed, sampler=batches, mapper=None,
                                          total_batch_size=total_batch_size, aspect_ratio_grouping=False,
                                          num_workers=num_workers)
    if online:
        from .online import OnlineLoader

        return OnlineLoader(loader, publisher)
    return loader


def _summarise(cfg: Any, real_dicts: list, real_cats: ImageCategories, synth: Any, freq: dict[int, str],
               sampler: MixSampler, thresh: float, rsqrt: bool, mix: MixMode, paste_source: Any) -> dict:
    """The content of ``acp_run.json``: what the run will see."""
    from ..cache.select_report import selection_report

    a = cfg.ACP
    uses_images = mix.images
    real_inst: dict[int, int] = {}
    for d in real_dicts:
        for ann in d.get("annotations", ()):
            real_inst[int(ann["category_id"])] = real_inst.get(int(ann["category_id"]), 0) + 1
    syn_ids = np.asarray(synth.result.inst_category_id, np.int64) - 1
    syn_inst = {int(c): int(n) for c, n in zip(*np.unique(syn_ids, return_counts=True))} if uses_images else {}
    out: dict[str, Any] = {
        "mask_format": cfg.INPUT.MASK_FORMAT, "mix_mode": a.MIX_MODE, "seed": int(cfg.SEED),
        "sampler": cfg.DATALOADER.SAMPLER_TRAIN, "repeat_threshold": thresh, "repeat_sqrt": rsqrt,
        "caches": [os.path.abspath(d) for d in a.CACHE_DIRS], "box": a.BOX,
        "selection": synth.selection.to_dict(), "selection_stats": dict(synth.result.stats),
        "selection_report": selection_report(synth.result, synth.categories, str(a.get("DROPPED_INSTANCES",
                                                                                      "background")),
                                             readers=synth.readers),
        "real_images": len(real_dicts), "synthetic_images": len(synth) if uses_images else 0,
        "real_instances_per_group": _instances_per_group(real_inst, freq),
        "synthetic_instances_per_group": _instances_per_group(syn_inst, freq),
        "total_batch_size": int(cfg.SOLVER.IMS_PER_BATCH), "world_size": sampler.world_size,
        "online": bool(a.ONLINE),
    }
    if mix.concat:
        desc = describe_concat_factors(real_cats, synth_pool(synth).categories, thresh, rsqrt, freq)
        out["concat_repeat_factors"] = desc
        out["effective_synthetic_fraction"] = desc["synthetic_fraction"]
    else:
        out["synth_ratio"] = mix.ratio
        out["synth_sampling"] = a.SYNTH_SAMPLING
        out["effective_synthetic_fraction"] = sampler.synthetic_fraction(100_000) if uses_images else 0.0
    if paste_source is not None:
        p = a.PASTE
        out["paste"] = {"prob": float(p.PROB), "max_instances": int(p.MAX_INSTANCES), "crops": len(paste_source),
                        "categories": len(paste_source.categories), "scale_from_priors": bool(p.SCALE_FROM_PRIORS),
                        "priors": a.PRIORS, "scale_range": list(p.SCALE_RANGE), "aspect_jitter": float(p.ASPECT_JITTER),
                        "min_visible_frac": float(p.MIN_VISIBLE_FRAC), "min_visible_pixels": int(p.MIN_VISIBLE_PIXELS),
                        "expected_pasted_per_image": float(p.PROB) * (1 + int(p.MAX_INSTANCES)) / 2.0}
    return out


def _record_synthetic_set(output_dir: str, synth: Any, mix: MixMode) -> dict[str, Any]:
    """Write ``acp_samples.npz`` (the exact samples the load-time selection kept, ``acp_data/d2/synthset.py``) into
    ``output_dir``, log its hash, and return the ``synthetic_set`` entry of ``acp_run.json``."""
    from .synthset import SAMPLES_FILE, SyntheticSet

    sset = SyntheticSet.from_dataset(synth)
    sset.write(output_dir)
    sha = sset.sha()
    used = "+".join(u for u, on in (("images", mix.images), ("paste", mix.paste)) if on) or "none"
    logger.info("ACP synthetic set: %d samples, %d instances, sha %s (used as %s; %s)", len(sset),
                len(sset.inst_local), sha, used, os.path.join(output_dir, SAMPLES_FILE))
    return {"file": SAMPLES_FILE, "sha": sha, "samples": len(sset), "instances": int(len(sset.inst_local)),
            "used_as": used}


def _log_summary(s: dict[str, Any]) -> None:
    logger.info("ACP data: mix mode %s, mask format %s, %d real images, %d synthetic images", s["mix_mode"],
                s["mask_format"], s["real_images"], s["synthetic_images"])
    logger.info("ACP data: instances per frequency group: real %s, synthetic %s", s["real_instances_per_group"],
                s["synthetic_instances_per_group"])
    logger.info("ACP data: effective synthetic fraction of the image stream: %.4f", s["effective_synthetic_fraction"])
    if "concat_repeat_factors" in s:
        d = s["concat_repeat_factors"]
        logger.info("ACP concat: synthetic images change the repeat factors (category factor means, real-only -> union):"
                    " %s; real images per epoch %.0f -> %.0f, synthetic %.0f",
                    {g: (round(v["real_only"], 3) if v["real_only"] is not None else None,
                         round(v["union"], 3) if v["union"] is not None else None)
                     for g, v in d["category_factor_mean"].items()},
                    d["real_images_per_epoch_real_only"], d["real_images_per_epoch_union"],
                    d["synthetic_images_per_epoch"])
    if "paste" in s:
        p = s["paste"]
        logger.info("ACP paste: %d cut-outs of %d categories, probability %.2f, up to %d per image", p["crops"],
                    p["categories"], p["prob"], p["max_instances"])
    logger.info("ACP data: selection %s", s["selection_stats"])


class PinnedSyntheticBuilder:
    """``shards -> SyntheticDataset`` of one online snapshot (a class, so it pickles into spawned workers)."""

    def __init__(self, cache_dirs: Sequence[str], selection: Any, box_mode: str):
        self.cache_dirs, self.selection, self.box_mode = list(cache_dirs), selection, box_mode

    def __call__(self, shards: tuple) -> Any:
        from .datasets import SyntheticDataset
        from .online import pinned_readers

        return SyntheticDataset(pinned_readers(self.cache_dirs, shards), self.selection, self.box_mode)


def _online_schedule(cfg: Any, selection: Any, synth: Any, rank: int, world: int) -> tuple[Any, Any, Any]:
    """Live (publishing) or replayed online schedule, its publisher (rank 0, live only) and the version lookup."""
    from detectron2.utils import comm

    from .online import (
        OnlinePublisher,
        OnlineSchedule,
        SnapshotStore,
        SyntheticVersions,
        list_closed_shards,
        new_run_dir,
        online_lag_iters,
    )

    a = cfg.ACP
    dirs = [os.path.abspath(d) for d in a.CACHE_DIRS]
    refresh = int(a.ONLINE_REFRESH_ITERS)
    lag = online_lag_iters(cfg.DATALOADER.NUM_WORKERS)
    total = int(cfg.SOLVER.IMS_PER_BATCH)

    versions = SyntheticVersions(PinnedSyntheticBuilder(dirs, selection, a.BOX), synth_pool)
    replay = _online_replay_dir(cfg)
    publisher = None
    if replay:
        store = SnapshotStore(replay)
        logger.info("ACP online: replaying the snapshots recorded in %s", replay)
    else:
        run_dir = str(new_run_dir(cfg.OUTPUT_DIR)) if rank == 0 else ""
        if world > 1:
            run_dir = comm.all_gather(run_dir)[0]
        store = SnapshotStore(run_dir)
        if rank == 0:
            publisher = OnlinePublisher(store, lambda: list_closed_shards(dirs), lambda sh: len(versions.get(sh)[1]),
                                        refresh_iters=refresh, lag_iters=lag, total_batch_size=total)
            publisher.publish(0)
    schedule = OnlineSchedule(store, versions, refresh_iters=refresh, lag_iters=lag, total_batch_size=total,
                              replay=bool(replay))
    return schedule, publisher, schedule.dataset
