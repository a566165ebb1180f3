"""megatron-core's torch.compile fusions compile at their first call, not at import."""

import subprocess
import sys

import torch

from megatron_slm import _lazy_jit


def test_megatron_import_does_not_load_dynamo():
    code = (
        "import sys, megatron_slm, megatron.core.models.gpt\n"
        "from megatron.core import jit\n"
        "from megatron_slm._lazy_jit import lazy_compile\n"
        "assert jit.jit_fuser is lazy_compile, jit.jit_fuser\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_lazy_compile_compiles_once_at_first_call(monkeypatch):
    calls = []
    real = torch.compile

    def counting_compile(fn, **options):
        calls.append(options)
        return real(fn, **options)

    monkeypatch.setattr(torch, "compile", counting_compile)

    @_lazy_jit.lazy_compile(backend="eager")
    def gelu_times(x, y):
        return torch.nn.functional.gelu(x) * y

    assert calls == [] and gelu_times.__name__ == "gelu_times"
    x, y = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(gelu_times(x, y), torch.nn.functional.gelu(x) * y, rtol=0, atol=0)
    gelu_times(y, x)
    assert calls == [{"backend": "eager"}]
