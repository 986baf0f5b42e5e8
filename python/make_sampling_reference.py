#!/usr/bin/env python3
"""Exact next-token distributions for the sampler's statistical test (issue 15, item 9).

    .cache/venv/bin/python python/make_sampling_reference.py   # -> tests/fixtures/sampling/reference.json

For one committed set of logits and one token history, this computes, for each sampling setting,
the exact probability of every token, following the reference definitions rather than our
sampler's code (crates/corelm-runtime/src/sampler.rs). Only numpy is used; the output is fixed
(no randomness), so re-running reproduces the file byte for byte.

The reference, applied in this order (Hugging Face transformers, generation/utils.py
`_get_logits_processor`: the repetition processor comes before the warpers, and the warpers are
appended temperature, top-k, top-p, min-p; definitions from generation/logits_process.py):

1. RepetitionPenaltyLogitsProcessor: for each distinct token in the history, a logit < 0 is
   multiplied by the penalty, any other logit divided by it (applied once per token, whatever its
   count).
2. Frequency and presence penalties, as OpenAI defines them and llama.cpp applies them right after
   the repetition penalty (llama_sampler_penalties_apply):
   logit -= count * frequency + (count > 0) * presence.
3. Temperature 0 means greedy: the first maximal logit gets probability 1 (torch.argmax).
4. TemperatureLogitsWarper: logits / temperature.
5. TopKLogitsWarper: removes the logits strictly below the k-th largest, so every token tied
   with the k-th one is kept.
6. TopPLogitsWarper: sorts ascending, softmaxes, removes the tokens whose ascending cumulative
   probability is <= 1 - top_p, never the most likely one; i.e. it keeps the smallest set of most
   likely tokens whose probability reaches top_p (computed over what top-k left).
7. MinPLogitsWarper: softmax over what is left, removes the tokens whose probability is below
   min_p times the largest one.
8. The next token is drawn from the softmax of what survives.

The fixture is chosen so that no decision depends on an arbitrary choice or on float width: the
script refuses a setting where tied tokens straddle the top-p cut (torch.sort does not define
their order), or where a top-p or min-p comparison is within 1e-6 of its threshold (our sampler
takes f32 parameters and computes in f64; this script computes in f64 from the same values).
"""

import json
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "sampling" / "reference.json"

# Sixteen logits, exact in f32 (multiples of 1/8): a wide range (-8 .. 4), ties at 3.25 (0, 13),
# 2.75 (2, 4) and 1.5 (1, 7), and a zero (10).
LOGITS = [3.25, 1.5, 2.75, -0.5, 2.75, 0.875, -2.125, 1.5, 4.0, -5.0, 0.0, 2.125, -1.25, 3.25, 0.375, -8.0]

# Tokens already generated: a positive logit seen twice (8), one of a tied pair once (0, so the
# penalties break its tie with 13), a negative logit seen three times (3), the zero logit (10), the
# most negative token but one (9), and a small positive one (14).
HISTORY = [8, 3, 0, 8, 3, 10, 9, 3, 14]

NEUTRAL = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}

# (name, parameters differing from NEUTRAL). Every setting is sampled with the same history; those
# without penalties must ignore it.
SETTINGS = [
    ("temperature 1", {}),
    ("temperature 0.7", {"temperature": 0.7}),
    ("temperature 0.8", {"temperature": 0.8}),
    ("temperature 1.5", {"temperature": 1.5}),
    ("top-k 5", {"top_k": 5}),
    ("top-k 4, tie at the k-th", {"top_k": 4}),
    ("top-p 0.8", {"top_p": 0.8}),
    ("min-p 0.1", {"min_p": 0.1}),
    ("repetition 1.3", {"repetition_penalty": 1.3}),
    ("frequency 0.5", {"frequency_penalty": 0.5}),
    ("presence 0.8", {"presence_penalty": 0.8}),
    ("temperature 0.7 + top-k 5 + top-p 0.8", {"temperature": 0.7, "top_k": 5, "top_p": 0.8}),
    ("min-p 0.1 + temperature 1.5", {"temperature": 1.5, "min_p": 0.1}),
    # Top-p before min-p keeps token 11; min-p first (then top-p over the renormalized rest) drops it.
    ("temperature 1.5 + top-p 0.9 + min-p 0.2", {"temperature": 1.5, "top_p": 0.9, "min_p": 0.2}),
    (
        # The penalized token 8 (4.0 -> 1.277) just makes the cut, token 0 (3.25 -> 1.2) just misses it.
        "repetition 1.3 + frequency 0.5 + presence 0.8 + top-p 0.9",
        {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.8, "top_p": 0.9},
    ),
    (
        "repetition 1.3 + frequency 0.5 + temperature 1.5 + top-k 6",
        {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "temperature": 1.5, "top_k": 6},
    ),
    (
        "greedy after repetition 1.3 + frequency 0.5",
        {"temperature": 0.0, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
    ),
]

# Samples drawn under the first setting must be rejected against the second's distribution: the
# test's power to tell nearby distributions apart.
POWER_CHECKS = [
    ("temperature 0.7", "temperature 0.8"),
    ("repetition 1.3", "temperature 1"),
]

MARGIN = 1e-6


def softmax(scores):
    finite = np.isfinite(scores)
    out = np.zeros_like(scores)
    m = scores[finite].max()
    e = np.exp(scores[finite] - m)
    out[finite] = e / e.sum()
    return out


def penalize(scores, history, p):
    scores = scores.copy()
    tokens, counts = np.unique(np.array(history, dtype=np.int64), return_counts=True)
    if p["repetition_penalty"] != 1.0:
        s = scores[tokens]
        scores[tokens] = np.where(s < 0, s * p["repetition_penalty"], s / p["repetition_penalty"])
    scores[tokens] -= counts * p["frequency_penalty"] + (counts > 0) * p["presence_penalty"]
    return scores


def top_k(scores, k):
    k = min(k, scores.size)
    kth = np.sort(scores)[::-1][k - 1]
    return np.where(scores < kth, -np.inf, scores)


def top_p(scores, top_p, name):
    order = np.argsort(scores, kind="stable")  # ascending
    cumulative = np.cumsum(softmax(scores[order]))
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[-1] = False
    live = np.isfinite(scores[order])
    close = np.abs(cumulative[live] - (1 - top_p))
    assert close.min() > MARGIN, f"{name}: a top-p cumulative is within {MARGIN} of its threshold"
    remove = np.zeros(scores.size, dtype=bool)
    remove[order] = remove_sorted
    for value in np.unique(scores[np.isfinite(scores)]):
        tied = scores == value
        assert remove[tied].all() or not remove[tied].any(), f"{name}: tied tokens straddle the top-p cut"
    return np.where(remove, -np.inf, scores)


def min_p(scores, min_p, name):
    probs = softmax(scores)
    ratio = probs / probs.max()
    live = np.isfinite(scores)
    assert np.abs(ratio[live] - min_p).min() > MARGIN, f"{name}: a min-p ratio is within {MARGIN} of min_p"
    remove = probs < min_p * probs.max()
    remove[np.argmax(probs)] = False
    return np.where(remove, -np.inf, scores)


def distribution(name, p):
    scores = np.array(LOGITS, dtype=np.float32).astype(np.float64)
    scores = penalize(scores, HISTORY, p)
    if p["temperature"] == 0:
        best = np.flatnonzero(scores == scores.max())
        assert best.size == 1, f"{name}: greedy has a tie at the top"
        out = np.zeros_like(scores)
        out[best[0]] = 1.0
        return out
    scores = scores / p["temperature"]
    if p["top_k"] > 0:
        scores = top_k(scores, p["top_k"])
    if p["top_p"] < 1.0:
        scores = top_p(scores, p["top_p"], name)
    if p["min_p"] > 0.0:
        scores = min_p(scores, p["min_p"], name)
    return softmax(scores)


def main():
    settings = []
    for name, changes in SETTINGS:
        params = {**NEUTRAL, **changes}
        probs = distribution(name, params)
        assert abs(probs.sum() - 1) < 1e-12
        settings.append({"name": name, "params": params, "probabilities": [float(x) for x in probs]})
    names = {s["name"] for s in settings}
    assert len(names) == len(settings)
    for sampled, expected in POWER_CHECKS:
        assert sampled in names and expected in names
    doc = {
        "about": "Written by python/make_sampling_reference.py, which documents the reference; do not edit.",
        "logits": LOGITS,
        "history": HISTORY,
        "settings": settings,
        "power_checks": [{"sampled": s, "expected": e} for s, e in POWER_CHECKS],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1)
    # One line per list of numbers.
    text = re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    OUT.write_text(text + "\n")
    for s in settings:
        kept = [i for i, q in enumerate(s["probabilities"]) if q > 0]
        print(f"{s['name']:60} kept {kept}")


if __name__ == "__main__":
    main()
