"""SamplingParams validation and the Sampler: greedy cases, seeding, top-k, top-p, min-p and
the distribution it draws from; logit bias, penalties and log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from hexin.sampling import InvalidParams, Sampler, SamplingParams, token_logprob


def _draws(params, logits, n):
    sampler = Sampler(params)
    return [sampler(logits) for _ in range(n)]


def _random_logits(seed, vocab=50):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


# -- greedy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, top_k=None, top_p=1.0, seed=1),
        SamplingParams(temperature=0, top_k=40, top_p=0.95, seed=1),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1),
        SamplingParams(temperature=1.0, top_k=1, top_p=1.0, seed=1),
        SamplingParams(temperature=1.5, top_k=None, top_p=0.0, seed=1),
        SamplingParams(temperature=1.5, top_k=40, top_p=0, seed=1),
    ],
    ids=["temp0", "temp0-int", "top_k0", "top_k1", "top_p0", "top_p0-int"],
)
def test_greedy_settings_always_pick_the_argmax(params):
    assert params.greedy
    sampler = Sampler(params)
    for seed in range(20):
        logits = _random_logits(seed)
        for _ in range(5):
            assert sampler(logits) == int(torch.argmax(logits))


def test_non_greedy_settings_are_not_greedy():
    assert not SamplingParams(temperature=0.7, top_k=2, top_p=0.01).greedy
    assert not SamplingParams(temperature=0.7, top_k=None, top_p=1.0).greedy


# -- seeding ----------------------------------------------------------------------------------

FLAT = torch.zeros(1000)
FREE = {"temperature": 1.0, "top_k": None, "top_p": 1.0}


def test_same_seed_gives_the_same_sequence_of_draws():
    params = SamplingParams(**FREE, seed=1234)
    first = _draws(params, FLAT, 50)
    assert first == _draws(params, FLAT, 50)
    assert len(set(first)) > 10, "a flat distribution over 1000 tokens should vary"


def test_different_seeds_give_different_draws_on_a_flat_distribution():
    a = _draws(SamplingParams(**FREE, seed=1), FLAT, 50)
    b = _draws(SamplingParams(**FREE, seed=2), FLAT, 50)
    assert a != b


def test_seed_none_draws_a_fresh_seed_per_sampler():
    params = SamplingParams(**FREE, seed=None)
    assert Sampler(params).seed != Sampler(params).seed
    draws = [_draws(params, FLAT, 20) for _ in range(3)]
    assert len({tuple(d) for d in draws}) > 1


def test_a_samplers_draws_do_not_depend_on_other_samplers_or_the_global_rng():
    params = SamplingParams(**FREE, seed=99)
    alone = _draws(params, FLAT, 30)
    mine, other = Sampler(params), Sampler(SamplingParams(**FREE, seed=5))
    interleaved = []
    for _ in range(30):
        torch.rand(7)  # global RNG traffic
        other(FLAT)
        interleaved.append(mine(FLAT))
    assert interleaved == alone


# -- top-k / top-p ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 7])
def test_top_k_only_draws_the_k_likeliest_tokens(k):
    # a shallow slope: without top-k every one of the 20 tokens would show up
    shuffle = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    logits = torch.linspace(0.0, 1.0, 20)[shuffle]
    likeliest = set(torch.topk(logits, k).indices.tolist())
    draws = _draws(SamplingParams(temperature=1.0, top_k=k, top_p=1.0, seed=3), logits, 2000)
    assert set(draws) == likeliest


def _logits_for(probs, order):
    """Logits whose softmax puts probs[i] on token order[i]."""
    logits = torch.full((len(order),), -math.inf)
    for p, token in zip(probs, order, strict=True):
        logits[token] = math.log(p)
    return logits


PROBS = [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]
ORDER = [4, 0, 5, 2, 1, 3]  # token ORDER[i] has probability PROBS[i]


@pytest.mark.parametrize(
    ("top_p", "nucleus_size"),
    [(0.4, 1), (0.75, 2), (0.85, 3), (0.93, 4), (0.99, 6)],
)
def test_top_p_only_draws_the_nucleus(top_p, nucleus_size):
    # the nucleus is the smallest head of the sorted distribution whose mass reaches top_p
    logits = _logits_for(PROBS, ORDER)
    params = SamplingParams(temperature=1.0, top_k=None, top_p=top_p, seed=4)
    draws = _draws(params, logits, 3000)
    assert set(draws) == set(ORDER[:nucleus_size])


@pytest.mark.parametrize("top_p", [1e-9, 1e-3, 0.2])
def test_tiny_top_p_still_keeps_the_most_likely_token(top_p):
    logits = _logits_for(PROBS, ORDER)
    params = SamplingParams(temperature=1.0, top_k=None, top_p=top_p, seed=5)
    assert set(_draws(params, logits, 200)) == {ORDER[0]}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # top-k keeps 0.4 and 0.3, renormalised to 4/7 and 3/7. A nucleus of 0.55 is reached by
    # the first token alone (4/7 > 0.55), as in transformers' top-k then top-p warpers.
    logits = _logits_for([0.4, 0.3, 0.2, 0.1], [0, 1, 2, 3])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.55, seed=6)
    assert set(_draws(params, logits, 300)) == {0}
    params = params.with_(top_p=0.6)  # now the second token is needed to reach the mass
    assert set(_draws(params, logits, 300)) == {0, 1}


# -- the distribution ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_frequencies_match_the_tempered_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    expected = torch.softmax(logits / temperature, dim=-1).tolist()
    n = 10_000
    params = SamplingParams(temperature=temperature, top_k=None, top_p=1.0, seed=7)
    draws = _draws(params, logits, n)
    counts = [draws.count(i) for i in range(len(expected))]
    for token, (count, p) in enumerate(zip(counts, expected, strict=True)):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(count / n - p) < 5 * sigma + 1e-4, (token, count / n, p)
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, expected, strict=True))
    assert chi2 < 25.0  # 5 degrees of freedom: p < 1e-4 of exceeding this by chance


def test_masked_tokens_are_never_drawn():
    logits = torch.tensor([0.0, -math.inf, 0.0, -math.inf])
    assert set(_draws(SamplingParams(**FREE, seed=8), logits, 500)) == {0, 2}


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": -0.1},
        {"temperature": -1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": "hot"},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"top_p": float("nan")},
        {"top_k": 2.5},
        {"top_k": "40"},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_tokens": 2.0},
        {"seed": "42"},
        {"seed": 4.2},
        {"seed": 2**64},  # past what a torch generator takes: refused before any use
        {"seed": -(2**63) - 1},
        {"min_p": 1.5},
        {"presence_penalty": 2.5},
        {"frequency_penalty": float("nan")},
        {"repetition_penalty": 0},
        {"logit_bias": {3: 101}},
        {"logit_bias": {-1: 1}},
        {"logit_bias": {"3": 1}},
        {"logprobs": 21},
        {"prompt_logprobs": -1},
    ],
    ids=repr,
)
def test_invalid_params_raise_invalid_params(changes):
    with pytest.raises(InvalidParams):
        SamplingParams(**changes)


def test_valid_edge_params_are_accepted():
    SamplingParams(temperature=0, top_k=None, top_p=0.0, max_tokens=1, seed=0)
    SamplingParams(temperature=5, top_k=0, top_p=1, max_tokens=100_000, seed=2**62)
    for seed in (2**64 - 1, -(2**63)):  # every seed accepted can seed a sampler
        Sampler(SamplingParams(seed=seed))


def test_a_tiny_temperature_picks_the_top_token_without_nan():
    logits = torch.tensor([1.0, 3.0, 2.0, -float("inf")])
    for temperature in (1e-40, 1.35e-234, 5e-324):  # below what fp32 holds, too
        for seed in range(5):
            params = SamplingParams(temperature=temperature, top_k=None, top_p=0.92, seed=seed)
            assert Sampler(params)(logits) == 1


def test_stop_strings_are_normalised_to_a_tuple_without_empty_strings():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=["a"]).to_dict()["stop"] == ["a"]


# -- changed logits, min-p, log-probabilities ----------------------------------------------


def test_logit_bias_excludes_and_forces_tokens():
    logits = torch.tensor([5.0, 1.0, 0.0, -1.0])
    assert Sampler(SamplingParams(temperature=0, logit_bias={0: -100}))(logits) == 1
    assert Sampler(SamplingParams(temperature=0, logit_bias={3: 100}))(logits) == 3
    params = SamplingParams(temperature=1, top_k=None, top_p=1, seed=3, logit_bias={0: -100})
    assert 0 not in _draws(params, logits, 200)


def test_frequency_and_presence_penalties_count_the_reply_only():
    logits = torch.tensor([2.0, 1.9, 0.0])
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=0.06), prompt_ids=[1, 1])
    # the prompt's tokens are not penalised; each pick of token 0 costs it 0.06
    assert [freq(logits) for _ in range(4)] == [0, 0, 1, 0]
    presence = Sampler(SamplingParams(temperature=0, presence_penalty=0.2))
    assert [presence(logits) for _ in range(3)] == [0, 1, 0]  # once seen, a flat -0.2


def test_repetition_penalty_counts_the_prompt_and_divides_or_multiplies():
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    sampler = Sampler(p, prompt_ids=[0, 2])
    changed = sampler.process(torch.tensor([4.0, 3.0, -1.0, 0.5]))
    assert changed.tolist() == [2.0, 3.0, -2.0, 0.5]
    assert sampler(torch.tensor([4.0, 3.0, -1.0, 0.5])) == 1


def test_min_p_drops_the_unlikely_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1, top_k=None, top_p=1, seed=0, min_p=0.35)
    assert set(_draws(params, logits, 300)) == {0, 1}  # 0.15 < 0.35 * 0.5


def test_unchanged_logits_are_not_copied():
    logits = torch.tensor([1.0, 2.0])
    assert Sampler(SamplingParams(temperature=0)).process(logits) is logits


def test_token_logprob_is_the_log_softmax():
    logits = _random_logits(4)
    entry = token_logprob(logits, 7, 3)
    expected = torch.log_softmax(logits, -1)
    assert entry.token == 7 and entry.logprob == pytest.approx(float(expected[7]))
    assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()
    assert token_logprob(logits, 7, 0).top == ()


def test_params_with_new_fields_survive_a_round_trip():
    p = SamplingParams(logit_bias={5: -100, 2: 3.5}, presence_penalty=0.5, min_p=0.1, logprobs=2)
    assert SamplingParams(**p.to_dict()) == p
    assert p.logit_bias == ((2, 3.5), (5, -100)) and p.changes_logits and not p.plain_greedy
