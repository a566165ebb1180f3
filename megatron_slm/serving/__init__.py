"""Text generation over HTTP from any checkpoint the runtime loads: Megatron-LM's ``/api``
protocol and OpenAI's ``/v1/completions`` (``tools/run_text_generation_server.py``)."""

from megatron_slm.serving.engine import run_job
from megatron_slm.serving.jobs import Completion, Job, RequestError
from megatron_slm.serving.server import serve

__all__ = ["Completion", "Job", "RequestError", "run_job", "serve"]
