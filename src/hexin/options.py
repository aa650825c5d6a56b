"""Run options shared by every command: which model, on what device, in what precision, and
how the serving engine is sized. Their names, choices and defaults live here once.

Nothing here imports torch, so the CLI can build its parser (``hexin --help``) and run
commands that never touch a tensor (``hexin models``) without paying for it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

#: ``--dtype`` choices; "auto" is float32 on a CPU and bfloat16 on a GPU
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: ``--quant`` choices: "none" keeps every matrix dense in the dtype; "int8" runs every
#: matrix as per-row int8; "q4" decodes with a GGUF file's Q4_0/Q4_1/Q4_K blocks as int4 (a
#: lossless regroup) and its other quantized matrices as 8-bit blocks, prompts in int8;
#: "auto" is "q4" for a CPU model from a quantized GGUF file and "none" otherwise.
#: Quantized modes run on a CPU.
QUANT_CHOICES = ("auto", "none", "int8", "q4")
#: ``--max-tokens-default``: the most tokens an OpenAI chat completion that names no
#: ``max_tokens`` generates (text completions default to 16, as OpenAI's do)
MAX_TOKENS_DEFAULT = 2048


@dataclass(frozen=True)
class ModelOptions:
    """Where and how a model runs, as ``hexin.model.load_llama`` takes them."""

    device: str = "auto"
    dtype: str = "auto"
    quant: str = "auto"
    #: the longest sequence the model will run (``--context``; LongRoPE picks its factors
    #: by it); None: the model's own
    context: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """How the serving engine is sized. One request's prompt is prefilled in chunks of
    ``prefill_chunk`` tokens per step, so a long prompt cannot stall everyone's decoding;
    ``max_waiting`` bounds the queue (beyond it a request is refused as busy)."""

    kv_memory: int = 1 << 30  # bytes of KV block pool
    block_size: int = 16  # tokens per KV block
    max_running: int = 64  # sequences decoded at once
    max_waiting: int = 256
    prefill_chunk: int = 512
    context_limit: int | None = None  # None: the model's own
    cuda_graphs: bool = True  # on a GPU, replay decode steps from CUDA graphs


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--quant``."""
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="model folder, .gguf file, registered name, or a hub repository ORG/NAME[:QUANT] "
        "(fetched on first use; default: smollm2-135m-instruct)",
    )
    p.add_argument(
        "--device",
        default=ModelOptions.device,
        help="cpu, cuda or cuda:N (default: cuda if present)",
    )
    p.add_argument(
        "--dtype",
        default=ModelOptions.dtype,
        choices=DTYPE_CHOICES,
        help="weights, activations and KV cache (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument(
        "--quant",
        default=ModelOptions.quant,
        choices=QUANT_CHOICES,
        help="q4: decode with a GGUF file's blocks (4-bit ones as int4, others as 8-bit "
        "blocks), prompts in int8; int8: every matrix int8; none: dense (default: q4 on CPU "
        "for quantized GGUF files, else none)",
    )


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        context=getattr(args, "context", None),
    )


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


DB_HELP = (
    "chat store: a SQLite file, or postgresql://user@host/db shared by replicas "
    "(default: $HEXIN_DB, else a SQLite file in the per-user data folder)"
)


def add_server_args(p: argparse.ArgumentParser, *, host_help: str) -> None:
    """What ``hexin serve`` and ``hexin cluster`` share: the model, where to listen, the
    chat store, the API key, the engine's sizes and CORS origins."""
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help=host_help)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    add_engine_args(p, serving=True)
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN")


def add_engine_args(p: argparse.ArgumentParser, *, serving: bool) -> None:
    """``--context`` always; the pool and batch sizes and the default reply cap
    (``serving``) for the server."""
    p.add_argument("--context", type=int, default=None, help="context limit in tokens")
    if serving:
        p.add_argument(
            "--max-running",
            type=int,
            default=EngineConfig.max_running,
            help="sequences decoded at once",
        )
        p.add_argument(
            "--kv-memory",
            type=parse_size,
            default=EngineConfig.kv_memory,
            help="KV pool, e.g. 1G",
        )
        p.add_argument(
            "--prefill-chunk",
            type=positive_int,
            default=EngineConfig.prefill_chunk,
            metavar="N",
            help="prompt tokens computed per engine step: smaller keeps other streams "
            f"smoother while a long prompt is read (default: {EngineConfig.prefill_chunk})",
        )
        p.add_argument(
            "--max-tokens-default",
            type=positive_int,
            default=MAX_TOKENS_DEFAULT,
            metavar="N",
            help="tokens an OpenAI chat completion without max_tokens may generate "
            f"(default: {MAX_TOKENS_DEFAULT})",
        )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine options given on the command line over the defaults."""
    given = {"context_limit": args.context}
    for name in ("max_running", "kv_memory", "prefill_chunk"):
        if hasattr(args, name):
            given[name] = getattr(args, name)
    return EngineConfig(**given)
