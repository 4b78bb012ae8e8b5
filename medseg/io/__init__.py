"""Medical image I/O that keeps world geometry: one :class:`Volume` type, one format table (suffix -> reader/writer).

See :mod:`medseg.io.volume` for the conventions (channel-first arrays, RAS+ affines), :mod:`medseg.io.registry`
for the format table and :mod:`medseg.io.guard` for the size limit every reader applies before it allocates.
"""

from medseg.io.atomic import atomic_path
from medseg.io.guard import max_voxels, set_max_voxels
from medseg.io.registry import FORMATS, IMAGE_SUFFIXES, format_of, read_volume, split_suffix, write_volume
from medseg.io.volume import Volume

__all__ = ["Volume", "read_volume", "write_volume", "atomic_path", "FORMATS", "IMAGE_SUFFIXES", "split_suffix",
           "format_of", "max_voxels", "set_max_voxels"]
