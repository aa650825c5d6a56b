"""GPU decode throughput of hexin's engine on random-weight models of real shapes.

Real weights of these models do not travel to the GPU machine, and decode speed does not
depend on the values, only on the shapes, so each model is built with random bf16 weights
(and a word-level tokenizer with no end-of-sequence token, so every request runs its full
budget). For each shape it measures, through the serving engine:

- single-stream decode, with CUDA graphs and without (eager);
- aggregate decode tok/s with 1, 8, 32, 256 concurrent sequences (graphs on).

Usage (on a CUDA machine): ``python benchmarks/gpu_decode.py --out results.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tokenizers
import torch

from hexin.bench.measure import timed_streams
from hexin.config import ModelConfig, RopeScaling
from hexin.engine import Engine
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.tokenizer import Tokenizer

SHAPES = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
}


def random_weights(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * 0.02

    w = {"model.embed_tokens.weight": mat(c.vocab_size, c.hidden_size)}
    w["model.norm.weight"] = torch.ones(c.hidden_size)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": torch.ones(c.hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(c.hidden_size),
            p + "self_attn.q_proj.weight": mat(q, c.hidden_size),
            p + "self_attn.k_proj.weight": mat(kv, c.hidden_size),
            p + "self_attn.v_proj.weight": mat(kv, c.hidden_size),
            p + "self_attn.o_proj.weight": mat(c.hidden_size, q),
            p + "mlp.gate_proj.weight": mat(c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": mat(c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": mat(c.hidden_size, c.intermediate_size),
        }
    return w


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i is the word "t<i>"; no EOS, so generation always runs to max_tokens."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(inner, bos_token_id=None, eos_token_ids=(), add_bos=False)


def measure(
    engine: Engine, streams: int, prompt_tokens: int, new_tokens: int, seed: int = 0
) -> dict[str, float | int]:
    """``streams`` random prompts at once through ``hexin bench``'s own measurement."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    prompts = [
        torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(streams)
    ]
    return timed_streams(engine, prompts, new_tokens, warm=prompts[0][:8])


def bench_shape(name: str, args: argparse.Namespace) -> dict[str, object]:
    config = SHAPES[name]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = Llama(config, random_weights(config), dtype=dtype, device=args.device)
    tok = word_tokenizer(config.vocab_size)
    out: dict[str, object] = {"shape": name}
    kw = {"kv_memory": args.kv_memory << 30, "max_running": 512, "prefill_chunk": 8192}
    for graphs in (False, True) if model.device.type == "cuda" else (False,):
        with Engine(model, tok, EngineConfig(cuda_graphs=graphs, **kw)) as engine:
            measure(engine, 1, args.prompt_tokens, 16)  # warm-up (graph capture)
            one = measure(engine, 1, args.prompt_tokens, args.new_tokens)
            out["single_stream_" + ("graphs" if graphs else "eager")] = one
            print(
                f"{name} single stream, graphs={graphs}: {one['decode_tok_s']:.0f} tok/s",
                flush=True,
            )
            if graphs or model.device.type != "cuda":
                rows = []
                for streams in args.streams:
                    measure(engine, streams, args.prompt_tokens, 8)  # capture this bucket
                    r = measure(engine, streams, args.prompt_tokens, args.new_tokens)
                    print(
                        f"{name} {streams} streams: decode {r['decode_tok_s']:.0f} tok/s, "
                        f"end to end {r['e2e_tok_s']:.0f} tok/s",
                        flush=True,
                    )
                    rows.append(r)
                out["streams"] = rows
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--streams", default="1,8,32,256")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--kv-memory", type=int, default=16, help="GiB")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = p.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 1
    record = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "results": [bench_shape(s, args) for s in args.shapes.split(",")],
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
