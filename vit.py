"""One readable Vision Transformer whose attention dropout is any mode of dropkey.py.

Patch embedding (a strided conv) -> class token + learned position embedding
-> `depth` pre-norm blocks (attention through `dropkey.attention`, then MLP)
-> LayerNorm -> linear head on the class token. The drop ratio of block i is
`model.layer_ratios[i]`, from `dropkey.layer_drop_ratios` (Sec. 3.2, Table 1).

Evaluation extras used by the paper's experiments:
  model(x, return_attention=True)  -> logits and every layer's weights (Fig. 4, 5)
  model(x, drop_patches=0.5)       -> half the patch tokens removed (Table 3)
  model.mc_samples = T             -> Monte-Carlo Align Expectation in eval (Table 4)
  model.align = "exact"            -> its T -> infinity limit in closed form (dropkey.expected_weights)
Both go through `dropkey.aligned_attention`; training goes through `dropkey.attention`.
"""
import torch
import torch.nn as nn

import dropkey


class Attention(nn.Module):
    """Multi-head self-attention; the dropout of `mode` happens inside `dropkey.attention`."""

    def __init__(self, dim, heads, mode, drop_ratio, grid, block_size):
        super().__init__()
        self.heads, self.mode, self.drop_ratio = heads, mode, drop_ratio
        self.grid, self.block_size = grid, block_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self):
        return f"heads={self.heads}, mode={self.mode!r}, drop_ratio={self.drop_ratio:.3g}"

    def forward(self, x, return_weights=False, mc_samples=0, align="none"):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)   # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                              # 3 x (B, H, N, D)
        grid = self.grid if N == 1 + self.grid[0] * self.grid[1] else None  # None once patches are removed
        structure = dict(grid=grid, prefix_tokens=1, block_size=self.block_size,
                         return_weights=return_weights)
        if not self.training and self.mode != "none" and (mc_samples > 0 or align == "exact"):
            result = dropkey.aligned_attention(q, k, v, drop_ratio=self.drop_ratio, mode=self.mode,
                                               mc_samples=mc_samples, **structure)  # Table 4
        else:
            result = dropkey.attention(q, k, v, drop_ratio=self.drop_ratio, mode=self.mode,
                                       training=self.training, **structure)
        out, weights = result if return_weights else (result, None)
        out = out.transpose(1, 2).reshape(B, N, C)                        # (B, N, C)
        return self.proj(out), weights


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, mlp_ratio, mode, drop_ratio, grid, block_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, mode, drop_ratio, grid, block_size)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, return_weights=False, mc_samples=0, align="none"):
        attn_out, weights = self.attn(self.norm1(x), return_weights, mc_samples, align)
        x = x + attn_out                                                  # (B, N, C)
        x = x + self.mlp(self.norm2(x))                                   # (B, N, C)
        return x, weights


class ViT(nn.Module):
    """Vision Transformer with a configurable attention-dropout mode.

    attn_drop_mode: one of dropkey.MODES; drop_ratio: d of the schedule;
    schedule: constant / increasing / decreasing (Sec. 3.2); block_size: s of
    the structured modes. The patch grid is (image_size / patch_size)^2 and
    the class token is token 0.
    """

    def __init__(self, *, image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=192,
                 depth=6, heads=3, mlp_ratio=2.0, attn_drop_mode="dropkey", drop_ratio=0.3,
                 schedule="decreasing", block_size=3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if attn_drop_mode not in dropkey.MODES:
            raise ValueError(f"unknown attn_drop_mode {attn_drop_mode!r}; "
                             f"choose one of {', '.join(dropkey.MODES)}")
        side = image_size // patch_size
        self.grid = (side, side)
        if attn_drop_mode in dropkey.STRUCTURED_MODES and not 1 <= block_size <= side:
            raise ValueError(f"block_size must be between 1 and {side} for a {side}x{side} patch grid, "
                             f"got {block_size}")
        self.layer_ratios = dropkey.layer_drop_ratios(drop_ratio, depth, schedule)
        self.mc_samples = 0  # > 0: Monte-Carlo Align Expectation at evaluation (Table 4)
        self.align = "none"  # "exact": the exact expectation at evaluation (dropkey.expected_weights)

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, attn_drop_mode, ratio, self.grid, block_size)
            for ratio in self.layer_ratios)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x, return_attention=False, drop_patches=0.0):
        """x (B, 3, H, W) -> logits (B, num_classes) [, list of (B, heads, N, N) per layer]."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                # (B, P, C), P patches
        x = x + self.pos_embed[:, 1:]                                     # (B, P, C)
        if drop_patches > 0:
            x = remove_patches(x, drop_patches)                           # (B, P', C)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)                                    # (B, N, C)
        attention = []
        for block in self.blocks:
            x, weights = block(x, return_attention, self.mc_samples, self.align)
            attention.append(weights)
        logits = self.head(self.norm(x[:, 0]))                            # (B, num_classes)
        return (logits, attention) if return_attention else logits


def remove_patches(x, fraction):
    """Keep a random subset of round((1 - fraction) * P) >= 1 patch tokens per image (Table 3)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"drop_patches must be in [0, 1), got {fraction!r}")
    B, P, C = x.shape
    n_keep = max(1, round((1.0 - fraction) * P))
    order = torch.rand(B, P, device=x.device).argsort(dim=1)[:, :n_keep]  # (B, P') random subset
    order = order.sort(dim=1).values                                      # keep the original order
    return x.gather(1, order.unsqueeze(-1).expand(B, n_keep, C))          # (B, P', C)


def cls_attention_entropy(weights):
    """Entropy E = -sum_j p_j log p_j of the class token's attention, mean over heads (Fig. 4).

    weights: (B, H, N, N) of one layer -> (B,). Row 0 is the class token's query.
    """
    p = weights[:, :, 0].float()                                          # (B, H, N)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)               # (B,)


def time_rounds(fns, runs, device, first=None):
    """Wall times in ms of every fn of the dict `fns`, {name: [ms per round]}, after 3 warm-ups each.

    Each round calls every fn once, in a fresh random order, so a drift of the
    machine hits every row alike. `first`: a dict that gets each fn's first
    call (ms), which may include one-time costs.
    """
    import random
    import time
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for name, fn in fns.items():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if first is not None:
            first[name] = (time.perf_counter() - start) * 1e3
        for _ in range(2):
            fn()
    times = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(runs):
        for name in order.sample(list(fns), len(fns)):
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def median(xs):
    return sorted(xs)[len(xs) // 2]


def paired_ratio(times, base):
    """Median over rounds of time / base time in the same round: steadier than a ratio of medians."""
    return median([t / b for t, b in zip(times, base)])


def benchmark_step(patch_size=4, batch=128, runs=10, device="cpu"):
    """Images/s of one training step (forward, backward, AdamW) per mode, timed round-robin.

    "none, 2nd copy" is the none model again: its ratio to none is the
    resolution of the "x none" column on this machine.
    """
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for name in ["none", "none, 2nd copy", "vanilla", "dropkey"]:
        torch.manual_seed(0)
        model = ViT(patch_size=patch_size, attn_drop_mode=name.split(",")[0]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[name] = step
    times = time_rounds(steps, runs, device)
    print(f"training step of the default ViT, patch {patch_size} (N = {(32 // patch_size) ** 2 + 1}), "
          f"batch {batch}, {device}, {runs} rounds")
    print(f"{'mode':<16}{'images/s':>10}{'step ms':>10}{'x none':>8}")
    for name, ts in times.items():
        print(f"{name:<16}{batch / median(ts) * 1e3:10.1f}{median(ts):10.1f}"
              f"{paired_ratio(ts, times['none']):8.3f}")
    return times


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Print the default ViT, or time its training step per mode.")
    parser.add_argument("--benchmark", action="store_true", help="time a training step per mode")
    parser.add_argument("--patch-size", type=int, default=4, help="with --benchmark: 4 (N = 65), 2 (N = 257)")
    parser.add_argument("--runs", type=int, default=10, help="with --benchmark: rounds")
    args = parser.parse_args()
    if args.benchmark:
        benchmark_step(args.patch_size, runs=args.runs, device="cuda" if torch.cuda.is_available() else "cpu")
        raise SystemExit
    torch.manual_seed(0)
    model = ViT()
    print(model)
    print(f"\nparameters: {sum(p.numel() for p in model.parameters()):,}")
    for schedule in dropkey.SCHEDULES:
        ratios = dropkey.layer_drop_ratios(0.3, len(model.blocks), schedule)
        print(f"{schedule:>10} drop ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    model.eval()
    with torch.no_grad():
        _, attention = model(torch.randn(8, 3, 32, 32), return_attention=True)
    uniform = torch.log(torch.tensor(float(attention[0].shape[-1]))).item()
    print(f"class-token attention entropy per layer, untrained model, 8 random images "
          f"(uniform over {attention[0].shape[-1]} keys = {uniform:.3f}):")
    print("  " + ", ".join(f"{cls_attention_entropy(w).mean().item():.3f}" for w in attention))
