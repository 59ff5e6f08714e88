"""tokenizer.py: GPT-2's rank file, rank-file errors, and training a byte-level BPE that round-trips UTF-8."""
import base64
import json
import random
from pathlib import Path

import pytest
import tiktoken

from errors import UserError
from tokenizer import check_uint16, load_tokenizer, same_tokenizer, save_tokenizer, train_tokenizer

TRICKY = "Hello 😀 世界! naïve café\t\ttabs\r\nwindows\n\n\n   spaces   \u00a0nbsp 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ١٢٣ 'll've"


def corpus(n_docs=300, seed=0):
    """Varied text: made-up words, numbers, punctuation, whitespace runs, emoji and CJK."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mon", "sel", "ba", "qu", "ex", "é", "ø", "日本", "語", "😀"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(400)] + ["42", "1999", "'s"]
    seps = [" ", "  ", "\n", "\t", ", ", ". ", "\r\n"]
    return ["".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(5, 60))) for _ in range(n_docs)]


def write_ranks(path: Path, n_bytes=256, extra=()):
    tokens = [bytes([b]) for b in range(n_bytes)] + list(extra)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return path


def test_gpt2_rank_file_is_the_gpt2_encoding(gpt2_tiktoken):  # the fixture is in conftest.py
    enc = load_tokenizer(str(gpt2_tiktoken))
    assert enc.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.decode(enc.encode_ordinary(TRICKY)) == TRICKY


def test_rank_file_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read tokenizer"):
        load_tokenizer(str(tmp_path / "missing.tiktoken"))
    bad_line = tmp_path / "bad.tiktoken"
    bad_line.write_bytes(write_ranks(tmp_path / "ok.tiktoken").read_bytes() + b"not-base64!! 256\n")
    with pytest.raises(UserError, match=r"bad.tiktoken:257"):
        load_tokenizer(str(bad_line))
    with pytest.raises(UserError, match="all 256 single bytes"):
        load_tokenizer(str(write_ranks(tmp_path / "short.tiktoken", n_bytes=200)))


def test_sidecar_sets_pattern_and_special_tokens(tmp_path):
    path = write_ranks(tmp_path / "tok.tiktoken", extra=[b"ab"])
    assert load_tokenizer(str(path)).eot_token == 257  # no sidecar: right after the ranks
    (tmp_path / "tok.json").write_text(json.dumps({"pat_str": r"\S+|\s+", "special_tokens": {"<|endoftext|>": 300}}))
    enc = load_tokenizer(str(path))
    assert enc.eot_token == 300 and enc.n_vocab == 301
    for bad in ["{not json", json.dumps({"pat_str": "x"}), json.dumps({"pat_str": "x", "special_tokens": {"a": 1}}),
                json.dumps({"pat_str": "x", "special_tokens": {"<|endoftext|>": 3}})]:
        (tmp_path / "tok.json").write_text(bad)
        with pytest.raises(UserError, match="tok.json"):
            load_tokenizer(str(path))


def test_check_uint16():
    ranks = {bytes([b]): b for b in range(256)}
    fits = tiktoken.Encoding("ok", pat_str=r"\S+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 65535})
    check_uint16(fits)
    big = tiktoken.Encoding("big", pat_str=r"\S+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 70000})
    with pytest.raises(UserError, match="65536"):
        check_uint16(big)


@pytest.mark.parametrize("vocab_size", [256, 65537, 100_000])
def test_train_rejects_vocab_size_before_reading_text(tmp_path, vocab_size):
    def texts():
        raise AssertionError("the text must not be read")
        yield

    with pytest.raises(UserError, match="vocab size"):
        train_tokenizer(texts(), vocab_size, str(tmp_path / "t.tiktoken"))


def test_trained_tokenizer_round_trips_and_reloads(tmp_path):
    out = tmp_path / "tok.tiktoken"
    enc = train_tokenizer(corpus(), 400, str(out))
    assert enc.n_vocab == 400 and enc.eot_token == 399
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json", "tok.tiktoken"]  # no .tmp left over
    loaded = load_tokenizer(str(out))
    assert loaded.n_vocab == 400 and loaded.eot_token == 399
    for text in corpus(n_docs=20, seed=1) + [TRICKY, "", " ", "\n\n", "\x00\x7f", "🏳️‍🌈 👨‍👩‍👧"]:
        ids = enc.encode_ordinary(text)
        assert loaded.encode_ordinary(text) == ids
        assert loaded.decode(ids) == text
    assert len(enc.encode_ordinary(corpus()[0])) < len(corpus()[0].encode()) / 2  # it learned merges


def test_trained_tokenizer_matches_the_trainer(tmp_path):
    import rustbpe

    from tokenizer import GPT2_PATTERN

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(corpus()), 399, pattern=GPT2_PATTERN)
    path = str(tmp_path / "t.tiktoken")
    train_tokenizer(corpus(), 400, path)
    loaded = load_tokenizer(path)
    for text in corpus(n_docs=20, seed=2) + [TRICKY]:
        assert loaded.encode_ordinary(text) == trainer.encode(text)


def test_retraining_at_the_same_path_is_not_stale(tmp_path):
    out = str(tmp_path / "tok.tiktoken")
    train_tokenizer(corpus(), 300, out)
    assert load_tokenizer(out).n_vocab == 300
    train_tokenizer(corpus(), 350, out)
    assert load_tokenizer(out).n_vocab == 350


def test_text_with_too_few_pairs_gives_a_smaller_vocab(tmp_path):
    enc = train_tokenizer(["hello world, hello tokens"] * 3, 4096, str(tmp_path / "t.tiktoken"))
    assert 257 < enc.n_vocab < 4096 and enc.eot_token == enc.n_vocab - 1
    assert len(enc.encode_ordinary("hello world")) == 2  # each word became one token
    assert load_tokenizer(str(tmp_path / "t.tiktoken")).n_vocab == enc.n_vocab


def test_the_name_gpt2_is_the_same_tokenizer_as_a_file_of_its_ranks(tmp_path, gpt2_tiktoken):
    """OpenAI's rank file, and the copy prepare_data.py writes with its sidecar, are "gpt2"; the same file with a
    sidecar that moves <|endoftext|>, or another tokenizer's file, is not."""
    copy = tmp_path / "copy.tiktoken"
    save_tokenizer(load_tokenizer(str(gpt2_tiktoken)), str(copy))
    assert same_tokenizer("gpt2", str(gpt2_tiktoken)) and same_tokenizer(str(copy), "gpt2")
    sidecar = json.loads(copy.with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**sidecar, "special_tokens": {"<|endoftext|>": 50300}}))
    assert not same_tokenizer("gpt2", str(copy))
    other = tmp_path / "other.tiktoken"
    train_tokenizer(["a cat sat on the mat. "] * 20, 300, str(other))
    assert not same_tokenizer("gpt2", str(other)) and not same_tokenizer("cl100k_base", str(gpt2_tiktoken))
