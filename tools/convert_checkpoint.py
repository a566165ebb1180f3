"""Convert Hugging Face Llama/Mistral checkpoints to megatron-core distributed checkpoints and back.

    # HF directory (config.json + safetensors or .bin + tokenizer files) -> megatron, for TP=2 PP=1
    python tools/convert_checkpoint.py hf-to-megatron --load /models/TinyLlama-1.1B \\
        --save ckpt/tinyllama --tensor-model-parallel-size 2 --make-vocab-size-divisible-by 128

    # megatron checkpoint (root or iter_N directory, any TP/PP) -> HF directory
    python tools/convert_checkpoint.py megatron-to-hf --load ckpt/run --save hf/run \\
        --max-shard-size 5GB --dtype bfloat16

The direction can also be given as ``--direction hf-to-megatron|megatron-to-hf``.

hf-to-megatron runs in one process (the usual way: the checkpoint is written for the target TP/PP,
whose only layout-dependent part is the padded vocabulary) or under torchrun with
TP x PP processes (each rank builds and fills its own shards). megatron-to-hf runs in one process
(megatron-core reshards the checkpoint to TP=1/PP=1 on load).
"""

import argparse
import logging
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.convert.hf import (  # noqa: E402
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)

DIRECTIONS = ("hf-to-megatron", "megatron-to-hf")


def get_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("direction_pos", nargs="?", choices=DIRECTIONS, metavar="DIRECTION")
    p.add_argument("--direction", choices=DIRECTIONS, default=None)
    p.add_argument("--load", required=True, help="source directory")
    p.add_argument("--save", required=True, help="destination directory")
    g = p.add_argument_group("hf-to-megatron")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument(
        "--params-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
        help="dtype of the megatron parameters",
    )
    g = p.add_argument_group("megatron-to-hf")
    g.add_argument(
        "--architecture",
        default=None,
        choices=("LlamaForCausalLM", "MistralForCausalLM"),
        help="default: the imported model's, else LlamaForCausalLM",
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
        help="dtype of the safetensors (default: the checkpoint's)",
    )
    g.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="HF tokenizer directory to copy (default: the checkpoint's)",
    )
    args = p.parse_args(argv)
    args.direction = args.direction or args.direction_pos
    if args.direction is None:
        p.error("give the direction: hf-to-megatron or megatron-to-hf")
    if args.direction_pos and args.direction_pos != args.direction:
        p.error("the positional direction and --direction disagree")
    return args


def main(argv=None) -> int:
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = get_args(argv)
    owns_process_group = not dist.is_initialized()  # else a caller's (tests) stays up
    try:
        if args.direction == "hf-to-megatron":
            result = convert_hf_to_megatron(
                args.load,
                args.save,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                params_dtype=args.params_dtype,
            )
            print(f"wrote {result.checkpoint} (padded vocabulary {result.padded_vocab_size})")
        else:
            out = convert_megatron_to_hf(
                args.load,
                args.save,
                architecture_name=args.architecture,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                tokenizer_model=args.tokenizer_model,
            )
            print(f"wrote {out}")
    except (ConversionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if owns_process_group:
            from megatron_slm.launch import shutdown

            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
