"""Data code: dataset sources, tiled pyramids, shard writing and reading, the lazy loader."""
