import os

import pytest
import torch

# The multi-process tiers first: pytest-xdist (scripts/run_tests.sh: --dist loadfile with its
# reordering by test count off) hands whole files to the workers in this order, so the heavy
# files (trainers, torchrun, SLURM) start early and the many short unit files fill the end of
# both workers' time, instead of a heavy file with few tests running alone at the end.
_TIER_ORDER = {"functional": 0, "unit": 1, "gpu": 2}


def _tier(item) -> int:
    parts = os.path.relpath(str(item.fspath), os.path.dirname(__file__)).split(os.sep)
    return _TIER_ORDER.get(parts[0], 1)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_tier)  # (stable: each file's tests keep their order)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
