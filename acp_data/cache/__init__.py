"""The on-disk synthetic sample cache: manifest, shards, columnar index, crop store.

``manifest`` (created once, checked by every writer), ``writer`` (``CacheWriter``: shards + index generation 0),
``index`` (columns, generations, orphan re-indexing, ``done_keys``, the rescoring API), ``reader`` (``CacheReader``,
``open_caches``), ``selection`` (load-time ``SELECT``/thresholds, vectorised), ``crops`` (paste-mode cut-outs),
``verify``, ``export`` (LVIS json), ``inspect`` (HTML gallery). The format is described in ``docs/cache.md``.
"""
