"""medseg: 2D and 3D medical image segmentation.

Importing ``medseg`` has no side effects and does not import torch; the heavy parts load when used::

    from medseg.io import read_volume, write_volume, Volume
    from medseg.inference import Predictor
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
