"""Makes ``lm_eval --model megatron-slm`` work without importing megatron-slm at start-up.

lm-eval 0.4 finds models only in its own registry and has no plugin entry points. The
``megatron_slm_lm_eval.pth`` file that megatron-slm installs imports this (tiny, dependency-free)
module at interpreter start; it waits for ``lm_eval.api.registry`` to be imported, then wraps its
``get_model`` so that the name ``megatron-slm`` resolves to a lazy placeholder for
``megatron_slm.evaluation.lm_eval_model:MegatronSLMLM``. Nothing else changes: every other model
name goes to lm-eval untouched, and torch/megatron are imported only when the model is asked for.
"""

import importlib.abc
import importlib.util
import sys

MODEL_NAME = "megatron-slm"
TARGET = "megatron_slm.evaluation.lm_eval_model:MegatronSLMLM"
_MODULE = "lm_eval.api.registry"


def patch_registry(registry) -> None:
    original = registry.get_model
    if getattr(original, "_megatron_slm", False):
        return

    def get_model(model_name):
        if model_name == MODEL_NAME and model_name not in registry.model_registry:
            if len(registry.model_registry) == 0:
                import lm_eval.models  # noqa: F401 - lm-eval's own models first, as it would
            registry.model_registry.register(MODEL_NAME, target=TARGET)
        return original(model_name)

    get_model._megatron_slm = True
    registry.get_model = get_model


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # find the real module once, without recursing into us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_registry(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if _MODULE in sys.modules:
        patch_registry(sys.modules[_MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
