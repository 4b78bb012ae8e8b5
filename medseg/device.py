"""What the machine offers: native bf16 on the CPU (decides the ``auto`` mixed-precision mode)."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["cpu_has_bf16"]


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
