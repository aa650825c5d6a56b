"""lm-evaluation-harness against a real ``hexin serve``, given no tokenizer so that it
finds the server's (``/tokenizer_info``, ``/tokenize``, ``/detokenize``): a multiple-choice
task scored by log-likelihood (``local-completions``: echo and logprobs) and a generation
task (``local-chat-completions``), both on the small datasets in tests/data/lm_eval."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from server_util import Server

DATA = Path(__file__).parent / "data" / "lm_eval"

MC_TASK = """
task: hexin_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """
task: hexin_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    srv = Server(default_gguf, tmp_path_factory.mktemp("lm_eval")).start()
    yield srv
    srv.stop()


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the data is local; no hub is reachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    for name, text in (("mc", MC_TASK), ("gen", GEN_TASK)):
        (tmp_path / f"{name}.yaml").write_text(text.format(data=DATA))
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tmp_path))


def test_multiple_choice_by_loglikelihood(server, tasks):
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model=m,num_concurrent=1",
        tasks=["hexin_tiny_mc"],
        task_manager=tasks,
    )
    result = out["results"]["hexin_tiny_mc"]
    assert len(out["samples"]["hexin_tiny_mc"]) == 10
    assert 0.5 <= result["acc,none"] <= 1.0  # well above the 0.25 of guessing
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    for route in ("/tokenizer_info", "/tokenize"):  # it found the server's tokenizer
        assert f'route="{route}",status="200"' in metrics, route


def test_generation_through_chat_completions(server, tasks):
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"base_url={server.url}/v1/chat/completions,model=m,num_concurrent=1",
        tasks=["hexin_tiny_gen"],
        task_manager=tasks,
        apply_chat_template=True,
    )
    result = out["results"]["hexin_tiny_gen"]
    assert len(out["samples"]["hexin_tiny_gen"]) == 5
    assert 0.0 <= result["exact_match,none"] <= 1.0
    replies = [s["resps"][0][0] for s in out["samples"]["hexin_tiny_gen"]]
    assert any("Paris" in r for r in replies), replies
