"""Tests for tinytales.py: determinism, token budget, mechanical grammar checks, variety."""
import itertools
import re

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

import tinytales
from helpers import run_cli

FIRST_STORY = "Once upon a time, a helpful frog called Dan lived by a quiet pond."  # seed 0's, pinned


def first(n, seed=0):
    return list(itertools.islice(tinytales.generate_stories(10**9, seed), n))


@pytest.fixture(scope="module")
def gpt2(gpt2_tiktoken):
    """GPT-2's tokenizer built from its ranks by tiktoken alone, not by the kit's loader."""
    return tiktoken.Encoding(
        "gpt2", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=load_tiktoken_bpe(str(gpt2_tiktoken)), special_tokens={"<|endoftext|>": 50256})


def gpt2_counts(gpt2, stories) -> list[int]:
    return [len(ids) for ids in gpt2.encode_ordinary_batch(stories)]


@pytest.fixture(scope="module")
def stories():
    """About 200k tokens, shared by the budget, grammar and variety tests."""
    return list(tinytales.generate_stories(200_000, seed=0))


def test_same_seed_same_stories():
    assert first(50, seed=3) == first(50, seed=3)


def test_different_seed_different_stories():
    a, b = first(50, seed=0), first(50, seed=1)
    assert sum(x != y for x, y in zip(a, b)) >= 45


def test_story_does_not_depend_on_budget():
    # prepare_data may ask for a small and a large corpus; the small one must be a prefix of the large one
    small = list(tinytales.generate_stories(20_000, seed=5))
    assert small == first(len(small), seed=5)


def test_known_first_story_is_stable():
    # Pins the output, so a change to the word lists or to the random calls is a deliberate choice,
    # and a Python version that seeded Random differently would be caught.
    assert first(1)[0].startswith(FIRST_STORY)


def test_budget_is_met_in_real_gpt2_tokens(stories, gpt2):
    """The promise is about 200,000 GPT-2 tokens: measured, within the 3% the character estimate is good for."""
    assert abs(sum(gpt2_counts(gpt2, stories)) / 200_000 - 1) < 0.03
    # a plain word count agrees: simple English is about 1.3 GPT-2 tokens per word
    words = sum(len(s.split()) for s in stories)
    assert 0.8 * 200_000 < 1.33 * words < 1.2 * 200_000


def test_stops_at_the_first_story_that_reaches_the_budget(gpt2):
    """A budget of about ten stories, measured in GPT-2 tokens: one story more or less is 10%, beyond the 3%."""
    counts = gpt2_counts(gpt2, list(tinytales.generate_stories(2_000, seed=0)))
    assert sum(counts) > 0.97 * 2_000  # the last story reaches the budget...
    assert sum(counts[:-1]) < 1.03 * 2_000  # ...and the ones before it did not


def test_zero_budget_yields_nothing():
    assert list(tinytales.generate_stories(0)) == []


def test_estimate_matches_gpt2_tokenizer(stories, gpt2):
    sample = stories[:500]
    real = sum(gpt2_counts(gpt2, sample))
    estimate = sum(tinytales.estimate_tokens(s) for s in sample)
    assert abs(estimate / real - 1) < 0.05


def test_length_and_paragraphs(stories):
    for s in stories:
        assert 80 <= len(s.split()) <= 320, s
        paragraphs = s.split("\n\n")
        assert len(paragraphs) >= 4, s
        assert all(p and p == p.strip() and "\n" not in p for p in paragraphs), s


def test_capitals_and_punctuation(stories):
    for s in stories:
        for p in s.split("\n\n"):
            assert re.match(r'"?[A-Z]', p), p
            assert p[-1] in '.!?"', p
        assert s[-1] in ".!?", s
        # a new sentence after . ! ? starts with a capital, inside or outside quotes
        assert not re.search(r'[.!?] +"?[a-z]', s), s
        assert not re.search(r" [,.!?]|  |,,|\.\.|,\.", s), s


def test_quotes_balanced_and_closed_inside_paragraphs(stories):
    for s in stories:
        for p in s.split("\n\n"):
            assert p.count('"') % 2 == 0, p
            # every quotation ends with punctuation inside the quotes
            for quoted in re.findall(r'"([^"]*)"', p):
                assert quoted[-1] in ",.!?", p


def test_articles(stories):
    text = "\n".join(stories)
    assert not re.search(r"\b[Aa] [aeiouAEIOU]", text)
    assert not re.search(r"\b[Aa]n [^aeiouAEIOU]", text)


def test_no_unfilled_placeholders(stories):
    for s in stories:
        assert not re.search(r"[{}<>_\[\]]|None", s), s


def test_pronouns_follow_the_hero(stories):
    # the opening names the hero, then refers to them by one pronoun only
    for s in stories:
        opening = s.split("\n\n")[0]
        subjects = set(re.findall(r"\b(He|She|It)\b", opening))
        assert len(subjects) <= 1, opening


def test_variety(stories):
    firsts = {s.split(". ")[0] for s in stories[:1000]}
    assert len(firsts) >= 800
    assert len(set(stories)) == len(stories)
    words = {w.lower() for w in re.findall(r"[A-Za-z']+", "\n".join(stories))}
    assert 600 <= len(words) <= 3000


def test_every_arc_appears(stories):
    # each arc has a sentence no other arc uses
    markers = ["Where is my", "but it is too high", "was afraid of", "Don't give up", "Why not take turns",
               "you poor thing", "Where are you going", "too shy to say hello", "birthday"]
    assert len(markers) == len(tinytales.ARCS)
    for m in markers:
        assert sum(m in s for s in stories) > 0.05 * len(stories) / len(markers), m


def test_cli_prints_stories():
    result = run_cli("tinytales.py", "--num", 2, "--seed", 0)
    assert result.returncode == 0, result.stderr
    *printed, rest = result.stdout.split("\n\n---\n\n")
    assert len(printed) == 2 and rest == "" and printed[0] != printed[1]
    assert printed[0].startswith(FIRST_STORY) and all(s.startswith("Once upon a time") for s in printed)
    assert all(len(s.split("\n\n")) >= 4 for s in printed)  # whole stories, paragraphs kept
