"""Optional compiled extension ``megatron_slm._C``.

The extension holds the C++ (and, when built with CUDA, the CUDA) kernels. Everything in the package
has a pure-PyTorch fallback, so a missing extension is logged once and never an import error.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("megatron_slm")

try:
    from megatron_slm import _C  # noqa: F401

    HAS_C = True
    HAS_CUDA_KERNELS = bool(getattr(_C, "WITH_CUDA", False))
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (MEGATRON_SLM_BUILD_EXT=0) or built for another torch
    _C = None
    HAS_C = False
    HAS_CUDA_KERNELS = False
    _IMPORT_ERROR = exc

_reported = False


def report_once() -> None:
    """Log, once per process, which kernels are in use."""
    global _reported
    if _reported:
        return
    _reported = True
    if HAS_C:
        kind = "C++ and CUDA" if HAS_CUDA_KERNELS else "C++ (no CUDA kernels)"
        logger.info("megatron_slm._C loaded: %s kernels", kind)
    else:
        logger.warning(
            "megatron_slm._C is not available (%s); using pure-PyTorch fallbacks", _IMPORT_ERROR
        )


def extension_status() -> str:
    """One line describing the extension (scripts/setup.sh and the benchmarks print it)."""
    if HAS_C:
        return "megatron_slm._C: " + ("C++ + CUDA" if HAS_CUDA_KERNELS else "C++ only")
    return f"megatron_slm._C: not available, pure-PyTorch fallback ({_IMPORT_ERROR})"
