"""The on-disk synthetic sample cache: manifest, shards, columnar index, crop store."""
