"""``run_bench``: load the model, measure both engines, print and write the record."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from hexin import cpu
from hexin.bench.llamacpp import LlamaCpp, llama_cpp_version
from hexin.bench.measure import Neighbours, measure_all
from hexin.bench.progress import say
from hexin.bench.report import command_line, format_table, machine_info, ratios_of, write_record
from hexin.options import model_options
from hexin.threads import run_isolated


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, print the table to stdout, write the JSON record (and plot) into
    ``args.out``; return the record."""
    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    watch = Neighbours()
    say(f"loading {args.model or 'the default model'} ...")

    def load() -> tuple[Any, Any]:
        from hexin.model import load_llama

        return load_llama(args.model, model_options(args))

    loaded, model = run_isolated(load)
    cfg = loaded.config
    version = llama_cpp_version()
    is_gguf = loaded.path.is_file()
    skipped = ""
    if args.no_llama_cpp:
        skipped = "skipped (--no-llama-cpp)"
    elif version is None:
        skipped = "skipped (llama-cpp-python is not installed)"
    elif not is_gguf:
        skipped = "skipped (the model is not a GGUF file)"
    if skipped:
        say(f"llama.cpp {skipped}")
    lc = None if skipped else run_isolated(lambda: LlamaCpp(loaded.path, args.threads))
    try:
        hexin, llama = measure_all(args, loaded, model, lc)
    finally:
        if lc is not None:
            lc.close()

    record: dict[str, Any] = {
        "benchmark": "hexin bench",
        "date": date,
        "command": command_line(args),
        "argv": sys.argv,
        "config": {
            "streams": args.streams,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "pp": args.pp,
            "tg": args.tg,
            "threads": args.threads,
            "repeats": args.repeats,
            "quiet_wait": args.quiet_wait,
        },
        "model": {
            "name": loaded.name,
            "path": str(loaded.path),
            "file_bytes": loaded.path.stat().st_size if is_gguf else None,
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "quant": model.quant,
            "decode_weight_bytes": model.weight_bytes,
        },
        "machine": {
            **machine_info(),
            "kernels": cpu.report(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "neighbour_cores": watch.cores(),
        },
        "versions": {
            "hexin": _hexin_version(),
            "torch": torch.__version__,
            "llama_cpp": version,
        },
        "hexin": hexin,
        "llama_cpp": llama,
        "ratios": ratios_of(hexin, llama),
    }
    if skipped:
        record["llama_cpp_skipped"] = skipped
    files = write_record(record, Path(args.out))
    print(format_table(record))
    for kind, path in files.items():
        say(f"wrote {kind}: {path}")
    return record


def _hexin_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hexin")
    except PackageNotFoundError:
        return "unknown"
