"""``hexin bench`` end to end on the tiny story model: every section measured, files written.

Only that the figures exist and are positive is checked: speed itself is never asserted in
tests, since these machines are shared and their timings are noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from hexin.bench import _parse_streams, add_bench_parser
from hexin.bench.run import run_bench


def _bench_args(argv: list[str]) -> argparse.Namespace:
    """Parse the way ``hexin`` will, through the subcommand parser the CLI registers."""
    parser = argparse.ArgumentParser(prog="hexin")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_bench_measures_every_section_and_writes_the_record(
    story_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = "--streams 1,2 --prompt-tokens 8 --new-tokens 4 --pp 16 --tg 4 --repeats 1"
    args = _bench_args(
        ["--model", str(story_dir), *flags.split(), "--no-llama-cpp", "--out", str(tmp_path)]
    )
    record = run_bench(args)

    hexin = record["hexin"]
    assert hexin["pp"]["tok_s"] > 0 and hexin["pp"]["tokens"] == 16
    assert hexin["tg"]["tok_s"] > 0 and hexin["tg"]["ttft_ms"] > 0 and hexin["tg"]["tpot_ms"] > 0
    assert [s["streams"] for s in hexin["streams"]] == [1, 2]
    for s in hexin["streams"]:
        # EOS is off: every stream generates its whole budget
        assert s["generated_tokens"] == 4 * s["streams"]
        assert s["decode_tokens"] == 3 * s["streams"]  # the first token comes from prefill
        assert s["decode_tok_s"] > 0 and s["e2e_tok_s"] > 0
    assert record["llama_cpp"] is None and record["ratios"] == {}
    assert "--no-llama-cpp" in record["command"]
    assert record["versions"]["torch"]

    saved = json.loads((tmp_path / "bench-latest.json").read_text())
    assert saved["hexin"] == json.loads(json.dumps(hexin))
    assert Path(saved["files"]["json"]).is_file()
    if "png" in saved["files"]:  # matplotlib is optional
        assert Path(saved["files"]["png"]).stat().st_size > 0
        assert (tmp_path / "bench-latest.png").is_file()
    out = capsys.readouterr().out
    assert "pp16" in out and "2 streams decode" in out


def test_bench_flags_refuse_bad_stream_lists() -> None:
    assert _parse_streams("32,1,8,8") == [1, 8, 32]
    for bad in ("", "0,2", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            _parse_streams(bad)
