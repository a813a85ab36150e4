"""A small GPT trained for a fixed budget and scored in bits per byte."""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import Batches, Progress, budget_from_env, evaluate_and_report, prepare, setup

# Hyperparameters. The agent may edit anything in this file; prepare.py is frozen.
N_LAYER = 2
N_HEAD = 4
N_EMBD = 128
BLOCK_SIZE = 128  # context length
BATCH_SIZE = 16
LEARNING_RATE = 2e-3  # peak
WARMUP_FRACTION = 0.03  # of the budget
MIN_LR_FRACTION = 0.1  # of the peak
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
LOG_EVERY = 25  # steps


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.down = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(N_EMBD)
        self.attn = CausalSelfAttention()
        self.ln2 = nn.LayerNorm(N_EMBD)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, N_EMBD)
        self.pos_emb = nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx, targets=None):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def learning_rate(progress):
    if progress < WARMUP_FRACTION:
        # + 1e-3: the first step comes at progress ~0, where a plain ramp would give it a rate of ~0
        return LEARNING_RATE * (progress + 1e-3) / WARMUP_FRACTION
    decay = (progress - WARMUP_FRACTION) / max(1e-9, 1 - WARMUP_FRACTION)
    return LEARNING_RATE * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * decay)))


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
    start = budget.fraction()  # start-up has spent part of a wall or CPU budget: schedule the rest
    step = 0
    while not budget.done():
        lr = learning_rate((budget.fraction() - start) / max(1e-9, 1 - start))
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
            # Finite but exploding: 100 is far past ln(256) = 5.5, the loss of a uniform guess.
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
