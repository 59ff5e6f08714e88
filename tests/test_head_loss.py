"""head_loss.py against its oracle, F.cross_entropy over the unpadded logits, and its bits repeatable on several
threads with the repeated targets of real text."""
import pytest
import torch
import torch.nn.functional as F

from head_loss import head_loss


@pytest.mark.parametrize("chunk_rows", [7, 64, 0])
def test_chunked_head_loss_has_the_values_and_gradients_of_plain_cross_entropy(chunk_rows):
    """float32: loss, d/dh and d/dweight equal F.cross_entropy over the unpadded logits within 1e-5, for chunks
    that do and do not divide the rows, with ignored targets and a padded head."""
    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    weight = (torch.randn(128, 32) * 0.2).requires_grad_()  # 100 real tokens, padded to 128
    targets = torch.randint(0, 100, (50,))
    targets[::9] = -1
    loss = head_loss(h, weight, targets, 100, chunk_rows=chunk_rows)
    loss.backward()
    ours = (loss.detach(), h.grad.clone(), weight.grad.clone())
    h.grad = weight.grad = None
    plain = F.cross_entropy((h @ weight.t())[:, :100], targets, ignore_index=-1)
    plain.backward()
    for a, b in zip(ours, (plain.detach(), h.grad, weight.grad)):
        assert (a - b).abs().max().item() < 1e-5
    assert weight.grad[100:].abs().max() == 0 and ours[2][100:].abs().max() == 0  # padding rows learn nothing


def test_chunked_head_loss_in_bf16_autocast_is_close_to_float32():
    torch.manual_seed(0)
    h, weight = torch.randn(64, 48), torch.randn(256, 48) * 0.2
    targets = torch.randint(0, 256, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = head_loss(h, weight, targets, 256)
    assert abs(bf16.item() - F.cross_entropy(h @ weight.t(), targets).item()) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_bitwise_repeatable_on_several_threads(dtype):
    """A few targets repeated hundreds of times (as text repeats "the" and ","): five calls on 2+ threads give
    the same bits, in float32 and under bf16 autocast. A scatter-add of the onehot rows did not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the suite pins one thread, which hides order-dependent sums
    try:
        torch.manual_seed(0)
        h = torch.randn(2048, 128, requires_grad=True)
        weight = (torch.randn(320, 128) * 0.2).requires_grad_()
        targets = torch.randint(0, 4, (2048,))
        results = []
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = head_loss(h, weight, targets, 300, chunk_rows=1024)  # chunks big enough to be split over threads
            loss.backward()
            results.append((loss.detach(), h.grad, weight.grad))
            h.grad = weight.grad = None
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
