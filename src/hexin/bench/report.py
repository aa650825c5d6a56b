"""The record of a ``hexin bench`` run: machine and command, ratios, the table printed
to stdout, the plot, and the files written."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from hexin.bench.progress import say


# -- the record ---------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Enough to tell two machines (or one machine in two moods) apart."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    # thread-pool settings change results a lot on a shared machine: record them
    env = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
    info["env"] = {name: os.environ[name] for name in env if name in os.environ}
    with contextlib.suppress(AttributeError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    return info


def command_line(args: argparse.Namespace) -> str:
    """The run as a command line someone can paste to repeat it."""
    parts = ["hexin", "bench"]
    if args.model is not None:
        parts += ["--model", str(args.model)]
    parts += ["--streams", ",".join(map(str, args.streams))]
    for flag in ("prompt_tokens", "new_tokens", "pp", "tg", "threads", "repeats", "quiet_wait"):
        parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.no_llama_cpp:
        parts.append("--no-llama-cpp")
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def ratios_of(hexin: dict[str, Any], llama: dict[str, Any] | None) -> dict[str, float]:
    if not llama:
        return {}
    out = {
        "pp": hexin["pp"]["tok_s"] / llama["pp"]["tok_s"],
        "tg": hexin["tg"]["tok_s"] / llama["tg"]["tok_s"],
    }
    for h, c in zip(hexin["streams"], llama["streams"], strict=True):
        out[f"decode_{h['streams']}"] = h["decode_tok_s"] / c["decode_tok_s"]
        out[f"e2e_{h['streams']}"] = h["e2e_tok_s"] / c["e2e_tok_s"]
    return out


def format_table(record: dict[str, Any]) -> str:
    """The run's figures side by side, one line per measurement, with the CPU the rest of
    the machine took meanwhile (the larger of the two engines' runs)."""
    cfg = record["config"]
    hexin, llama, ratios = record["hexin"], record.get("llama_cpp"), record["ratios"]
    # (label, section, index in streams, field, ratio key)
    specs: list[tuple[str, str, int | None, str, str | None]] = [
        (f"pp{cfg['pp']} tok/s", "pp", None, "tok_s", "pp"),
        (f"tg{cfg['tg']} tok/s", "tg", None, "tok_s", "tg"),
        ("  TTFT ms", "tg", None, "ttft_ms", None),
        ("  ms per output token", "tg", None, "tpot_ms", None),
    ]
    for i, h in enumerate(hexin["streams"]):
        n = h["streams"]
        specs.append((f"{n} streams decode tok/s", "streams", i, "decode_tok_s", f"decode_{n}"))
        specs.append((f"{n} streams end-to-end tok/s", "streams", i, "e2e_tok_s", f"e2e_{n}"))

    def pick(side: dict[str, Any] | None, section: str, i: int | None) -> dict[str, Any] | None:
        if not side:
            return None
        return side[section][i] if i is not None else side[section]

    lines = [
        f"hexin bench  {record['date']}  model {record['model']['name']}  "
        f"({record['model'].get('device', 'cpu')}, {record['model'].get('dtype', 'float32')}, "
        f"quant {record['model'].get('quant', 'none')})  threads {cfg['threads']}  "
        f"({cfg['prompt_tokens']} prompt + {cfg['new_tokens']} new tokens per stream)",
        f"{'':32}{'hexin':>10}{'llama.cpp':>11}{'ratio':>9}{'others busy':>13}",
    ]
    for label, section, i, field, key in specs:
        h, c = pick(hexin, section, i), pick(llama, section, i)
        assert h is not None
        theirs = f"{c[field]:11.1f}" if c else f"{'-':>11}"
        ratio = f"{ratios[key]:8.2f}x" if key and key in ratios else f"{'':>9}"
        busy = [r.get("neighbour_cores") for r in (h, c) if r]
        known = [b for b in busy if b is not None]
        # one note per measurement: TTFT and end-to-end rows share their run's
        shown = known and field in ("tok_s", "decode_tok_s")
        noise = f"{max(known):9.2f} cpu" if shown else ""
        lines.append(f"{label:32}{h[field]:10.1f}{theirs}{ratio}{noise}".rstrip())
    if not llama:
        lines.append(f"llama.cpp: {record.get('llama_cpp_skipped', 'not run')}")
    lines.append("ratio = hexin / llama.cpp; others busy = CPU cores used by other processes")
    return "\n".join(lines)


def _plot(record: dict[str, Any], path: Path) -> bool:
    """Aggregate decode tok/s against concurrency; False (with a notice) without
    matplotlib, which is an optional extra (``pip install hexin[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no plot (pip install 'hexin[bench]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("hexin", record["hexin"], "tab:blue")]
    if record.get("llama_cpp"):
        series.append(("llama.cpp", record["llama_cpp"], "tab:orange"))
    for label, data, colour in series:
        ns = [s["streams"] for s in data["streams"]]
        decode = [s["decode_tok_s"] for s in data["streams"]]
        e2e = [s["e2e_tok_s"] for s in data["streams"]]
        ax.plot(ns, decode, "o-", color=colour, label=f"{label} decode")
        ax.plot(ns, e2e, "s--", color=colour, alpha=0.6, label=f"{label} end to end")
    ax.set_xscale("log", base=2)
    ns = [s["streams"] for s in record["hexin"]["streams"]]
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    cfg = record["config"]
    ax.set_title(
        f"{record['model']['name']}: {cfg['prompt_tokens']} prompt + {cfg['new_tokens']} new "
        f"tokens per stream, {cfg['threads']} threads ({record['date'][:10]})",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_record(record: dict[str, Any], out: Path) -> dict[str, str]:
    """The dated record and plot, plus ``bench-latest`` copies for links that must not
    change."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(record["date"]).strftime("%Y%m%d-%H%M%S")
    json_path, png_path = out / f"bench-{stamp}.json", out / f"bench-{stamp}.png"
    files = {"json": str(json_path)}
    if _plot(record, png_path):
        shutil.copyfile(png_path, out / "bench-latest.png")
        files["png"] = str(png_path)
    record["files"] = files
    text = json.dumps(record, indent=2) + "\n"
    json_path.write_text(text)
    (out / "bench-latest.json").write_text(text)
    return files
