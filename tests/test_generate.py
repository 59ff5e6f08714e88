"""generate.py: greedy decoding equals transformers' token for token, sampling options behave as documented,
and the CLI streams whole characters and fails with one line."""
import pytest
import torch

import checkpoint
import generate
from errors import UserError
from helpers import assert_one_line_error, hf_gpt2, in_process, run_cli


@pytest.fixture(scope="module")
def gpt2(hf_gpt2_dir):
    return checkpoint.load_gpt2(str(hf_gpt2_dir)).eval()


def greedy_ids(model, ids, n, use_cache=True):
    steps = model.generate(torch.tensor([ids]), n, temperature=0, use_cache=use_cache)
    return [int(t) for t in steps]


def transformers_greedy(theirs, ids, n) -> list[int]:
    """The n tokens transformers' greedy search appends to ids, never stopping early."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = theirs.generate(torch.tensor([ids]), generation_config=config, attention_mask=torch.ones(1, len(ids),
                                                                                                   dtype=torch.long))
    return out[0, len(ids):].tolist()


def sample(model, enc, seed=0, **kw):
    kw = {"max_new_tokens": 12, "temperature": 1.0, **kw}
    return generate.complete(model, enc, "The meaning of life is", generator=torch.Generator().manual_seed(seed), **kw)


def test_greedy_cache_no_cache_and_transformers_agree(gpt2, hf_gpt2_dir):
    theirs = hf_gpt2(hf_gpt2_dir)
    for prompt_len in (1, 7, 30):
        ids = torch.randint(0, 50257, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
        expected = transformers_greedy(theirs, ids, 24)
        assert greedy_ids(gpt2, ids, 24) == expected
        assert greedy_ids(gpt2, ids, 24, use_cache=False) == expected


def test_cache_equals_no_cache_past_block_size(random_gpt):
    model = random_gpt()  # block_size 64: 50 + 40 tokens slide the context
    ids = torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    assert greedy_ids(model, ids, 40) == greedy_ids(model, ids, 40, use_cache=False)


def test_seeded_sampling_is_reproducible_and_seeds_differ(gpt2, enc):
    first = sample(gpt2, enc, seed=1, num_samples=2)
    assert first == sample(gpt2, enc, seed=1, num_samples=2)
    assert first[0] != first[1]  # the rows of one batch are different samples
    assert first != sample(gpt2, enc, seed=2, num_samples=2)


def test_greedy_equivalents(gpt2, enc):
    greedy = sample(gpt2, enc, temperature=0)
    assert greedy[0] == enc.decode(greedy_ids(gpt2, enc.encode("The meaning of life is"), 12))
    assert sample(gpt2, enc, top_k=1) == greedy
    assert sample(gpt2, enc, top_p=1e-6) == greedy


def test_top_k_larger_than_vocab_is_no_top_k(gpt2, enc):
    assert sample(gpt2, enc, top_k=10**6) == sample(gpt2, enc, top_k=None)


def test_complete_restores_training_mode(random_gpt, enc):
    model = random_gpt(vocab_size=enc.n_vocab).train()
    generate.complete(model, enc, "Hi", max_new_tokens=2)
    assert model.training


def test_empty_prompt_starts_from_endoftext(gpt2, enc):
    assert generate.encode_prompt(enc, "", 128) == [enc.eot_token]
    text = generate.complete(gpt2, enc, "", max_new_tokens=5, temperature=0)[0]
    assert text == enc.decode(greedy_ids(gpt2, [enc.eot_token], 5))


def test_long_prompt_is_cropped_with_a_warning(enc, capsys):
    text = "one two three four five six seven eight nine ten " * 20
    ids = generate.encode_prompt(enc, text, 64)
    assert ids == enc.encode(text)[-63:]
    warning = capsys.readouterr().err
    assert warning.startswith("warning:") and warning.count("\n") == 1


class Scripted:
    """Stands in for a GPT whose next tokens are fixed in advance, the same for every row."""

    def __init__(self, tokens):
        self.tokens, self.lm_head = tokens, torch.nn.Linear(1, 1)

    def generate(self, idx, max_new_tokens, **_):
        for token in self.tokens[:max_new_tokens]:
            yield torch.full((idx.shape[0],), token)


def test_stream_keeps_characters_split_across_tokens_whole(enc):
    ids = enc.encode("🙂 ok 日本語")
    assert "\ufffd" in enc.decode_single_token_bytes(ids[0]).decode("utf-8", errors="replace")  # 🙂 spans tokens
    pieces = list(generate.stream(Scripted(ids + [enc.eot_token, 11]), enc, [0], num_samples=2))
    for row in (0, 1):  # nothing after <|endoftext|>
        assert "".join(text for r, text in pieces if r == row) == "🙂 ok 日本語"
    assert (0, "🙂") in pieces and not any("\ufffd" in text for _, text in pieces)


def test_stream_ends_an_unfinished_character_with_a_replacement(enc):
    first_half = enc.encode("🙂")[0]
    assert [text for _, text in generate.stream(Scripted([first_half]), enc, [0])] == ["\ufffd"]


@pytest.mark.parametrize("top_p", ["0", "1.5", "-1"])
def test_top_p_outside_unit_interval_exits_2_with_one_line(top_p, monkeypatch, capsys):
    assert_one_line_error(in_process(monkeypatch, capsys, generate, "--top-p", top_p), "error: --top-p")


def test_greedy_flag_and_temperature_zero_print_transformers_greedy_text(hf_gpt2_dir, gpt2_tiktoken, enc, capsys):
    expected = "Hello" + enc.decode(transformers_greedy(hf_gpt2(hf_gpt2_dir), enc.encode("Hello"), 10)) + "\n"
    for flag in (["--greedy"], ["--temperature", "0", "--seed", "5"]):
        generate.main(["--init-from", str(hf_gpt2_dir), "--tokenizer", str(gpt2_tiktoken), "--prompt", "Hello",
                       "--max-new-tokens", "10", *flag])
        assert capsys.readouterr().out == expected, flag


def test_checkpoint_run_folder_with_its_own_tokenizer(random_gpt, gpt2_tiktoken, tmp_path, capsys):
    checkpoint.save_checkpoint(str(tmp_path / "run"), 3, random_gpt(vocab_size=50257), str(gpt2_tiktoken))
    generate.main(["--checkpoint", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert out.out.startswith("Hi") and "ckpt_0000003" in out.err


def test_tokenizer_not_matching_the_model_is_a_user_error(random_gpt, gpt2_tiktoken, tmp_path):
    checkpoint.save_checkpoint(str(tmp_path), 1, random_gpt(), "gpt2")  # a vocabulary of 300
    with pytest.raises(UserError, match="50257 tokens but the model"):
        generate.main(["--checkpoint", str(tmp_path), "--tokenizer", str(gpt2_tiktoken)])


def test_cli_streams_samples_from_a_hugging_face_folder(hf_gpt2_dir, gpt2_tiktoken):
    result = run_cli("generate.py", "--init-from", hf_gpt2_dir, "--tokenizer", gpt2_tiktoken, "--prompt",
                     "Once upon", "--num-samples", 2, "--max-new-tokens", 8)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon")
    first, second = result.stdout.split("\n" + generate.RULE + "\n")
    assert second.startswith("Once upon") and first != second.rstrip("\n")


def test_cli_without_a_checkpoint_exits_2_with_one_line(tmp_path):
    assert_one_line_error(run_cli("generate.py", "--checkpoint", tmp_path / "missing"), "error: no checkpoint")
