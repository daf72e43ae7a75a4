"""
Full fine-tuning: the method with no method, the baseline in every paper's table. Every parameter
trains; the papers give its loop no settings of its own, so LIFT's loop (Table 6) is used where that
is stated, else our choice. It meets train.py's loop like every other method file: Settings,
prepare, merge (methods.py: the contract); it has no adapter, TRAINS_BASE says so.
"""
from dataclasses import dataclass, field

from targets import adamw


@dataclass
class Settings:
    """Full fine-tuning's loop settings (AdamW, no settings of its own)."""
    lr: float = field(default=1e-5, metadata={
        "source": "LIFT (Liu et al., ICML 2025), App. E: full-FT lr grid 1e-5..1e-4, its low end", "tiny": 1e-3})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"source": "not given; PyTorch's AdamW default"})
    eps: float = field(default=1e-8, metadata={"source": "not given; PyTorch's AdamW default"})
    weight_decay: float = field(default=0.0, metadata={"source": "not given; the Hugging Face Trainer's default"})
    max_grad_norm: float = field(default=1.0, metadata={"source": "not given; the Hugging Face Trainer's default"})
    schedule: str = field(default="linear", metadata={"source": "LIFT, Table 6 (its loop, all methods)"})
    warmup_ratio: float = field(default=0.03, metadata={"source": "LIFT, Table 6 (its loop, all methods)"})
    epochs: float = field(default=3.0, metadata={"source": "LIFT, Table 6 (its loop, all methods)"})
    batch_size: int = field(default=16, metadata={"source": "LIFT, Table 6 (its loop, all methods)"})


# Its trained state is the base weights themselves: train.precision keeps them in fp32 (master weights)
# under bf16 autocast, where the other methods' frozen base weights are stored in bf16.
TRAINS_BASE = True


def prepare(model, s: Settings, batches, *, seed=0, total_steps=None, grad_accum=1, n_train=None, lr_first=None):
    """Every parameter trains (fp32 AdamW state, fused kernels on CUDA)."""
    model.requires_grad_(True)
    return adamw(model.named_parameters(), s.lr, s.betas, s.eps, s.weight_decay)


def merge(model, optimizer, s: Settings):
    """Nothing to fold in: the trained weights are the model (and what checkpoint.save_merged saves)."""
