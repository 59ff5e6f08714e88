"""The optimizers and their parameter groups: AdamW (betas 0.9/0.95, weight decay on matrices and embeddings
only), or with --optimizer muon, Muon (muon.py) for the blocks' matrices and AdamW for the rest. Every group
carries lr_scale, its peak learning rate over --learning-rate, which the schedule multiplies (train.train_step).
cfg is resolved (config.resolve): muon_lr is set.
"""
import torch

from config import TrainConfig
from errors import UserError, first_line
from model import CausalLM, CausalSelfAttention
from muon import Muon


def build_optimizer(model: CausalLM, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices and embeddings only: decaying biases and norm gains only hurts. With
    --optimizer muon the blocks' matrices go to Muon; its orthogonalised update does not suit the embedding, the
    head, the norm gains and the biases, which stay with AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied head appears once
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2} if cfg.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in hidden]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    # The fused kernel updates all parameters in one pass instead of a dozen elementwise passes per tensor;
    # it exists for CUDA and for the CPU (the same code runs on both), not for MPS.
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                              fused=device.type in ("cuda", "cpu"))
    if not hidden:
        return adamw
    # Moonshot's "Muon is Scalable for LLM Training" (Liu et al. 2025): scaled by 0.2 sqrt(max(rows, cols)), the
    # update has AdamW's typical RMS, so Muon takes AdamW's learning rate and weight decay as they are; momentum
    # 0.95 with Nesterov as in their paper and Keller Jordan's Muon. GPT-2's fused c_attn stacks the q, k and v
    # maps: orthogonalised as three matrices (split=3), as modded-nanogpt does.
    fused_qkv = {id(m.c_attn.weight) for m in model.modules() if isinstance(m, CausalSelfAttention)}
    matrices = [p for p in params if id(p) in hidden]
    groups = [{"params": [p for p in matrices if id(p) not in fused_qkv], "split": 1},
              {"params": [p for p in matrices if id(p) in fused_qkv], "split": 3}]
    muon = Muon([g for g in groups if g["params"]], lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum)
    for group in muon.param_groups:
        group["lr_scale"] = cfg.muon_lr / cfg.learning_rate
    return Optimizers(muon, adamw)


def build_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """float16's gradient scaler (dynamic loss scaling): the loss is multiplied by a scale before backward, so that
    small gradients do not underflow float16's range, and the gradients are divided by it before clipping and the
    step. A step whose gradients hold an inf or a nan is skipped and the scale halved; after 2,000 clean steps it
    doubles. float32 and bfloat16 (float32's range) need none: the scaler is then disabled, and each of its calls
    leaves the step exactly as it was without it."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


class Optimizers:
    """Several optimizers stepped as one, so train_step and checkpoints see a single object; iterating gives the
    parts, which is what torch.distributed.checkpoint takes for a sharded save."""

    def __init__(self, *parts):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)

    @property
    def param_groups(self) -> list:
        return [group for part in self.parts for group in part.param_groups]

    def step(self):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict):
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


def load_optimizer_state(optimizer, load):
    """Run load(), which fills optimizer with a checkpoint's moments, then give the groups back this run's
    settings: load_state_dict would keep the saved ones (a changed --muon-lr, --weight-decay), and a checkpoint
    written before lr_scale existed has none."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        load()
    except ValueError as e:  # torch's own words for state of another layout: other groups, other sizes
        raise UserError(f"--resume: the checkpoint's optimizer state does not fit this optimizer ({first_line(e)}); "
                        f"a GPT-2 run with --optimizer muon written before muon.py split c_attn into q, k, v cannot "
                        f"continue its moments: start a new --out-dir, or resume with the kit version that wrote it")
    for group, ours in zip(optimizer.param_groups, settings, strict=True):
        group.update(ours)
