"""Packed windows hold several documents: their positions and their attention mask (--doc-mask).

prepare_data.py writes each document as <|endoftext|> followed by its tokens, so a document starts at an eot: the
eot is its first token (a beginning-of-sequence marker at position 0), and the last token before it ends the
previous document, whose final target is that eot. Tokens before a window's first eot are the tail of a document
that began in an earlier window; they are a document of their own, at positions from 0. With the mask, no token
attends across a document boundary and positions restart at each document, so every document in a window is
computed exactly as if it ran alone. (Rotary scores depend only on the distance between two tokens: for --arch
modern the mask alone would do, and the restart changes only rounding.)
"""
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

FLEX_BLOCK = 128  # FlexAttention's tile: the block mask marks which 128 x 128 tiles hold any allowed pair


def document_ids(idx: torch.Tensor, eot: int) -> torch.Tensor:
    """(B, T) tokens -> (B, T) the document of each token: how many eots are at or before it."""
    return (idx == eot).cumsum(dim=1)


def document_positions(idx: torch.Tensor, eot: int) -> torch.Tensor:
    """(B, T) each token's position within its document: its distance from the latest eot at or before it."""
    t = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    starts = torch.where(idx == eot, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - starts


def dense_mask(ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T), True where query t may attend key s: s <= t in the same document."""
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    return causal & (ids[:, None, :, None] == ids[:, None, None, :])


def block_mask(ids: torch.Tensor) -> BlockMask:
    """The same mask for FlexAttention: tiles wholly outside a document or above the diagonal are skipped, so
    attention costs about the documents' own triangles, not the window's."""
    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (ids[b, q] == ids[b, kv])

    B, T = ids.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=ids.device, BLOCK_SIZE=FLEX_BLOCK)


def layout(idx: torch.Tensor, eot: int, dropout: bool) -> tuple[torch.Tensor, torch.Tensor | BlockMask]:
    """(positions, attn_mask) of a packed window for the model's hidden().

    FlexAttention only where it is fast, on CUDA inside torch.compile (eager, it materialises the full scores), and
    only without attention dropout, which it lacks. Everywhere else the boolean mask through
    scaled_dot_product_attention: the same result, with B x T x T bytes of mask."""
    ids = document_ids(idx, eot)
    flex = idx.is_cuda and torch.compiler.is_compiling() and not dropout
    return document_positions(idx, eot), block_mask(ids) if flex else dense_mask(ids)
