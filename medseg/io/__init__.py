"""Medical image I/O that keeps world geometry: one :class:`Volume` type, one suffix -> reader/writer table.

See :mod:`medseg.io.volume` for the conventions (channel-first arrays, RAS+ affines).
"""

from medseg.io.atomic import atomic_path
from medseg.io.registry import read_volume, write_volume
from medseg.io.volume import Volume

__all__ = ["Volume", "read_volume", "write_volume", "atomic_path"]
