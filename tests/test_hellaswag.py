"""hellaswag.py: the packed scorer against transformers, known answers, data loading and checks, the CLI, torchrun."""
import gzip
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import distributed
import export_hf
import hellaswag
from config import GPTConfig
from errors import UserError
from helpers import (COMMON, TORCHRUN, assert_one_line_error, hf_gpt2, perturb, read_log, run_cli, run_train,
                     shared_data, write_jsonl)
from model import CausalLM, build_model
from tokenizer import load_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hellaswag_file() -> Path:
    return shared_data("hellaswag_val.jsonl.gz")


@pytest.fixture(scope="module")
def real_examples(hellaswag_file, enc):
    """The first 40 validation examples. Each fits the test models' 128 positions whole, so that the reference
    below need not cut contexts."""
    examples = hellaswag.load_examples(str(hellaswag_file), limit=40)
    assert all(len(enc.encode(ex["ctx"])) + max(len(enc.encode(" " + e)) for e in ex["endings"]) <= 128
               for ex in examples)
    return examples


def example(ctx="A man is sitting on a roof. he", endings=("a", "b", "c", "d"), label=0) -> dict:
    return {"ctx": ctx, "endings": list(endings), "label": label}


@torch.no_grad()
def reference_losses(theirs, enc, examples):
    """Summed loss and token count of each candidate ending, (N, 4) each, from one forward of a transformers
    model over context + ending per candidate."""
    losses, counts = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4)
    for i, ex in enumerate(examples):
        ctx = enc.encode(ex["ctx"])
        for k, ending in enumerate(ex["endings"]):
            end = enc.encode(" " + ending)
            logits = theirs(torch.tensor([ctx + end])).logits[0, len(ctx) - 1:-1]
            losses[i, k] = F.cross_entropy(logits.float(), torch.tensor(end), reduction="sum")
            counts[i, k] = len(end)
    return losses, counts


def reference_result(theirs, enc, examples) -> dict:
    """The scores as llm.c and build-nanogpt define them: acc picks the ending of lowest total loss, acc_norm the
    lowest mean loss per token."""
    losses, counts = reference_losses(theirs, enc, examples)
    labels = torch.tensor([ex["label"] for ex in examples])
    right = lambda picked: (picked == labels).sum().item() / len(examples)
    return {"acc": right(losses.argmin(1)), "acc_norm": right((losses / counts).argmin(1)), "n": len(examples)}


def test_matches_transformers_candidate_by_candidate(hf_gpt2_dir, enc, real_examples):
    ours, _ = checkpoint.load_model(str(hf_gpt2_dir))
    losses, counts = hellaswag.score(ours, enc, real_examples, CPU, torch.float32, batch_size=3)  # mixed lengths
    want, want_counts = reference_losses(hf_gpt2(hf_gpt2_dir), enc, real_examples)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(losses, want, atol=1e-4, rtol=0)
    assert torch.equal(losses.argmin(1), want.argmin(1))
    assert torch.equal((losses / counts).argmin(1), (want / counts).argmin(1))


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_plain_baseline_agrees_and_long_contexts_are_cut(enc, real_examples, arch):
    torch.manual_seed(0)
    model = build_model(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, arch=arch)).eval()  # most rows exceed 48
    if arch == "modern":  # its blocks start as the identity, which would hide a wrong mask
        perturb(model)
    examples = real_examples[:8]
    packed, counts = hellaswag.score(model, enc, examples, CPU, torch.float32, batch_size=4)
    plain, plain_counts = hellaswag.score_plain(model, enc, examples, CPU, torch.float32)
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=0)
    assert torch.equal(counts, plain_counts)


def unigram_model(preferred: set) -> CausalLM:
    """A model that ignores its input and gives the preferred tokens logit 30, every other token 0."""
    model = build_model(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the final hidden state is then ln_f's bias, whatever came in
        model.transformer.ln_f.bias.copy_(torch.eye(8)[0])
        model.transformer.wte.weight.zero_()  # tied: these rows are the head
        model.transformer.wte.weight[sorted(preferred), 0] = 30.0
    return model


def test_known_answers_score_one(enc):
    examples = [
        example("The cat sat on the", ["mat.", "purple engine roared loudly", "violin", "volcano erupted"], 0),
        example("She opened the door and", ["thunder rolled", "walked in.", "algebra homework", "giraffes"], 1),
        example("He poured the coffee into", ["quantum sandwich", "telescope", "a cup.", "meteor shower falls"], 2),
        example("The dog chased the", ["bicycle tyre pump", "orange kangaroo", "skyscraper", "ball."], 3),
    ]
    preferred = {t for ex in examples for t in enc.encode(" " + ex["endings"][ex["label"]])}
    wrong = [set(enc.encode(" " + e)) for ex in examples for k, e in enumerate(ex["endings"]) if k != ex["label"]]
    assert all(tokens - preferred for tokens in wrong)  # every wrong ending has a token the model dislikes
    result = hellaswag.evaluate(unigram_model(preferred), enc, examples, CPU, torch.float32, batch_size=3)
    assert result == {"acc": 1.0, "acc_norm": 1.0, "n": 4}


def test_bfloat16_autocast_picks_the_same_known_answers(enc):
    examples = [example("The cat sat on the", ["violin", "purple engine roared", "mat.", "volcano"], 2)]
    model = unigram_model(set(enc.encode(" mat.")))
    assert hellaswag.evaluate(model, enc, examples, CPU, torch.bfloat16)["acc_norm"] == 1.0


def test_evaluate_restores_training_mode(enc):
    model = unigram_model({13})
    model.train()
    hellaswag.evaluate(model, enc, [example()], CPU, torch.float32)
    assert model.training


def test_load_examples_gz_plain_and_limit(tmp_path):
    rows = [example(f"context {i}", label=i % 4) | {"ind": i} for i in range(5)]
    plain = write_jsonl(tmp_path / "val.jsonl", rows)
    packed = tmp_path / "val.jsonl.gz"
    packed.write_bytes(gzip.compress(Path(plain).read_bytes()))
    want = [example(f"context {i}", label=i % 4) for i in range(5)]
    assert hellaswag.load_examples(plain) == want
    assert hellaswag.load_examples(str(packed), limit=3) == want[:3]


def test_the_real_file_has_all_validation_examples(hellaswag_file):
    examples = hellaswag.load_examples(str(hellaswag_file))
    assert len(examples) == 10042 and examples[0]["label"] == 3


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not a JSON line"),
    (json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"]}), "want an object with keys ctx, endings, label"),
    (json.dumps(example(endings=["b", "c", "d"])), "list of 4 strings"),
    (json.dumps(example(label=4)), "label must be an integer 0..3"),
    (json.dumps(example(label="1")), "label must be an integer 0..3"),
    (json.dumps(example(ctx="")), "ctx must be a non-empty string"),
])
def test_malformed_line_names_its_line(tmp_path, bad, why):
    path = write_jsonl(tmp_path / "bad.jsonl", [example(), bad])
    with pytest.raises(UserError, match=rf"bad\.jsonl:2: .*{why}"):
        hellaswag.load_examples(path)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(UserError, match="cannot read HellaSwag data .*nope.jsonl"):
        hellaswag.load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="holds no examples"):
        hellaswag.load_examples(write_jsonl(tmp_path / "empty.jsonl", []))


def test_download_once_through_a_url(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "hellaswag_val.jsonl", [example(), example(label=2)])
    monkeypatch.setattr(hellaswag, "DATA_URL", Path(source).as_uri())
    monkeypatch.setattr(hellaswag, "DATA_LINES", 3)
    with pytest.raises(UserError, match="gave 2 lines, not the 3 expected"):
        hellaswag.load_examples(None, cache_dir=str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []  # a damaged download is not kept
    monkeypatch.setattr(hellaswag, "DATA_LINES", 2)
    cache = tmp_path / "cache"
    assert hellaswag.load_examples(None, cache_dir=str(cache)) == [example(), example(label=2)]
    assert [p.name for p in cache.iterdir()] == ["hellaswag_val.jsonl"]  # no temporary file left behind
    Path(source).unlink()  # a second load must not need the source
    assert len(hellaswag.load_examples(None, cache_dir=str(cache))) == 2


def test_failed_download_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="cannot download .*--data PATH"):
        hellaswag.download((tmp_path / "absent.jsonl").as_uri(), str(tmp_path / "cache" / "x.jsonl"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_body_cut_short_over_http_leaves_nothing(tmp_path):
    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # promises 1000 bytes, sends 10, hangs up: urllib raises http.client.IncompleteRead
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"ctx": "a')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CutShort)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        with pytest.raises(UserError, match="cannot download .*--data PATH"):
            hellaswag.download(f"http://127.0.0.1:{server.server_port}/x.jsonl", str(tmp_path / "cache" / "x.jsonl"))
    finally:
        thread.join(timeout=10)
        server.server_close()
    assert list((tmp_path / "cache").iterdir()) == []


def test_cli_writes_json_and_respects_limit(tmp_path, hf_gpt2_dir, gpt2_tiktoken, enc, hellaswag_file,
                                            real_examples):
    out = tmp_path / "sub" / "result.json"
    proc = run_cli("hellaswag.py", "--init-from", hf_gpt2_dir, "--tokenizer", gpt2_tiktoken, "--data",
                   hellaswag_file, "--limit", 6, "--device", "cpu", "--dtype", "float32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result == reference_result(hf_gpt2(hf_gpt2_dir), enc, real_examples[:6])
    assert f"n 6 | acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} |" in proc.stdout
    assert "examples/s" in proc.stdout


def test_cli_scores_a_modern_checkpoint_as_transformers_scores_its_qwen3_export(tmp_path, gpt2_tiktoken, enc,
                                                                                 hellaswag_file, real_examples):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = perturb(build_model(GPTConfig(arch="modern", n_layer=2, n_head=4, n_embd=64, block_size=128)))
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, model, str(gpt2_tiktoken))
    out = tmp_path / "result.json"
    proc = run_cli("hellaswag.py", "--checkpoint", tmp_path / "run", "--data", hellaswag_file, "--limit", 6,
                   "--device", "cpu", "--dtype", "float32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    export_hf.export(ckpt, str(tmp_path / "hf"))
    qwen3 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert json.loads(out.read_text()) == reference_result(qwen3, enc, real_examples[:6])


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: ["--data", write_jsonl(tmp / "bad.jsonl", [example(), example(label=7)])], "bad.jsonl:2: label"),
    (lambda tmp: ["--data", tmp / "missing.jsonl"], "cannot read HellaSwag data"),
    (lambda tmp: ["--checkpoint", tmp], "no checkpoint in"),
    (lambda tmp: ["--batch-size", -1], "--batch-size and --limit must be at least 0"),
])
def test_cli_user_errors_are_one_line(tmp_path, make_args, message):
    good_data = write_jsonl(tmp_path / "good.jsonl", [example()])
    assert_one_line_error(run_cli("hellaswag.py", "--data", good_data, "--device", "cpu", *make_args(tmp_path)),
                          message)


@pytest.mark.slow
def test_two_processes_count_like_one(tmp_path, hf_gpt2_dir, gpt2_tiktoken, enc, hellaswag_file, real_examples):
    out = tmp_path / "ddp.json"
    # 11 examples, so the two processes' slices differ in size.
    proc = run_cli("hellaswag.py", "--init-from", hf_gpt2_dir, "--tokenizer", gpt2_tiktoken, "--data",
                   hellaswag_file, "--limit", 11, "--device", "cpu", "--dtype", "float32", "--out", out,
                   launcher=(*TORCHRUN, "--nproc_per_node=2"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == reference_result(hf_gpt2(hf_gpt2_dir), enc, real_examples[:11])


def test_init_from_takes_the_canonical_hub_name(tmp_path, monkeypatch, hellaswag_file):
    # offline, an accepted name gets as far as the download; a refused one would say "neither a folder"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    proc = run_cli("hellaswag.py", "--init-from", "openai-community/gpt2-medium", "--data", hellaswag_file, "--limit",
                   1, "--device", "cpu")
    assert proc.returncode != 0 and "cannot download gpt2-medium from the Hugging Face hub" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_even_shares_run_the_same_forwards_on_every_rank_and_count_like_one_process(enc, real_examples):
    """Ranks of a sharded model must run the same number of forwards: 11 rows on 2 ranks are 6 and 5, the second
    filled up with a repeat that is not counted; the two tallies add up to one process's."""
    model = build_model(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128)).eval()
    forwards = []
    model.hidden = lambda *args, _hidden=model.hidden, **kwargs: forwards.append(1) or _hidden(*args, **kwargs)
    examples = real_examples[:11]
    whole = hellaswag.tally(model, enc, examples, CPU, torch.float32, batch_size=2)
    shares = []
    for rank in range(2):
        forwards.clear()
        world = distributed.World(rank=rank, world_size=2)
        shares.append((hellaswag.tally(model, enc, examples, CPU, torch.float32, batch_size=2, world=world,
                                       even=True), len(forwards)))
    assert [n for _, n in shares] == [3, 3]  # 6 rows in batches of 2 on both ranks
    assert torch.equal(shares[0][0] + shares[1][0], whole) and whole[2] == 11


def test_examples_per_forward_fits_the_budget():
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # GPT-2: logits of 50,304 columns
    encoded = [([1] * 60, [[2] * 20] * 4)]  # a row of 140 tokens, 80 of them scored
    per_example = 80 * 50304 * 4 + 140 * 768 * 16 * 4 + 140 * 140 * (1 + 4 * 12)
    n = hellaswag.examples_per_forward(cfg, encoded, CPU, torch.float32)
    assert n == hellaswag.CPU_BUDGET // per_example == 11
    assert hellaswag.examples_per_forward(cfg, encoded, CPU, torch.bfloat16) > n  # half the bytes a logit
    tiny = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64, vocab_size=100)
    assert hellaswag.examples_per_forward(tiny, encoded, CPU, torch.float32) == hellaswag.MAX_EXAMPLES


@pytest.mark.slow
def test_under_fsdp_two_ranks_split_the_rows_and_score_like_one_process(tmp_path, english_dir, hellaswag_file):
    """train.py's HellaSwag on 2 FSDP ranks (11 rows: shares of 6 and 5) gives one process's accuracy on the
    same checkpoint."""
    out = tmp_path / "out"
    run_train(*COMMON, "--batch-size", 2, "--block-size", 128, "--total-batch-size", 2 * 128 * 2, "--data-dir",
              english_dir, "--out-dir", out, "--max-steps", 2, "--parallel", "fsdp", "--hellaswag-interval", 2,
              "--hellaswag-limit", 11, "--hellaswag-data", hellaswag_file, torchrun=2)
    model, tokenizer = checkpoint.load_model(str(out / "ckpt_0000002"))
    one = hellaswag.evaluate(model, load_tokenizer(tokenizer), hellaswag.load_examples(str(hellaswag_file), 11), CPU,
                             torch.float32)
    assert (read_log(out, "hellaswag_acc")[2], read_log(out, "hellaswag_acc_norm")[2]) == (one["acc"],
                                                                                           one["acc_norm"])
