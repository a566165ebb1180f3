"""Defer megatron-core's ``torch.compile`` fusions to their first call.

``megatron.core.jit.jit_fuser`` is ``torch.compile``, and megatron-core decorates a dozen fused
activations with it at import time. Decorating is enough to import TorchDynamo and Inductor:
about 3.5 s of CPU in every process (each rank, each tool), even when no fused function ever
runs (the CPU backend never calls them). :func:`install` swaps ``jit_fuser`` for a decorator that
calls the real ``torch.compile`` on the function's first call, which is when ``torch.compile``
compiles anyway: compiled code, options and speed are unchanged, only the import is lazy.

It hooks the import of ``megatron.core.jit`` (a one-shot meta-path finder), so it does nothing
if megatron-core was imported before ``megatron_slm``.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

import torch

_MODULE = "megatron.core.jit"


def lazy_compile(fn=None, **options):
    """``torch.compile`` as a decorator that compiles at the first call."""
    if fn is None:
        return functools.partial(lazy_compile, **options)
    compiled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not compiled:
            compiled.append(torch.compile(fn, **options))
        return compiled[0](*args, **kwargs)

    return call


class _JitFuserHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            if module.jit_fuser is torch.compile:
                module.jit_fuser = lazy_compile

        spec.loader.exec_module = exec_then_patch
        return spec


def install() -> None:
    """Hook ``megatron.core.jit`` unless it is already imported or hooked."""
    if _MODULE in sys.modules or any(isinstance(f, _JitFuserHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _JitFuserHook())
