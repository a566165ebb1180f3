"""Settings of ``tools/prox_refine.py`` (the CLI is generated from these by ``megatron_slm.cli``).

``RunConfig`` is shared by both modes; ``ApplyConfig`` adds the programs file of ``apply`` mode,
``ModelConfig`` the refining models of model mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.errors import ConfigError
from megatron_slm.refine.chunking import DEFAULT_LINE_PREFIX
from megatron_slm.refine.executor import SEMANTICS, AcceptanceRule
from megatron_slm.remote_code import RemoteCodeArgs

STAGES = ("doc", "chunk")


@dataclass
class RunConfig:
    input: list[str] = arg(
        [], "JSONL files or globs; one input file = one output shard.", required=True
    )
    output_dir: str = arg(
        None, "Directory of the refined shards, dropped/, stats.json.", required=True
    )
    text_key: str = arg("text", "JSON key of the document text.")
    shard_index: int = arg(0, "This job's index among --num-shards jobs (SLURM array).")
    num_shards: int = arg(
        1,
        "Independent jobs sharing the input files (SLURM array size); "
        "ranks of a torchrun/srun job split each job's part further.",
    )
    drop_ratio: float = arg(
        0.05,
        "Drop when words after / words before <= this and the program "
        "has fewer than --max-errors errors.",
    )
    drop_words: int = arg(10, "Drop when the refined document has at most this many words.")
    max_errors: int = arg(
        2, "A chunk program with this many errors is ignored (the original text is kept)."
    )
    semantics: str = arg(
        "strict",
        "How programs are read and prompts built: strict (parsed as Python calls, every "
        "unusable line an error) or prox (the released ProX code's decisions, quirks included: "
        "to reproduce a ProX corpus with its released models). See docs/design.md.",
        choices=list(SEMANTICS),
    )

    def __post_init__(self):
        if not self.input:
            raise ConfigError("--input: give at least one JSONL file or glob")
        if self.num_shards < 1:
            raise ConfigError(f"--num-shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"--shard-index must be in [0, --num-shards {self.num_shards}), got "
                f"{self.shard_index}"
            )
        if not 0 <= self.drop_ratio < 1:
            raise ConfigError(f"--drop-ratio must be in [0, 1), got {self.drop_ratio}")
        if self.drop_words < 0:
            raise ConfigError(f"--drop-words must be >= 0, got {self.drop_words}")
        if self.max_errors < 1:
            raise ConfigError(f"--max-errors must be >= 1, got {self.max_errors}")

    @property
    def rule(self) -> AcceptanceRule:
        return AcceptanceRule(self.drop_ratio, self.drop_words, self.max_errors)


@dataclass
class ApplyConfig(RemoteCodeArgs):
    programs: str = arg(
        None,
        "JSONL of programs: {id, doc_program?, chunk_program?} per "
        "document, matched to the input documents by --id-key.",
        required=True,
    )
    id_key: str = arg("id", "JSON key identifying a document in the input and the programs.")
    tokenizer: str | None = arg(
        None,
        "Hugging Face tokenizer directory (or SentencePiece .model) to count tokens before "
        "and after in stats.json (default: words only).",
    )


@dataclass
class ModelConfig(RemoteCodeArgs):
    stage: str = arg("doc,chunk", "Stages to run: doc, chunk or doc,chunk.")
    doc_model: str | None = arg(None, "Document-level refining model (Hugging Face directory).")
    chunk_model: str | None = arg(None, "Chunk-level refining model (Hugging Face directory).")
    backend: str = arg(
        "transformers",
        "Generation backend: transformers (in process) or openai (an OpenAI-compatible server: "
        "vllm serve, SGLang, TGI, transformers serve; the scale path).",
        choices=["transformers", "openai"],
    )
    endpoint: str | None = arg(
        None, "openai backend: the server's base URL, e.g. http://localhost:8000/v1."
    )
    model: str | None = arg(
        None,
        "openai backend: the served model's name (default: the stage's --doc-model / "
        "--chunk-model path, the name `vllm serve DIR` gives it). The model directory still "
        "gives the tokenizer and chat template: prompts are rendered here.",
    )
    # 16 was best against a 2-core CPU transformers serve (benchmarks/RESULTS_prox_refine.md); a
    # GPU vllm serve batches hundreds (examples/prox_refine_vllm.sh: 256)
    concurrency: int = arg(32, "openai backend: requests in flight.")
    request_timeout: float = arg(600.0, "openai backend: seconds per request before a retry.")
    max_retries: int = arg(
        10, "openai backend: retries of a request (exponential backoff) before the run stops."
    )
    retry_backoff: float = arg(
        1.0, "openai backend: first retry delay in seconds; doubles per retry (jittered, <= 60)."
    )
    endpoint_allow_insecure_http: bool = arg(
        False, "openai backend: allow plain http:// to a non-loopback --endpoint."
    )
    doc_template: str = arg(
        "model",
        "Document-level prompt: the model's own chat template, or llama2 (Llama-2-chat's, as "
        "ProX's released code renders it with --token_template).",
        choices=["model", "llama2"],
    )
    device: str = arg("auto", "transformers backend device: auto, cpu, cuda, cuda:N.")
    dtype: str = arg(
        "auto",
        "Model dtype (auto: bfloat16 on GPU, float32 on CPU).",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    batch_size: int = arg(32, "Prompts per generate call (transformers backend).")
    window: int = arg(
        1024,
        "Documents read, generated and written together (the batching "
        "pool; outputs do not depend on ranks, only on this).",
    )
    doc_max_prompt_tokens: int = arg(
        2000,
        "Document-level prompt limit; the document is truncated to fit, never the chat template.",
    )
    chunk_max_tokens: int = arg(1500, "Tokens of numbered lines per chunk.")
    doc_max_new_tokens: int = arg(2000, "Generation limit of the document-level model.")
    chunk_max_new_tokens: int = arg(256, "Generation limit of the chunk-level model.")
    line_prefix: str = arg(
        DEFAULT_LINE_PREFIX,
        "Line-number prefix the chunk model sees (format with {i}; ProX's is [{i:03d}]).",
    )

    def __post_init__(self):
        stages = [s.strip() for s in self.stage.split(",") if s.strip()]
        if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
            raise ConfigError(f"--stage must be doc, chunk or doc,chunk, got {self.stage!r}")
        self.stage = ",".join(s for s in STAGES if s in stages)
        if "doc" in stages and not self.doc_model:
            raise ConfigError("--stage doc needs --doc-model")
        if "chunk" in stages and not self.chunk_model:
            raise ConfigError("--stage chunk needs --chunk-model")
        if self.backend == "openai":
            if not self.endpoint:
                raise ConfigError("--backend openai needs --endpoint URL")
            if "doc" in stages and "chunk" in stages and self.doc_model != self.chunk_model:
                raise ConfigError(
                    "--backend openai serves one model: with two different models run --stage doc "
                    "and --stage chunk as two runs, or give the same --doc-model/--chunk-model"
                )
        elif self.endpoint or self.model:
            raise ConfigError("--endpoint and --model are for --backend openai")
        for name in (
            "concurrency",
            "batch_size",
            "window",
            "doc_max_prompt_tokens",
            "chunk_max_tokens",
            "doc_max_new_tokens",
            "chunk_max_new_tokens",
        ):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be >= 0, got {self.max_retries}")
        if not self.retry_backoff >= 0:
            raise ConfigError(f"--retry-backoff must be >= 0, got {self.retry_backoff}")
        if not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be > 0, got {self.request_timeout}")
        try:
            self.line_prefix.format(i=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"--line-prefix {self.line_prefix!r} is not a format with {{i}} ({e})"
            ) from None
        if self.line_prefix.format(i=0) == self.line_prefix.format(i=1):
            raise ConfigError(f"--line-prefix {self.line_prefix!r} does not contain {{i}}")

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.stage.split(","))
