"""Networks: one registry and factory, a dimension-generic U-Net with its variants, MONAI's U-Net++ and Swin-UNETR.

```python
from medseg.networks import create_model, list_models, model_spec, build_model
net = create_model("unet", spatial_dims=3, in_channels=1, out_channels=3, deep_supervision=True)
spec = model_spec(net)          # {"name": "unet", "kwargs": {...}} -> checkpoint / model.json
same = build_model(spec)        # rebuilds the architecture from the spec alone
isinstance(net, SegmentationNetwork)   # every create_model network: spatial_dims, channels, output_shape, ...
valid_crop(net, (96, 96, 96))   # voxels lost per side (all 0: same padding)
```
Importing this package imports torch and MONAI (``import medseg`` does not).
"""

from medseg.networks.contract import SegmentationNetwork, valid_crop
from medseg.networks.memory import count_parameters, estimate_memory, measure_peak_memory
from medseg.networks.registry import (
    ModelEntry,
    build_model,
    create_model,
    list_models,
    model_entry,
    model_spec,
    register_model,
    register_model_deprecations,
)
from medseg.networks.unet import UNet

__all__ = [
    "ModelEntry",
    "SegmentationNetwork",
    "UNet",
    "build_model",
    "count_parameters",
    "create_model",
    "estimate_memory",
    "list_models",
    "measure_peak_memory",
    "model_entry",
    "model_spec",
    "register_model",
    "register_model_deprecations",
    "valid_crop",
]
