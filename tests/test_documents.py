"""documents.py and --doc-mask: a packed window computes each of its documents exactly as that document alone,
through both attention paths and both architectures; train.py trains with it and a resume checks it."""
import json

import pytest
import torch

import documents
import markov
import train
from helpers import TINY, assert_one_line_error, in_process, read_log, run_train

EOT = 299  # the last id of conftest's 300-token vocabulary, as <|endoftext|> is GPT-2's


def packed_rows():
    """Two windows of 300 tokens and their documents as prepare_data.py packs them, each an eot then its tokens.
    Row 0 begins inside a document (a tail with no eot) and holds one of a lone eot; both rows cross FlexAttention's
    128-token tiles at document boundaries that are not tile boundaries."""
    g = torch.Generator().manual_seed(0)

    def doc(n, eot=True):
        return torch.cat([torch.tensor([EOT] * eot, dtype=torch.long), torch.randint(0, EOT, (n,), generator=g)])

    rows = [[doc(17, eot=False), doc(90), doc(0), doc(190)], [doc(140), doc(158)]]
    return torch.stack([torch.cat(r) for r in rows]), rows


def flex_logits(model, x):
    """The CUDA branch (FlexAttention's block mask), run eagerly on the CPU."""
    ids = documents.document_ids(x, EOT)
    h = model.hidden(x, positions=documents.document_positions(x, EOT), attn_mask=documents.block_mask(ids))
    return model.logits(h)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("path", ["dense", "flex"])
@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_packed_window_equals_each_document_alone(random_gpt, arch, path):
    masked = random_gpt(arch=arch, block_size=320, doc_mask=True, eot_token=EOT)
    plain = random_gpt(arch=arch, block_size=320)  # the reference: plain causal attention, positions from 0
    plain.load_state_dict(masked.state_dict())
    x, rows = packed_rows()
    with torch.no_grad():
        packed = masked(x)[0] if path == "dense" else flex_logits(masked, x)
        alone = torch.stack([torch.cat([plain(d[None])[0][0] for d in docs]) for docs in rows])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_positions_restart_at_each_eot_which_begins_its_document():
    E = EOT
    x = torch.tensor([[5, 6, E, 5, 5, 5, E, E, 6], [E, 5, 5, 5, 5, 5, 5, E, 5]])
    assert documents.document_positions(x, E).tolist() == [[0, 1, 0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1]]
    assert documents.document_ids(x, E).tolist() == [[0, 0, 1, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 2, 2]]


def test_training_with_doc_mask_runs_saves_it_and_resume_checks_it(tmp_path, markov_dir):
    """Markov data, whose meta.json names token 7 as eot (about one token in eight): the mask changes the first
    step's loss from the same weights and batch, the checkpoint records the flag and the data's eot, and a resume
    without the flag is refused."""
    common = [*TINY, "--data-dir", markov_dir, "--max-steps", 2]
    run_train(*common, "--out-dir", tmp_path / "masked", "--doc-mask")
    run_train(*common, "--out-dir", tmp_path / "plain")
    masked, plain = read_log(tmp_path / "masked", "loss")[1], read_log(tmp_path / "plain", "loss")[1]
    assert abs(masked - plain) > 1e-3, (masked, plain)
    (ckpt,) = (tmp_path / "masked").glob("ckpt_*")
    saved = json.loads((ckpt / "config.json").read_text())["model"]
    eot = json.loads((markov_dir / "meta.json").read_text())["eot"]
    assert saved["doc_mask"] is True and saved["eot_token"] == eot
    refused = run_train(*common, "--out-dir", tmp_path / "masked", "--max-steps", 3, "--resume", check=False)
    assert_one_line_error(refused, "doc_mask: True there, False now")


@pytest.mark.parametrize("flags, meta, message", [
    (["--eot-token", 3], {}, "--eot-token 3 disagrees"),
    ([], {"eot": None}, "names no \"eot\" token"),
])
def test_doc_mask_without_the_datas_eot_is_one_line(tmp_path, monkeypatch, capsys, flags, meta, message):
    markov.write_data(tmp_path / "data", n_train=5_000, n_val=2_000)
    path = tmp_path / "data" / "meta.json"
    written = {**json.loads(path.read_text()), **meta}
    path.write_text(json.dumps({k: v for k, v in written.items() if v is not None}))
    result = in_process(monkeypatch, capsys, train, *TINY, "--data-dir", tmp_path / "data", "--out-dir",
                        tmp_path / "out", "--max-steps", 1, "--doc-mask", *flags)
    assert_one_line_error(result, message, "meta.json")
