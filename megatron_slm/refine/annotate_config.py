"""Settings of ``tools/prox_annotate.py`` (typed config, the CLI generated from it)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg, check_at_least
from megatron_slm.errors import ConfigError, UserError
from megatron_slm.refine.chunking import DEFAULT_LINE_PREFIX
from megatron_slm.refine.teachers import is_url
from megatron_slm.remote_code import RemoteCodeArgs


class AnnotateError(UserError):
    """Bad input or settings; the message names the flag or the file and line."""


@dataclass
class AnnotateConfig(RemoteCodeArgs):
    input: list[str] = arg([], "JSONL files or globs of documents.", required=True)
    stage: str = arg(None, "What the teacher annotates.", required=True, choices=["doc", "chunk"])
    teacher: str | None = arg(
        None,
        "OpenAI-compatible base URL (http://host:port/v1) or a local Hugging Face model directory "
        "(or give --programs).",
    )
    programs: str | None = arg(
        None,
        "Instead of a teacher: a JSONL of existing programs by document id, the file "
        "tools/prox_refine.py apply --programs reads ({id, doc_program, chunk_program}; chunk "
        "programs with document-wide line numbers, cut into one program per chunk).",
    )
    id_key: str = arg("id", "With --programs: JSON key identifying a document in both files.")
    output: str = arg(None, "Seeds JSONL ({'messages': [...]} per example).", required=True)
    teacher_model: str | None = arg(
        None, "Model name sent to an OpenAI-compatible endpoint (needed with a URL)."
    )
    api_key_env: str = arg(
        "OPENAI_API_KEY", "Environment variable holding the endpoint's API key (unset: no key)."
    )
    teacher_allow_insecure_http: bool = arg(
        False,
        "Allow plain http:// to a non-loopback teacher (the key and the answers travel "
        "unencrypted).",
    )
    tokenizer: str | None = arg(
        None,
        "The refining model's tokenizer (its Hugging Face directory, or the SentencePiece .model "
        "it will be trained with, read as tools/convert_checkpoint.py exports it): chunks (--stage "
        "chunk, required) and the document truncation are then exactly those of "
        "tools/prox_refine.py.",
    )
    prompts_dir: str | None = arg(
        None, "Directory of doc_edu.txt, doc_format.txt, chunk_program.txt (default: packaged)."
    )
    text_key: str = arg("text", "JSON key of the document text.")
    concurrency: int = arg(8, "Requests in flight (OpenAI-compatible teacher).")
    timeout: float = arg(120.0, "Seconds per request before it is retried.")
    max_retries: int = arg(8, "Retries of a request (exponential backoff) before the run stops.")
    backoff: float = arg(1.0, "First retry delay in seconds; doubles per retry (jittered).")
    max_new_tokens: int = arg(512, "Teacher answer length limit.")
    doc_max_prompt_tokens: int = arg(
        2000, "As tools/prox_refine.py: document-level prompt limit (with --tokenizer)."
    )
    chunk_max_tokens: int = arg(
        1500, "As tools/prox_refine.py: tokens of numbered lines per chunk."
    )
    line_prefix: str = arg(DEFAULT_LINE_PREFIX, "As tools/prox_refine.py: line-number prefix.")
    device: str = arg("auto", "Local teacher: auto, cpu, cuda, cuda:N.")
    dtype: str = arg(
        "auto", "Local teacher dtype.", choices=["auto", "float32", "bfloat16", "float16"]
    )
    batch_size: int = arg(8, "Local teacher: prompts per generate call.")

    def __post_init__(self):
        if not self.input:
            raise ConfigError("--input: give at least one JSONL file or glob")
        check_at_least(self, "concurrency", "max_new_tokens", "batch_size", "doc_max_prompt_tokens")
        if self.chunk_max_tokens < 1:
            raise ConfigError("--chunk-max-tokens must be >= 1")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.timeout <= 0 or self.backoff < 0:
            raise ConfigError("--timeout must be > 0 and --backoff >= 0")
        if (self.teacher is None) == (self.programs is None):
            raise ConfigError(
                "give exactly one of --teacher (a teacher LLM writes the answers) and --programs "
                "(a JSONL of existing programs)"
            )
        if self.teacher is not None and is_url(self.teacher) and not self.teacher_model:
            raise ConfigError("--teacher is a URL: give --teacher-model (the served model's name)")
        if self.stage == "chunk" and not self.tokenizer:
            raise ConfigError(
                "--stage chunk needs --tokenizer (the refining model's tokenizer: chunks are split "
                "by its token counts, as tools/prox_refine.py splits them)"
            )
