"""A GPT sized for one GPU and a 5-minute budget, trained on a BPE vocabulary and scored in bits per byte."""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import Batches, Progress, budget_from_env, evaluate_and_report, prepare, setup

# Hyperparameters. The agent may edit anything in this file; prepare.py is frozen.
N_LAYER = 8
N_HEAD = 4  # head size N_EMBD // N_HEAD = 128
N_EMBD = 512
BLOCK_SIZE = 1024  # context length, in BPE tokens
BATCH_SIZE = 64  # sequences per step: 64 x 1024 = 65,536 tokens
LEARNING_RATE = 1.5e-3  # peak
WARMUP_STEPS = 50  # steps, not a budget fraction: the budget's clock also runs during compilation
MIN_LR_FRACTION = 0.1  # of the peak
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
DROPOUT = 0.1  # a small corpus is seen many times in 5 minutes; 0.0 for a large one
ROPE_BASE = 10000.0
LOG_EVERY = 50  # steps


def rotate(x, cos, sin):
    """Rotary position embedding: turn each pair of channels by its position's angle. x: (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, D)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))  # QK-norm: steadier at high LR
        q, k = rotate(q, cos, sin).type_as(v), rotate(k, cos, sin).type_as(v)  # autocast may norm in fp32
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on CUDA
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.down = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())  # ReLU squared


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.RMSNorm(N_EMBD)
        self.attn = CausalSelfAttention()
        self.norm2 = nn.RMSNorm(N_EMBD)
        self.mlp = MLP()

    def forward(self, x, cos, sin):
        x = x + F.dropout(self.attn(self.norm1(x), cos, sin), DROPOUT, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), DROPOUT, self.training)


class GPT(nn.Module):
    cos: torch.Tensor  # rotary tables (BLOCK_SIZE, head size / 2): buffers, so they follow .to(device)
    sin: torch.Tensor

    def __init__(self, vocab_size):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.norm_f = nn.RMSNorm(N_EMBD)
        self.head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        half = N_EMBD // N_HEAD // 2
        angles = torch.outer(torch.arange(BLOCK_SIZE), ROPE_BASE ** (-torch.arange(half) / half))
        self.register_buffer("cos", angles.cos(), persistent=False)  # (BLOCK_SIZE, D/2)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx, targets=None):
        T = idx.size(1)
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def learning_rate(step, progress):
    """Linear warm-up over the first steps, cosine decay over the budget (progress in [0, 1])."""
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return warmup * LEARNING_RATE * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)


def main():
    device, seed = setup()
    data = prepare()
    budget = budget_from_env(device)
    model = GPT(data.vocab_size).to(device)
    budget.attach(model)  # counts the parameters: a FLOPs budget charges 6 x parameters for every token
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=BETAS, fused=device == "cuda")
    train_model = torch.compile(model) if device == "cuda" else model
    batches = Batches(data, BATCH_SIZE, BLOCK_SIZE, device, budget, seed)
    progress = Progress(budget, device)
    step = 0
    while not budget.done():
        lr = learning_rate(step, budget.fraction())
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.next()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = train_model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        step += 1
        if step % LOG_EVERY == 0 or budget.done():
            value = loss.item()
            # Finite but exploding: 100 is far past ln(8192) = 9.0, the loss of a uniform guess.
            if not math.isfinite(value) or value > 100:
                print(f"FAIL: loss is {value} at step {step}", flush=True)
                sys.exit(1)
            progress.log(step, value, lr)
    summary = evaluate_and_report(model, data, budget, BLOCK_SIZE, device, seed, step)
    print("---")
    for key, value in summary.items():
        print(f"{key + ':':<18}{value}")


if __name__ == "__main__":
    main()
