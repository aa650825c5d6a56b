"""Constrained decoding (``hexin.grammar``): masks, JSON closing near the budget, one
compile per grammar, clear errors, and a constrained request beside others in the engine."""

from __future__ import annotations

import json

import pytest
import torch

from hexin.engine import Engine
from hexin.grammar import Grammars, InvalidGrammar
from hexin.model import Llama
from hexin.sampling import SamplingParams


@pytest.fixture(scope="module")
def grammars(default_model):
    return Grammars(default_model.tokenizer)


def text_of(grammars: Grammars, constraint, logits_for, steps: int, budget: int = 10_000) -> str:
    """Greedy decoding under ``constraint`` with ``logits_for(step)`` as the model."""
    tok = grammars.tokenizer
    out = []
    for step in range(steps):
        allowed = constraint.mask(logits_for(step), tokens_left=budget - step)
        token = int(allowed.argmax())
        if token in tok.eos_token_ids:
            break
        constraint.accept(token)
        out.append(token)
    return tok.decode(out)


def test_a_regex_holds_the_reply(grammars):
    constraint = grammars.constraint("regex", "(yes|no)")
    vocab = grammars.tokenizer.vocab_size
    text = text_of(grammars, constraint, lambda _: torch.randn(vocab), 10)
    assert text in ("yes", "no")


def test_a_json_schema_reply_closes_before_its_budget(grammars):
    """A model that would go on forever inside a string: the schema's reply still ends,
    valid, within its budget."""
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["tags"],
        "additionalProperties": False,
    }
    tok = grammars.tokenizer
    loop = tok.encode("ab")[-1]  # a letter pair: a string that never ends by itself

    def model(step):
        logits = torch.zeros(tok.vocab_size)
        logits[loop] = 10.0
        return logits

    budget = 60  # past CLOSING_TOKENS: the reply runs free, then closes
    constraint = grammars.constraint("json_schema", json.dumps(schema))
    text = text_of(grammars, constraint, model, budget, budget)
    reply = json.loads(text)  # closed, though the model never ends a string itself
    assert isinstance(reply["tags"], list) and "abab" in reply["tags"][0]


def test_each_grammar_is_compiled_once(grammars):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    grammars.constraint("json_schema", schema)
    compiled = dict(grammars._compiled)
    grammars.constraint("json_schema", schema)
    assert grammars._compiled[("json_schema", schema)] is compiled[("json_schema", schema)]


@pytest.mark.parametrize(
    ("kind", "text", "param"),
    [
        ("json_schema", "{not json", "response_format"),
        ("json_schema", "[1, 2]", "response_format"),
        ("json_schema", '{"type": "nonsense"}', "response_format"),
        ("grammar", "root ::= (", "grammar"),
        ("regex", "(", "regex"),
    ],
)
def test_bad_grammars_are_clear_errors(grammars, kind, text, param):
    with pytest.raises(InvalidGrammar) as info:
        grammars.constraint(kind, text)
    assert info.value.param == param


def test_a_constrained_request_beside_others_in_the_engine(story_model):
    model, tok = Llama(story_model.config, story_model.weights), story_model.tokenizer
    plain = SamplingParams(temperature=0, max_tokens=12)
    held = plain.with_(grammar=("regex", " (red|green|blue)"))
    prompts = [tok.encode(p) for p in ("Once upon a time", "The little dog", "A big red ball")]
    with Engine(model, tok) as engine:
        alone = [engine.generate(ids, plain).token_ids for ids in prompts]
        handles = [engine.submit(prompts[0], held)] + [engine.submit(ids, plain) for ids in prompts]
        results = [h.result() for h in handles]
    assert results[0].text.strip() in ("red", "green", "blue") and results[0].stop_reason == "eos"
    assert [r.token_ids for r in results[1:]] == alone
