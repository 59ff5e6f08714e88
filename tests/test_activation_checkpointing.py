"""--activation-checkpointing: each block keeps only its input for backward and recomputes the rest, with the
same dropout masks, so the math is unchanged: the same gradients bit for bit in one process, eager or compiled,
and the same loss curve through train.py in one process, under DDP and FSDP."""
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from config import GPTConfig
from helpers import COMMON, read_log, run_train
from model import build_model


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_blocks_keep_only_their_inputs_and_give_the_same_gradients(arch):
    torch.manual_seed(0)
    model = build_model(GPTConfig(arch=arch, n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                                  dropout=0.1)).train()
    x = torch.randint(0, 64, (2, 16))

    def step(checkpointing: bool):
        """Loss, gradients and the elements autograd keeps for backward outside the checkpointed blocks."""
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        kept = []
        torch.manual_seed(1)  # the same dropout masks for both
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            _, loss = model(x, x)
        loss.backward()
        return loss, [p.grad for p in model.parameters()], sum(kept)

    loss, grads, kept = step(False)
    loss_ckpt, grads_ckpt, kept_ckpt = step(True)
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt, strict=True))
    assert kept_ckpt < kept / 2, (kept_ckpt, kept)


def curves(tmp_path, markov_dir, *flags, torchrun: int = 0):
    common = [*COMMON, "--batch-size", 2, "--data-dir", markov_dir, "--max-steps", 4, "--checkpoint-interval", 100,
              "--dropout", 0.1, *flags]
    for name, flag in (("plain", "--no-activation-checkpointing"), ("ckpt", "--activation-checkpointing")):
        run_train(*common, flag, "--out-dir", tmp_path / name, torchrun=torchrun)
    return read_log(tmp_path / "plain", "loss"), read_log(tmp_path / "ckpt", "loss")


def test_one_process_trains_bit_for_bit_alike(tmp_path, markov_dir):
    plain, ckpt = curves(tmp_path, markov_dir)
    assert plain == ckpt and sorted(plain) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_bit_for_bit_alike(tmp_path, markov_dir, parallel):
    """Under FSDP the recomputation runs each block's hooks again, which gather its weights once more."""
    plain, ckpt = curves(tmp_path, markov_dir, "--parallel", parallel, torchrun=2)
    assert plain == ckpt and sorted(plain) == [1, 2, 3, 4]


def test_compiled_with_checkpointing_equals_eager_without():
    """torch.compile traces the checkpoint into a region its partitioner recomputes, dropout masks replayed. The
    aot_eager backend runs that graph with eager kernels, so it must match eager bit for bit; inductor's fused
    kernels would differ in the last bits and take minutes to build on a CPU (train.py --compile with and without
    the flag gave the same loss curve bit for bit, by hand)."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.1))
    x = torch.randint(0, 64, (2, 16))

    def step(forward, checkpointing: bool):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        _, loss = forward(x, x)
        loss.backward()
        return [loss] + [p.grad for p in model.parameters()]

    graphs = []

    def aot_eager(graph, example_inputs):  # dynamo's graph kept, to count its checkpointed regions
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, example_inputs)

    eager = step(model, False)
    compiled = step(torch.compile(model, backend=aot_eager), True)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
    regions = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.higher_order.tag_activation_checkpoint]
    assert len(regions) == model.config.n_layer
