"""Single-stream decode speed: hexin's fp32 path against transformers' ``generate`` on the
same (dequantized) weights, side by side in one run.

    python benchmarks/decode_vs_transformers.py [--model M] [--tokens 128] [--repeats 3]

Writes a JSON record to benchmarks/results/. Needs transformers (a test dependency).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hexin.generate import TextStream
from hexin.model import Llama
from hexin.sampling import SamplingParams
from hexin.weights import load_model

PROMPT = (
    "<|im_start|>user\nTell me a long story about a lighthouse keeper.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_reference import hf_model_from  # the same weight hand-over the tests use

    loaded = load_model(args.model)
    ids = loaded.tokenizer.encode(PROMPT)
    ours = Llama(loaded.config, loaded.weights)
    hf = hf_model_from(loaded)
    no_eos = SamplingParams(temperature=0, max_tokens=args.tokens)
    ours_tps, hf_tps = [], []
    for _ in range(args.repeats):
        c = TextStream(ours, loaded.tokenizer, ids, no_eos).run()
        ours_tps.append(c.completion_tokens / (c.ttft_s + c.decode_s))
        with torch.no_grad():
            start = time.perf_counter()
            out = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=0,
            )
            elapsed = time.perf_counter() - start
        hf_tps.append((out.shape[1] - len(ids)) / elapsed)
        print(f"hexin {ours_tps[-1]:6.1f} tok/s   transformers {hf_tps[-1]:6.1f} tok/s")
    record = {
        "benchmark": "single-stream generation incl. prefill, fp32, greedy",
        "model": str(loaded.path),
        "new_tokens": args.tokens,
        "hexin_tok_s": max(ours_tps),
        "transformers_tok_s": max(hf_tps),
        "ratio": max(ours_tps) / max(hf_tps),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(record, indent=2))
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "decode_vs_transformers.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
