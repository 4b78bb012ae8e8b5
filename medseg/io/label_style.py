"""How a label value is presented in a DICOM object: its name, display colour and coded concepts.

DICOM-SEG segments and RTSTRUCT ROIs both carry a name, a colour and (for SEG always, for RTSTRUCT optionally)
a coded concept of what the label is. :func:`label_styles` turns the plain data a run or a dataset.json holds into
one :class:`LabelStyle` per label value, so that both writers present a label the same way.

Inputs (all keyed by label value; ``str`` keys such as dataset.json's ``"1"`` are accepted):

* ``labels``: ``{1: "liver"}``;
* ``colors``: ``{1: [220, 40, 40]}`` (RGB, 0..255); missing values take a fixed palette colour;
* ``codes``: ``{1: {"type": ["10200004", "SCT", "Liver"], "category": ["123037004", "SCT", "Anatomical
  Structure"]}}``; each concept is ``[value, scheme designator, meaning]`` or ``{"value", "scheme", "meaning"}``.
  Missing values (or a missing category) take the generic concept SCT 85756007 "Tissue".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medseg.errors import ConfigError

__all__ = ["Concept", "LabelStyle", "label_styles", "GENERIC_CONCEPT", "PALETTE"]


@dataclass(frozen=True)
class Concept:
    """A coded concept (DICOM code sequence item).

    Attributes:
        value: CodeValue, e.g. ``"10200004"``.
        scheme: CodingSchemeDesignator, e.g. ``"SCT"``.
        meaning: CodeMeaning, e.g. ``"Liver"``.
    """

    value: str
    scheme: str
    meaning: str

    def as_pydicom(self):
        """This concept as a ``pydicom.sr.coding.Code`` (what highdicom takes)."""
        from pydicom.sr.coding import Code

        return Code(self.value, self.scheme, self.meaning)


#: SCT 85756007 "Tissue": the concept of a label nothing more specific is known about.
GENERIC_CONCEPT = Concept("85756007", "SCT", "Tissue")

#: Display colours (RGB) given to labels in value order when no colour is provided.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))


@dataclass(frozen=True)
class LabelStyle:
    """The presentation of one label value.

    Attributes:
        value: the label value in the mask (> 0).
        name: segment label / ROI name.
        color: RGB display colour, 0..255.
        category: coded category (SEG's SegmentedPropertyCategory).
        type: coded type (SEG's SegmentedPropertyType, RTSTRUCT's RT ROI Identification Code).
        coded: True when ``type`` came from the caller (not the generic concept).
    """

    value: int
    name: str
    color: tuple[int, int, int]
    category: Concept = GENERIC_CONCEPT
    type: Concept = GENERIC_CONCEPT
    coded: bool = False


def _concept(obj: Any, where: str) -> Concept:
    if isinstance(obj, Concept):
        return obj
    if isinstance(obj, Mapping) and {"value", "scheme", "meaning"} <= set(obj):
        return Concept(str(obj["value"]), str(obj["scheme"]), str(obj["meaning"]))
    if isinstance(obj, (list, tuple)) and len(obj) == 3:
        return Concept(*(str(v) for v in obj))
    raise ConfigError(where, obj, "[code value, scheme designator, meaning], e.g. ['10200004', 'SCT', 'Liver']")


def _color(obj: Any, where: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(v) for v in obj)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ConfigError(where, obj, "an RGB triple of integers 0..255, e.g. [220, 40, 40]")
    return rgb  # type: ignore[return-value]


def _by_value(mapping: Mapping | None, name: str) -> dict[int, Any]:
    out = {}
    for key, val in (mapping or {}).items():
        try:
            out[int(key)] = val
        except (TypeError, ValueError):
            raise ConfigError(name, key, "integer label values as keys") from None
    return out


def label_styles(labels: Mapping[int, str], colors: Mapping | None = None,
                 codes: Mapping | None = None) -> list[LabelStyle]:
    """One :class:`LabelStyle` per foreground label value, in increasing value order.

    Args:
        labels: label value -> name (value 0, the background, is skipped).
        colors: optional label value -> RGB (see the module docstring).
        codes: optional label value -> ``{"type": concept, "category": concept}``.

    Returns:
        The styles, sorted by value.

    Raises:
        ConfigError: a malformed colour or concept.
    """
    names = {k: str(v) for k, v in _by_value(labels, "labels").items() if k != 0}
    cols = _by_value(colors, "colors")
    cods = _by_value(codes, "codes")
    out = []
    for n, value in enumerate(sorted(names)):
        color = _color(cols[value], f"colors[{value}]") if value in cols else PALETTE[n % len(PALETTE)]
        entry = cods.get(value) or {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"codes[{value}]", entry, "{'type': [value, scheme, meaning], 'category': [...]}")
        ctype = _concept(entry["type"], f"codes[{value}].type") if "type" in entry else GENERIC_CONCEPT
        cat = _concept(entry["category"], f"codes[{value}].category") if "category" in entry else GENERIC_CONCEPT
        out.append(LabelStyle(value, names[value], color, cat, ctype, "type" in entry))
    return out
