"""megatron-slm: data-efficient LLM pretraining on megatron-core.

Importing the package never needs a GPU or the compiled extension; see
:mod:`megatron_slm._extension` for how the optional ``_C`` module is found.
"""

# torch first: the compiled extension megatron_slm._C links against torch's shared libraries.
import torch  # noqa: F401

from megatron_slm import _lazy_jit

_lazy_jit.install()

__version__ = "0.1.0"
