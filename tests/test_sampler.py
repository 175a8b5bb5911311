"""Sampling rules, checked on hand-made distributions."""

import pytest
import torch

from server.engine.request import SamplingParams
from server.engine.sampler import sample


def _draws(logits, params, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [sample(logits[None], [params], [gen])[0] for _ in range(n)]


def test_greedy_takes_the_argmax():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0)] * 3
    assert sample(logits, params, [None] * 3) == logits.argmax(-1).tolist()


def test_top_k_only_draws_from_the_k_most_likely():
    logits = torch.randn(40)
    top3 = set(torch.topk(logits, 3).indices.tolist())
    draws = _draws(logits, SamplingParams(temperature=5.0, top_k=3))
    assert set(draws) <= top3
    assert len(set(draws)) == 3  # a high temperature spreads over all three


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = _draws(probs.log(), SamplingParams(temperature=1.0, top_p=0.7))
    assert set(draws) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    share = draws.count(0) / len(draws)
    assert 0.5 < share < 0.75  # renormalised: 0.5 / 0.8 = 0.625


def test_same_seed_same_draws_other_seed_differs():
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.0)
    assert _draws(logits, params, 50, seed=7) == _draws(logits, params, 50, seed=7)
    assert _draws(logits, params, 50, seed=7) != _draws(logits, params, 50, seed=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_invalid_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
