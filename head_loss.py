"""The LM head and its cross-entropy in one pass, chunk by chunk: the (N, vocab) logits never exist at once.

Its oracle is `F.cross_entropy(h @ weight.T)` over the real vocabulary: tests/test_head_loss.py compares values
and both gradients against it (1e-5 in float32), and checks that repeated calls give the same bits on several
threads.

Per chunk of rows, in the autocast dtype: logits = x @ W.T over the padded vocabulary (aligned shapes for the
GEMM kernels; the padding columns get -inf, hence zero probability and zero gradient), one in-place softmax,
then d loss / d logits = softmax - onehot, written into the same buffer, feeds two more GEMMs for d/dh and d/dW.
Backward only scales what forward computed. Nothing of vocabulary width is held in float32, and every
reduction is a GEMM or a row-wise op: no scatter-add whose order depends on threads, so a run is bitwise
repeatable on any number of CPU threads and on CUDA.
"""
import torch

CHUNK_BYTES = 256 << 20  # logits per chunk: ~2,560 rows of GPT-2's padded vocabulary in bf16


def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
              chunk_rows: int = 0) -> torch.Tensor:
    """Mean cross-entropy of h (N, C) through the head weight (padded_vocab, C) against targets (N,), -1 ignored.

    chunk_rows: rows per chunk; 0 sizes it by memory (CHUNK_BYTES), rounded down to a multiple of 256.
    """
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    if chunk_rows <= 0:
        rows = CHUNK_BYTES // (weight.shape[0] * torch.finfo(dtype).bits // 8)
        chunk_rows = max(256, rows // 256 * 256)
    with torch.autocast(device_type, enabled=False):
        return _HeadLoss.apply(h, weight, targets, vocab_size, dtype, chunk_rows)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(fn_ctx, h, weight, targets, vocab_size, dtype, chunk_rows):
        need_grad = fn_ctx.needs_input_grad[0] or fn_ctx.needs_input_grad[1]
        w, x = weight.to(dtype), h.to(dtype)
        valid = targets != -1
        row_scale = valid / valid.sum().clamp(min=1)  # d mean / d row; stays on the device: no host sync
        safe_targets = targets.clamp(min=0)  # an ignored row's target is harmless: its scale is 0
        losses = torch.empty(len(x), device=x.device, dtype=torch.float32)
        grad_h = torch.empty(x.shape, device=x.device, dtype=torch.float32) if need_grad else None
        grad_w = None  # float32, written by the first chunk's GEMM and accumulated into by the others
        for start in range(0, len(x), chunk_rows):
            rows = slice(start, start + chunk_rows)
            t = safe_targets[rows, None]
            logits = x[rows] @ w.t()
            logits[:, vocab_size:] = float("-inf")  # padding columns: probability 0, gradient 0
            peak = logits.amax(dim=1, keepdim=True).float()
            target_logit = logits.gather(1, t).float()
            probs = torch.softmax(logits, dim=1, out=logits)  # in place: one pass, no float32 copy
            # log-sum-exp = peak logit - log(peak probability): that is >= 1/vocab, so it never underflows
            lse = peak - probs.amax(dim=1, keepdim=True).float().log()
            losses[rows] = (lse - target_logit).squeeze(1)
            if need_grad:
                scale = row_scale[rows, None]
                dlogits = probs.scatter_(1, t, probs.gather(1, t) - 1)  # softmax - onehot: one element per row
                torch.mul(dlogits @ w, scale, out=grad_h[rows])
                scaled_x = x[rows] * scale.to(dtype)
                if grad_w is None:
                    grad_w = (dlogits.t() @ scaled_x).float()
                elif dtype == torch.float32:  # no (vocab, C) temporary: the GEMM adds into grad_w
                    grad_w.addmm_(dlogits.t(), scaled_x)
                else:
                    grad_w += dlogits.t() @ scaled_x
        if need_grad:
            fn_ctx.save_for_backward(grad_h, grad_w)
            fn_ctx.input_dtypes = (h.dtype, weight.dtype)
        return (losses * row_scale).sum()

    @staticmethod
    def backward(fn_ctx, grad_loss):
        grad_h, grad_w = fn_ctx.saved_tensors
        h_dtype, w_dtype = fn_ctx.input_dtypes
        return (grad_h.to(h_dtype) * grad_loss, (grad_w * grad_loss).to(w_dtype), None, None, None, None)
