"""DropKey and every other attention-dropout mode of the paper, in one function.

Li et al., "DropKey for Vision Transformer", CVPR 2023. This file holds:

  1. `layer_drop_ratios`  -- how much to drop in each layer (Sec. 3.2, Table 1).
  2. `bernoulli_mask`, `sample_keep_mask` -- which keys to drop: independent
     per query (DropKey, Eq. 12), or in s x s blocks / crosses of the patch
     grid (DropKey-Block and DropKey-Cross, Sec. 3.2, Fig. 2, Table 2).
  3. `attention` -- one attention op for every mode: plain, vanilla dropout
     on the weights, DropAttention (Eq. 1), DropKey (Eq. 12-14), and the
     Monte-Carlo "Align Expectation" at evaluation (Sec. 3.2, Table 4).

Read top to bottom. `attention` has two paths that give the same numbers:
an explicit one (logits, mask, softmax, @ v) that a debugger can step through,
and a fused one (`scaled_dot_product_attention`) used where it is exact and
faster. Set `dropkey.FUSED = False` (or pass `fused=False`) to always take the
explicit path.

The one rule every dropping mode shares: a query row whose keys are *all*
dropped keeps all its keys instead (`fall_back`). The paper's Eq. 1 is 0/0
there and Algorithm 1's finite -1e12 silently turns such a row into a uniform
one; we fall back to the row's undropped weights (p for the re-normalising
modes, p / (1 - d) for vanilla, i.e. what that mode does with a kept key).
"""
import math

import torch
import torch.nn.functional as F

MODES = ("none", "vanilla", "dropattention", "dropkey", "dropkey_block", "dropkey_cross")
DROPPING_MODES = MODES[1:]
STRUCTURED_MODES = ("dropkey_block", "dropkey_cross")
MASK_BEFORE_SOFTMAX = ("dropkey",) + STRUCTURED_MODES  # Eq. 12-14: -inf on the logits
SCHEDULES = ("constant", "increasing", "decreasing")
FUSED = True  # False: always take the explicit path (for stepping through in a debugger)


# ----------------------------------------------------------------------------- schedules

def layer_drop_ratios(drop_ratio, depth, schedule="decreasing"):
    """Drop ratio of every layer, a list of `depth` floats (Sec. 3.2, Table 1).

    constant:   d in every layer.
    decreasing: the paper's Scheduled-down, linear from d in the first layer
                to 0 in the last, d * (depth - 1 - i) / (depth - 1).
    increasing: its exact reverse, linear from 0 in the first layer to d.
    We end the line at 0 (not at some d_min) so that both schedules have the
    same mean ratio d / 2 and differ only in where the dropping happens.
    A single layer gets d under every schedule.
    """
    _check_ratio(drop_ratio)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    if schedule == "constant" or depth == 1:
        return [float(drop_ratio)] * depth
    ratios = [drop_ratio * (depth - 1 - i) / (depth - 1) for i in range(depth)]
    return ratios if schedule == "decreasing" else ratios[::-1]


# ----------------------------------------------------------------------------- masks

def bernoulli_mask(shape, prob, *, device=None, generator=None):
    """Boolean tensor of `shape`, each element True with probability `prob`.

    Fast and exact enough: one random 64-bit word gives four 16-bit uniforms,
    each compared with a threshold, so the probability is `prob` rounded to a
    1/65536 grid (error <= 7.6e-6, far inside a 4-sigma bound for any sample
    that fits in memory; a 1/256 grid would not be). This is ~4x faster than
    `torch.rand(shape) < prob` and ~8x faster than `torch.bernoulli`.
    """
    numel = math.prod(shape)
    if prob <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if prob >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2**63, None, generator=generator)  # all 64 bits random (plain random_() gives 63)
    uniform16 = words.view(torch.int16)[:numel]       # uniform on [-32768, 32767]
    threshold = round(prob * 65536) - 32768
    return (uniform16 < threshold).view(shape)


def _dilate(x, s, dim):
    """Boolean OR-dilation along `dim`: out[i] = any(x[i-s+1 .. i]); length grows by s - 1."""
    shape = list(x.shape)
    shape[dim] += s - 1
    out = x.new_zeros(shape)
    for offset in range(s):  # a loop over the window, never over tokens
        out.narrow(dim, offset, x.shape[dim]).logical_or_(x)
    return out


def seed_rate(mode, drop_ratio, grid, block_size):
    """Rate gamma at which seeds are sampled on the valid seed region (Sec. 3.2).

    block: gamma = d / s^2            * n_h n_w / ((n_h - s + 1)(n_w - s + 1))
    cross: gamma = d / (s (n_h + n_w - s)) * n_h n_w / ((n_h - s + 1)(n_w - s + 1))
    Each seed drops s^2 (block) or s (n_h + n_w - s) (cross) keys, so without
    overlaps the expected drop rate is d; overlaps make it a little lower (the
    paper calls these formulas "only the approximation"). Capped at 1.
    """
    n_h, n_w = grid
    s = block_size
    valid = (n_h - s + 1) * (n_w - s + 1)
    per_seed = s * s if mode == "dropkey_block" else s * (n_h + n_w - s)
    return min(1.0, drop_ratio / per_seed * n_h * n_w / valid)


def _structured_drop(lead, mode, drop_ratio, grid, block_size, device, generator):
    """Dropped keys on the patch grid, (*lead, n_h * n_w), for DropKey-Block or -Cross."""
    n_h, n_w = grid
    s = block_size
    gamma = seed_rate(mode, drop_ratio, grid, block_size)
    seeds = bernoulli_mask((*lead, n_h - s + 1, n_w - s + 1), gamma,
                           device=device, generator=generator)        # (*lead, n_h-s+1, n_w-s+1)
    if mode == "dropkey_block":  # each seed drops the s x s window below-right of it
        drop = _dilate(_dilate(seeds, s, -2), s, -1)                   # (*lead, n_h, n_w)
    else:                        # each seed drops s full rows and s full columns
        rows = _dilate(seeds.any(-1), s, -1)                           # (*lead, n_h)
        cols = _dilate(seeds.any(-2), s, -1)                           # (*lead, n_w)
        drop = rows.unsqueeze(-1) | cols.unsqueeze(-2)                 # (*lead, n_h, n_w)
    return drop.flatten(-2)                                            # (*lead, n_h * n_w)


def sample_keep_mask(shape, mode="dropkey", drop_ratio=0.0, *, grid=None, prefix_tokens=1,
                     block_size=3, device=None, generator=None):
    """Sample a keep mask (True = key kept) of `shape` = (B, H, N, N) for `mode`.

    Every (batch, head, query) row gets its own independent mask: the paper
    "generate[s] masked key map for each query" (Sec. 3.2).
      vanilla, dropattention, dropkey: each key dropped with probability d (Eq. 12).
      dropkey_block, dropkey_cross: seeds on the n_h x n_w patch grid, each
        dropping an s x s window or s full rows and columns (Fig. 2). The first
        `prefix_tokens` keys (the class token) are not on the grid: each is
        dropped independently with probability d, as in plain DropKey, so
        every key is dropped at a rate close to d.
    The all-dropped rule is *not* applied here (see `fall_back`), so that the
    raw mask can be inspected.
    """
    *lead, n_keys = shape
    if mode not in STRUCTURED_MODES:
        return ~bernoulli_mask(shape, drop_ratio, device=device, generator=generator)
    _check_grid(grid, n_keys, prefix_tokens, block_size)
    prefix_drop = bernoulli_mask((*lead, prefix_tokens), drop_ratio, device=device, generator=generator)
    grid_drop = _structured_drop(lead, mode, drop_ratio, grid, block_size, device, generator)
    return ~torch.cat([prefix_drop, grid_drop], dim=-1)                # (B, H, N, N)


def fall_back(keep):
    """A row with no kept key keeps every key: no NaN, the row's undropped weights."""
    return keep | ~keep.any(dim=-1, keepdim=True)                      # (B, H, N, N)


# ----------------------------------------------------------------------------- attention

def dropped_weights(logits, keep, mode, drop_ratio):
    """Attention weights after `mode`'s drop, given logits and a keep mask, (B, H, N, N).

    dropkey (and -block, -cross), Eq. 12-14: d_j = -inf on the logits, then softmax.
    dropattention, Eq. 1: p = softmax(logits), zero the dropped p_j, re-normalise.
    vanilla: p = softmax(logits), zero the dropped p_j, scale by 1 / (1 - d).
    `keep` must already have been through `fall_back`.
    """
    if mode in MASK_BEFORE_SOFTMAX:
        masked = logits.masked_fill(~keep, float("-inf"))              # Eq. 12: d_j in {0, -inf}
        return masked.softmax(dim=-1)                                  # Eq. 14
    p = logits.softmax(dim=-1)                                         # Eq. 2
    kept = p.masked_fill(~keep, 0.0)                                   # d_j p_j, d_j in {0, 1}
    if mode == "vanilla":
        return kept / (1.0 - drop_ratio)                               # rows no longer sum to 1
    total = kept.sum(dim=-1, keepdim=True)                             # (B, H, N, 1)
    return torch.where(total > 0, kept / total, p)                     # Eq. 1 (p if every kept p_j underflowed)


def _use_fused(q, fused):
    """Fused SDPA where it is faster; the explicit softmax wins for short sequences on CPU."""
    fused = FUSED if fused is None else fused
    return fused and (q.device.type != "cpu" or q.shape[-2] > 128)


def attention(q, k, v, mode="dropkey", drop_ratio=0.0, training=True, *, grid=None,
              prefix_tokens=1, block_size=3, keep_mask=None, mc_samples=0, generator=None,
              return_weights=False, fused=None):
    """Scaled dot-product attention with the attention dropout of `mode`.

    Args:
      q, k, v: (B, H, N, D). mode: one of MODES. drop_ratio: d in [0, 1).
      training: drop only when True; at evaluation every mode is plain
        attention softmax(q k^T / sqrt(D)) v, unless `mc_samples` = T > 0 with
        a dropping mode: then the dropped, re-normalised weights are averaged
        over T independent masks and multiplied with v (Monte-Carlo Align
        Expectation, Table 4). That average runs without autograd.
      grid: (n_h, n_w) patch grid, required by dropkey_block / dropkey_cross;
        prefix_tokens: tokens before the grid (the class token);
        block_size: s, window size of the structured modes.
      keep_mask: bool, (B, H, N, N) or broadcastable, True = kept; replaces
        sampling (training only), so two modes can run on one mask.
      generator: torch.Generator for the masks. return_weights: also return
        the weights multiplied with v. fused: None follows `dropkey.FUSED`.
    Returns:
      out (B, H, N, D), or (out, weights (B, H, N, N)) with return_weights.
    """
    _check_inputs(q, k, v, mode, drop_ratio, mc_samples)
    if keep_mask is not None and (mode == "none" or not training):
        raise ValueError("keep_mask is only used by a dropping mode in training")
    B, H, N, D = q.shape
    sample = dict(grid=grid, prefix_tokens=prefix_tokens, block_size=block_size,
                  device=q.device, generator=generator)
    dropping = mode != "none" and (keep_mask is not None or (training and drop_ratio > 0))
    if not training and mode != "none" and mc_samples > 0:
        return _monte_carlo(q, k, v, mode, drop_ratio, mc_samples, sample, return_weights)
    if dropping:
        keep = keep_mask if keep_mask is not None else sample_keep_mask((B, H, N, N), mode, drop_ratio, **sample)
        keep = fall_back(keep.expand(B, H, N, N))                      # (B, H, N, N)
    if _use_fused(q, fused) and not return_weights and (not dropping or mode in MASK_BEFORE_SOFTMAX):
        # Exact: SDPA's boolean attn_mask is the -inf of Eq. 12 (True = take part).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep if dropping else None)
    logits = (q @ k.transpose(-2, -1)) * D ** -0.5                     # (B, H, N, N)
    if dropping:
        weights = dropped_weights(logits, keep, mode, drop_ratio)      # (B, H, N, N)
    else:
        weights = logits.softmax(dim=-1)                               # Eq. 2
    out = weights @ v                                                  # (B, H, N, D), Eq. 13
    return (out, weights) if return_weights else out


@torch.no_grad()
def _monte_carlo(q, k, v, mode, drop_ratio, samples, sample, return_weights):
    """Average the dropped weights over `samples` masks, then @ v (Align Expectation, Sec. 3.2).

    One mask at a time: memory does not grow with the number of samples.
    """
    B, H, N, D = q.shape
    logits = (q @ k.transpose(-2, -1)) * D ** -0.5                     # (B, H, N, N)
    total = torch.zeros_like(logits, dtype=torch.float32)
    for _ in range(samples):
        keep = fall_back(sample_keep_mask(logits.shape, mode, drop_ratio, **sample))
        total += dropped_weights(logits, keep, mode, drop_ratio)
    weights = (total / samples).to(v.dtype)                            # estimate of c_j p_j (Eq. 3)
    out = weights @ v                                                  # (B, H, N, D)
    return (out, weights) if return_weights else out


# ----------------------------------------------------------------------------- checks

def _check_ratio(drop_ratio):
    if not (isinstance(drop_ratio, (int, float)) and 0.0 <= drop_ratio < 1.0):
        raise ValueError(f"drop_ratio must be a number in [0, 1), got {drop_ratio!r}")


def _check_grid(grid, n_keys, prefix_tokens, block_size):
    if grid is None:
        raise ValueError("dropkey_block and dropkey_cross need grid=(n_h, n_w), the patch grid")
    if len(grid) != 2 or grid[0] * grid[1] != n_keys - prefix_tokens:
        raise ValueError(f"grid {tuple(grid)} does not match {n_keys} tokens with "
                         f"prefix_tokens={prefix_tokens}: need n_h * n_w == {n_keys - prefix_tokens}")
    if not 1 <= block_size <= min(grid):
        raise ValueError(f"block_size must be between 1 and {min(grid)} for grid {tuple(grid)}, got {block_size}")


def _check_inputs(q, k, v, mode, drop_ratio, mc_samples):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    _check_ratio(drop_ratio)
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must all be (B, H, N, D) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(mc_samples, int) or mc_samples < 0:
        raise ValueError(f"mc_samples must be a non-negative integer, got {mc_samples!r}")
