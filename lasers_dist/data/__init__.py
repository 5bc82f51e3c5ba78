"""Sharded image data: `lasers-shard` writer, the resumable `ShardStream`, degradations."""

from .degrade import center_mask, degrade, inpainting_input, super_resolution_input
from .shard_writer import ShardOptions, write_builtin_photos, write_shards, write_split
from .index import CountWarning, ShardCounts, lookup_counts, sample_counts, shared_shard_lists
from .shards import expand_urls
from .sources import KINDS, detect_kind, read_source
from .stream import ShardStream

__all__ = [
    "KINDS",
    "CountWarning",
    "ShardCounts",
    "ShardOptions",
    "ShardStream",
    "center_mask",
    "degrade",
    "detect_kind",
    "expand_urls",
    "inpainting_input",
    "lookup_counts",
    "read_source",
    "sample_counts",
    "shared_shard_lists",
    "super_resolution_input",
    "write_builtin_photos",
    "write_shards",
    "write_split",
]
