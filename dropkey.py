"""DropKey and every other attention-dropout mode of the paper, in one function.

Li et al., "DropKey for Vision Transformer", CVPR 2023. This file holds:

  1. `layer_drop_ratios`  -- how much to drop in each layer (Sec. 3.2, Table 1).
  2. `bernoulli_mask`, `sample_keep_mask` -- which keys to drop: independent
     per query (DropKey, Eq. 12), or in s x s blocks / crosses of the patch
     grid (DropKey-Block and DropKey-Cross, Sec. 3.2, Fig. 2, Table 2).
  3. `attention` -- one attention op for every mode: plain, vanilla dropout
     on the weights, DropAttention (Eq. 1), DropKey (Eq. 12-14), and the
     Monte-Carlo "Align Expectation" at evaluation (Sec. 3.2, Table 4).
  4. `expected_weights` -- the exact expectation c_j p_j of Eq. 3, i.e. the
     Monte-Carlo average with infinitely many masks (`align="exact"`).

Read top to bottom. `attention` has two paths that give the same numbers:
an explicit one (logits, mask, softmax, @ v) that a debugger can step through,
and a fused one (`scaled_dot_product_attention`) used where it is exact and
faster: plain attention, DropKey and its structured variants, and
DropAttention, whose re-normalised weights (Eq. 1) are the masked softmax of
Eq. 14. Vanilla dropout's rows do not sum to 1: it is always explicit. Set
`dropkey.FUSED = False` (or pass `fused=False`) to always take the explicit
path.

The one rule every dropping mode shares: a query row whose keys are *all*
dropped keeps all its keys instead (`fall_back`). The paper's Eq. 1 is 0/0
there and Algorithm 1's finite -1e12 silently turns such a row into a uniform
one; we fall back to the row's undropped weights (p for the re-normalising
modes, p / (1 - d) for vanilla, i.e. what that mode does with a kept key).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("none", "vanilla", "dropattention", "dropkey", "dropkey_block", "dropkey_cross")
DROPPING_MODES = MODES[1:]
STRUCTURED_MODES = ("dropkey_block", "dropkey_cross")
MASK_BEFORE_SOFTMAX = ("dropkey",) + STRUCTURED_MODES  # Eq. 12-14: -inf on the logits
RENORMALISING = ("dropattention",) + MASK_BEFORE_SOFTMAX  # rows sum to 1: one masked softmax (Eq. 1 = 14)
SCHEDULES = ("constant", "increasing", "decreasing")
FUSED = True  # False: always take the explicit path (for stepping through in a debugger)
MASK_CHUNK = 2**21  # mask elements sampled, or given to the flash kernel, at a time (8 MiB as float32)


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

def _random_words(device, generator):
    """A function count -> `count` random int64 words, all 64 bits random.

    On CPU the bits come from numpy's SFC64, seeded from torch's generator (so
    torch.manual_seed and `generator` still fix every mask): measured 2-4x
    faster here than torch's CPU generator (mt19937, one core). Elsewhere
    torch's own generator, given the full int64 range (plain random_() gives
    only 63 random bits).
    """
    if torch.device(device or "cpu").type == "cpu":
        seed = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
        sfc64 = np.random.SFC64(seed)
        return lambda count: torch.from_numpy(sfc64.random_raw(count).view(np.int64))
    return lambda count: torch.empty(count, dtype=torch.int64, device=device).random_(
        -2**63, None, generator=generator)


def bernoulli_mask(shape, prob, *, device=None, generator=None):
    """Boolean tensor of `shape`, each element True with probability `prob`.

    Fast and exact enough: one random 64-bit word gives four 16-bit uniforms,
    each compared with a threshold, so the probability is `prob` rounded to a
    1/65536 grid (error <= 7.6e-6, far inside a 4-sigma bound for any sample
    that fits in memory; a 1/256 grid would not be). This is ~8x faster than
    `torch.rand(shape) < prob`. Done MASK_CHUNK elements at a time, so the
    random words stay in cache, and compared in place (`lt_`: ~3x faster than
    `<` on CPU).
    """
    numel = math.prod(shape)
    if prob <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if prob >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    threshold = round(prob * 65536) - 32768
    draw = _random_words(device, generator)
    mask = torch.empty(numel, dtype=torch.bool, device=device)
    for a in range(0, numel, MASK_CHUNK):  # chunks of the flat mask, never a loop over tokens
        b = min(a + MASK_CHUNK, numel)
        uniform16 = draw((b - a + 3) // 4).view(torch.int16)[:b - a]  # uniform on [-32768, 32767]
        mask[a:b] = uniform16.lt_(threshold)                           # 1 where uniform16 < threshold
    return mask.view(shape)


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
    overlaps the expected drop rate is d; overlaps make the mean lower (the
    paper calls these formulas "only the approximation"), and a key's own rate
    depends on where it sits (`key_drop_rates`). Capped at 1.
    """
    n_h, n_w = grid
    s = block_size
    valid = (n_h - s + 1) * (n_w - s + 1)
    per_seed = s * s if mode == "dropkey_block" else s * (n_h + n_w - s)
    return min(1.0, drop_ratio / per_seed * n_h * n_w / valid)


def key_drop_rates(mode, drop_ratio, grid, block_size=3):
    """Exact probability that each patch key is dropped, an (n_h, n_w) float64 tensor.

    dropkey, dropattention, vanilla: d for every key (Eq. 12); none: 0.
    dropkey_block / dropkey_cross: seeds are drawn at rate gamma = `seed_rate`
    on the (n_h - s + 1) x (n_w - s + 1) valid region only (DropBlock's rule),
    independently, so a key covered by m possible seeds is dropped with

      P(dropped) = 1 - (1 - gamma)^m.

    With r(i) = #{a valid: a <= i <= a + s - 1} = min(i, n_h - s) - max(0, i - s + 1) + 1
    the seeds whose window covers key (i, j) number m = r(i) r(j) (block);
    a cross covers it when its rows or its columns do, m = r(i) (n_w - s + 1)
    + (n_h - s + 1) r(j) - r(i) r(j). A corner key has r = 1, a centre key up
    to s: the rate is far from uniform, and its mean over the grid is below d.
    The class token (not on the grid) is dropped at d in every mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    _check_ratio(drop_ratio)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(n, int) and n >= 1 for n in grid)):
        raise ValueError(f"grid must be (n_h, n_w), two positive integers, got {grid!r}")
    n_h, n_w = grid
    if mode not in STRUCTURED_MODES:
        return torch.full((n_h, n_w), 0.0 if mode == "none" else float(drop_ratio), dtype=torch.float64)
    s = block_size
    if not (isinstance(s, int) and 1 <= s <= min(grid)):
        raise ValueError(f"block_size must be between 1 and {min(grid)} for grid {tuple(grid)}, got {s!r}")

    def reach(n):  # r(i): valid seed positions whose s rows (or columns) contain i
        i = torch.arange(n, dtype=torch.float64)
        return (torch.clamp(i, max=n - s) - torch.clamp(i - s + 1, min=0) + 1)

    r_h, r_w = reach(n_h)[:, None], reach(n_w)[None, :]               # (n_h, 1), (1, n_w)
    if mode == "dropkey_block":
        covering = r_h * r_w                                          # (n_h, n_w)
    else:
        covering = r_h * (n_w - s + 1) + (n_h - s + 1) * r_w - r_h * r_w
    gamma = seed_rate(mode, drop_ratio, grid, block_size)
    return 1 - (1 - gamma) ** covering                                # (n_h, n_w)


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
        dropped independently with probability d, as in plain DropKey. The
        grid keys are not: border keys less, centre keys more, the mean a
        little below d (`key_drop_rates`).
    The all-dropped rule is *not* applied here (see `fall_back`), so that the
    raw mask can be inspected.
    """
    *lead, n_keys = shape
    if mode not in STRUCTURED_MODES:  # each key kept with probability 1 - d
        return bernoulli_mask(shape, 1.0 - drop_ratio, device=device, generator=generator)
    _check_grid(grid, n_keys, prefix_tokens, block_size)
    prefix_drop = bernoulli_mask((*lead, prefix_tokens), drop_ratio, device=device, generator=generator)
    grid_drop = _structured_drop(lead, mode, drop_ratio, grid, block_size, device, generator)
    return ~torch.cat([prefix_drop, grid_drop], dim=-1)                # (B, H, N, N)


def fall_back(keep):
    """A row with no kept key keeps every key: no NaN, the row's undropped weights."""
    dead = keep.view(torch.uint8).amax(dim=-1, keepdim=True) == 0     # (B, H, N, 1); amax: 2-30x faster than any()
    return keep | dead if dead.any() else keep                         # (B, H, N, N)


# ----------------------------------------------------------------------------- attention

def dropped_weights(logits, keep, mode, drop_ratio):
    """Attention weights after `mode`'s drop, given logits and a keep mask, (B, H, N, N).

    dropkey (and -block, -cross), Eq. 12-14: d_j = -inf on the logits, then softmax.
    dropattention, Eq. 1: p = softmax(logits), zero the dropped p_j, re-normalise.
    vanilla: p = softmax(logits), zero the dropped p_j, scale by 1 / (1 - d).
    `keep` must already have been through `fall_back`. If every kept p_j of a
    row underflows to 0 (kept logits ~100 below the row's largest in float32),
    Eq. 1 is 0/0 and dropattention keeps p; the fused path, which works on the
    logits like Eq. 14, still gets the re-normalised weights.
    """
    if mode in MASK_BEFORE_SOFTMAX:
        masked = torch.where(keep, logits, float("-inf"))              # Eq. 12: logits + d_j, d_j in {0, -inf}
        return masked.softmax(dim=-1)                                  # Eq. 14
    p = logits.softmax(dim=-1)                                         # Eq. 2
    kept = torch.where(keep, p, 0.0)                                   # d_j p_j, d_j in {0, 1}
    if mode == "vanilla":
        return kept / (1.0 - drop_ratio)                               # rows no longer sum to 1
    total = kept.sum(dim=-1, keepdim=True)                             # (B, H, N, 1)
    return torch.where(total > 0, kept / total, p)                     # Eq. 1 (p if every kept p_j underflowed)


def additive_mask(keep, dtype):
    """The mask D of Eq. 12 as numbers: 0 where kept, -inf where dropped, (B, H, N, N).

    Written as bits, ~8x faster on CPU than torch.where(keep, 0, -inf): a
    dropped key gets the bit pattern of -inf, a kept one that of +0.0.
    """
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    minus_inf = torch.tensor(float("-inf"), dtype=dtype).view(bits).item()  # 0xFF800000 for float32
    return (~keep).to(bits).mul_(minus_inf).view(dtype)                # 0 * pattern = +0.0


def _batch_slices(shape):
    """Slices of the batch of a (B, H, N, N) mask with at most MASK_CHUNK elements each (at least one row).

    Work on N x N tensors goes a slice at a time: a fresh allocation of more
    than 32 MiB is page-faulted in on every call (glibc hands it out by mmap).
    """
    B, *rest = shape
    rows = max(1, MASK_CHUNK // max(1, math.prod(rest)))
    return [slice(a, a + rows) for a in range(0, max(B, 1), rows)]


def _cat(parts):
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _FusedMaskedAttention(torch.autograd.Function):
    """SDPA's CPU flash kernel with a keep mask, keeping the *boolean* mask for backward.

    F.scaled_dot_product_attention turns a boolean mask into a float one and
    keeps that for backward (4 bytes per mask element); this keeps the
    boolean (1 byte) and rebuilds the float mask in backward. Same kernels,
    same outputs and gradients.

    The float mask is built for a slice of the batch at a time (`_batch_slices`):
    a small one stays in cache and is not page-faulted in on every call, which
    at N = 257 cost more than the kernel's own work with the mask.

    The all-dropped rule costs almost nothing here: the kernel returns a zero
    output and a log-sum-exp of exactly 0 for a row with every key masked,
    so only when some lse is 0 (or not finite) do we look for such rows in the
    mask (`fall_back`) and run the kernel again. At N = 65 and d = 0.3 an
    all-dropped row has probability 0.3^65 ~ 1e-34.
    """

    @staticmethod
    def _forward(q, k, v, keep):
        parts = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[s], k[s], v[s], 0.0, False, attn_mask=additive_mask(keep[s], q.dtype))
            for s in _batch_slices(keep.shape)]
        return _cat([out for out, _ in parts]), _cat([lse for _, lse in parts])  # (B, H, N, D), (B, H, N)

    @staticmethod
    def forward(ctx, q, k, v, keep):
        out, lse = _FusedMaskedAttention._forward(q, k, v, keep)
        if (lse == 0).any() or not lse.isfinite().all():               # maybe an all-dropped row
            keep = fall_back(keep)
            out, lse = _FusedMaskedAttention._forward(q, k, v, keep)
        ctx.save_for_backward(q, k, v, out, lse, keep)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, keep = ctx.saved_tensors
        parts = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out[s], q[s], k[s], v[s], out[s], lse[s], 0.0, False,
            attn_mask=additive_mask(keep[s], q.dtype)) for s in _batch_slices(keep.shape)]
        return (*(_cat(grads) for grads in zip(*parts)), None)      # dq, dk, dv, no grad for keep


def _sdpa(q, k, v, keep):
    """Fused attention; keep (bool, True = take part) is the -inf of Eq. 12, or None.

    Applies the all-dropped rule itself: SDPA would return zeros for such a row.
    """
    if keep is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        return _FusedMaskedAttention.apply(q, k, v, keep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if keep is None else fall_back(keep))


def _use_fused(fused):
    """fused=None follows dropkey.FUSED: SDPA measured faster here at N = 65 and 257 (README, Performance)."""
    return FUSED if fused is None else fused


def attention(q, k, v, mode="dropkey", drop_ratio=0.0, training=True, *, grid=None,
              prefix_tokens=1, block_size=3, keep_mask=None, mc_samples=0, align=None, generator=None,
              return_weights=False, fused=None):
    """Scaled dot-product attention with the attention dropout of `mode`.

    Args:
      q, k, v: (B, H, N, D). mode: one of MODES. drop_ratio: d in [0, 1).
      training: drop only when True; at evaluation every mode is plain
        attention softmax(q k^T / sqrt(D)) v, unless `mc_samples` = T > 0 with
        a dropping mode: then the dropped, re-normalised weights are averaged
        over T independent masks and multiplied with v (Monte-Carlo Align
        Expectation, Table 4). That average runs without autograd.
      align: None / "none", or "exact": at evaluation the weights become
        their exact expectation `expected_weights(p, d)` (the limit T -> inf
        of mc_samples, Eq. 3), without autograd. dropkey and dropattention
        drop keys independently and share it; vanilla's is p (1 + d^N / (1 - d)),
        p up to its all-dropped row; for dropkey_block / dropkey_cross it is
        not defined (ValueError: use mc_samples).
      grid: (n_h, n_w) patch grid, required by dropkey_block / dropkey_cross;
        prefix_tokens: tokens before the grid (the class token);
        block_size: s, window size of the structured modes.
      keep_mask: bool, (B, H, N, N) or broadcastable, True = kept; replaces
        sampling (training only), so two modes can run on one mask.
      generator: torch.Generator for the masks. return_weights: also return
        the weights multiplied with v. fused: True forces SDPA, False the
        explicit path, None picks the faster where exact (off if dropkey.FUSED
        is False).
    Returns:
      out (B, H, N, D), or (out, weights (B, H, N, N)) with return_weights.
    """
    _check_inputs(q, k, v, mode, drop_ratio, mc_samples, align)
    if keep_mask is not None and (mode == "none" or not training):
        raise ValueError("keep_mask is only used by a dropping mode in training")
    B, H, N, D = q.shape
    sample = dict(grid=grid, prefix_tokens=prefix_tokens, block_size=block_size,
                  device=q.device, generator=generator)
    dropping = mode != "none" and (keep_mask is not None or (training and drop_ratio > 0))
    if not training and mode != "none" and mc_samples > 0:
        return _monte_carlo(q, k, v, mode, drop_ratio, mc_samples, sample, return_weights)
    if not training and mode != "none" and align == "exact":
        if mode in STRUCTURED_MODES:
            raise ValueError(f"align='exact' is not defined for {mode}: its drops are not "
                             f"independent; use mc_samples=T instead")
        if drop_ratio > 0:
            return _exact(q, k, v, mode, drop_ratio, return_weights)
    keep = None                                                        # None: nothing dropped
    if dropping:
        keep = keep_mask if keep_mask is not None else sample_keep_mask((B, H, N, N), mode, drop_ratio, **sample)
        keep = keep.expand(B, H, N, N)                                 # (B, H, N, N)
    if _use_fused(fused) and not return_weights and (not dropping or mode in RENORMALISING):
        return _sdpa(q, k, v, keep)                                    # Eq. 12-14 (= Eq. 1), fused
    if dropping:
        keep = fall_back(keep)                                         # (B, H, N, N)
    parts = [_explicit(q[s], k[s], v[s], None if keep is None else keep[s], mode, drop_ratio)
             for s in _batch_slices((B, H, N, N))]                     # see _batch_slices
    out = _cat([out for out, _ in parts])                              # (B, H, N, D)
    return (out, _cat([weights for _, weights in parts])) if return_weights else out


def _explicit(q, k, v, keep, mode, drop_ratio):
    """Attention written out, (out (B, H, N, D), weights (B, H, N, N)); keep: None (no drop) or after fall_back."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5           # (B, H, N, N)
    if keep is None:
        weights = logits.softmax(dim=-1)                               # Eq. 2
    else:
        weights = dropped_weights(logits, keep, mode, drop_ratio)      # (B, H, N, N)
    return weights @ v, weights                                        # Eq. 13


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


# ----------------------------------------------------------------------------- exact expectation

# Trapezoid step h in y and the size below which the rest of the integral is
# dropped, per working precision (see `expected_weights`).
QUADRATURE = {torch.float64: (0.5, 1e-9), torch.float32: (0.6, 1e-7)}
_CHUNK = 2**20  # elements of one (rows, nodes, N) block: bounds memory (3 such tensors), few ops
LN2 = math.log(2)


def _nodes(h, k0, k1, y_lo, device=None):
    """Trapezoid nodes k0 .. k1-1 in y: t = exp(y - e^-y) and the weights h (dt/dy) / t."""
    y = y_lo + h * torch.arange(k0, k1, dtype=torch.float64, device=device)
    return torch.exp(y - torch.exp(-y)), h * (1 + torch.exp(-y))


def _first_node(h, tol):
    """First node y_lo, and `below`: the nodes under it summed in closed form.

    Below y_lo the integrand (without its factor 1 - d) is p_j (1 - a_j t + ...)
    with a_j <= 1, so the nodes there add p_j * sum(h dt/dy) = p_j * below,
    with an error under p_j * sum(h t dt/dy) <= p_j * tol.
    """
    for y_lo in torch.arange(-1.0, -4.0, -0.05).tolist():
        t, w = _nodes(h, -300, 0, y_lo)
        if (w * t * t).sum() <= tol:
            return y_lo, (w * t).sum().item()
    raise AssertionError("no first node found")


_FIRST = {dtype: _first_node(*QUADRATURE[dtype]) for dtype in QUADRATURE}


def _integrate(q, d, work, coefficient):
    """The integral of `expected_weights` for rows q (R, N) summing to 1, (R, N), in `work` precision.

    coefficient=False: I_j = int_0^inf p_j e^{-t p_j} prod_{i != j} f_i(t) dt, to an absolute error
    ~tol (what E[w_j] needs). coefficient=True: the same without the factor p_j, to a relative
    error ~tol (what c_j needs: its tail ~ d^{M-1} / p_j reaches out to t ~ 1 / p_j, so the
    nodes go on until t p_j >= 40 for every key, or until P(t) is below tol (1 - d) min p).
    f_i(t) = d + (1 - d) e^{-t p_i}; the nodes below y_lo are summed in closed form.
    """
    R, N = q.shape
    device = q.device
    h, tol = QUADRATURE[work]
    y_lo, below = _FIRST[work]
    # First block of nodes: where P(t) of a uniform row of 1 / sum(q^2) keys reaches tol.
    n_eff = 1.0 / torch.linalg.vecdot(q, q).double()                  # (R,), N for a uniform row
    level = torch.exp(math.log(tol / (1 - d)) / n_eff)                # the tol of one factor
    t_end = -torch.log((level - d).clamp(min=0) / (1 - d)) * n_eff    # inf for a peaked row
    first = ((t_end.log() - y_lo) / h + 1).nan_to_num(12, 12, 12).clamp(8, 12).ceil().int()
    t, w = _nodes(h, 0, int((700 - y_lo) / h), y_lo, device)          # every node up to t = e^700
    if coefficient:
        w = w * t                                                     # h dt/dy: no factor t p_j below
    t_exp2, w = -t / LN2, (w if coefficient else -LN2 * w)            # for exp2, 2x faster than exp
    q_max = q.max().item()
    integral = torch.empty_like(q)                                    # (R, N)
    d_t = torch.tensor(d, dtype=work, device=device)
    rows = max(1, _CHUNK // (12 * N))
    for a in range(0, R, rows):
        b = min(a + rows, R)
        idx, k0, k1 = None, 0, int(first[a:b].max())                  # idx: rows still integrating
        while True:
            t_last = t[k1 - 1].item()
            dtype = work if t_last < 1e30 else torch.float64          # t p overflows float32 beyond
            qb = (q[a:b] if idx is None else q[idx]).to(dtype)        # (r, N)
            x = qb[:, None, :] * t_exp2[k0:k1].to(dtype)[None, :, None]  # (r, K, N): -t p_i / ln 2
            if t_last * q_max > 80 and not coefficient:
                x.clamp_(min=-80 / LN2)                               # e^-80 counts as 0; no slow denormals
            u = x.exp2()                                              # e^{-t p_i}
            f = torch.add(d_t.to(dtype), u, alpha=1 - d)              # d + (1 - d) e^{-t p_i}
            P = f.prod(-1)                                            # (r, K), product over all keys
            if not coefficient:
                u.mul_(x)                                             # -t p_j e^{-t p_j} / ln 2
            u.div_(f)                                                 # ... / f_j: the j-th factor out
            part = torch.bmm((P * w[k0:k1].to(dtype))[:, None, :], u)  # (r, 1, N), sum over nodes
            if idx is None:
                integral[a:b] = part.squeeze(1)
            else:
                integral.index_add_(0, idx, part.squeeze(1).to(work))
            q_min = torch.where(qb > 0, qb, math.inf).amin(-1)        # (r,)
            if coefficient:  # the rest of c_j is <= P(t) / ((1 - d) p_j), or e^-40 of c_j
                more = (P[:, -1] > tol * (1 - d) ** 2 * q_min) & (t_last * q_min < 40)
            else:            # what is left is <= (1 - d) P, or e^-20 once all factors are at d
                more = (P[:, -1] > tol / (1 - d)) & (t_last * q_min < 20)
            if not more.any() or k1 == len(t):
                break
            idx = (torch.arange(a, b, device=device) if idx is None else idx)[more]
            k0, k1 = k1, min(k1 + 8, len(t))
    return integral.add_(torch.ones_like(q) if coefficient else q, alpha=below)


def _rows(weights, name):
    """weights (..., N) -> (R, N) rows re-normalised to sum 1, with one-line errors for bad input."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise ValueError(f"{name} needs a floating-point tensor of weights, got "
                         f"{weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__}")
    if weights.numel() == 0:
        return None, None                                             # nothing to check or compute
    p = weights.reshape(-1, weights.shape[-1])
    total = p.sum(-1, keepdim=True)                                   # (R, 1)
    if not ((p >= 0).all() and (total > 0).all() and total.isfinite().all()):
        raise ValueError(f"{name}: every row must be finite, non-negative and have a positive sum")
    return p, total


@torch.no_grad()
def expected_weights(weights=None, drop_ratio=0.0, *, logits=None):
    """Exact expectation of the DropKey weights of softmax rows `weights`: c_j p_j of Eq. 3.

    With keys kept independently, k_i ~ Bernoulli(1 - d), DropKey (Eq. 14) and
    DropAttention (Eq. 1) give w_j = k_j p_j / sum_i k_i p_i, and w = p when no
    key with p_i > 0 is kept (`fall_back`). Write 1 / s = int_0^inf e^{-ts} dt;
    the k_i are independent, so E[k_j e^{-t sum_i k_i p_i}] factorises and

      E[w_j] = (1 - d) p_j int_0^inf e^{-t p_j} prod_{i != j} (d + (1 - d) e^{-t p_i}) dt + d^M p_j

    exactly, M = #{i: p_i > 0}; c_j = E[w_j] / p_j (Eq. 3, `smoothing_coefficients`).
    Keys with p_j = 0 get 0 and do not count. This is the Monte-Carlo average
    of Table 4 in the limit of infinitely many masks. A row is re-normalised
    first (q = p / sum p), and the result is E[w] of q: it sums to 1.

    Weights versus logits. A weight that underflowed to 0 (a logit ~17 below
    the row's largest in float16, ~104 in float32) can no longer take part:
    that is DropAttention's rule (Eq. 1 drops zeros). DropKey's masked softmax
    (Eq. 14) still gives such a key weight when every larger key is dropped.
    Pass `logits=` (instead of weights) to follow DropKey: p = softmax(logits)
    is then formed in float32, and in float64 for the rows with a logit more
    than 80 below their largest, so that it underflows only ~745 below.

    Quadrature. The product over all keys, P(t), is formed once per node and
    the j-th factor divided out, so a node costs O(N) per row. With t =
    exp(y - e^{-y}) (Takahashi-Mori) the integrand is analytic in y, decays at
    both ends and stays bounded for |Im y| < ~pi / 2 (where Re t > 0), so the
    trapezoid rule in y with step h has error ~ exp(-pi^2 / h): against all
    2^N masks, 1.1e-7 at h = 0.5 (float64 input) and 2.2e-6 at h = 0.6 (other
    inputs, integrated in float32 at a quarter of the cost). As t -> 0 the
    integrand tends to (1 - d) p_j, so the nodes below y_lo are summed in
    closed form (`_first_node`). Nodes stop per row once P(t) <= tol / (1 - d),
    which bounds the rest of the integral by tol, or once t p_i >= 20 for
    every key (or at t = e^700: only weights below 1e-300 reach that far).
    A near-uniform row needs about 10 nodes; a peaked one more, growing with
    log(max p / min p), as the integrand reaches out to t ~ 1 / min p.

    Args: weights (..., N), non-negative rows (re-normalised here), floating
      point; or logits (..., N), keyword only; drop_ratio: d in [0, 1).
      Eval only: no gradient.
    Returns: E[w] of the same shape and dtype as weights (or logits).
    """
    _check_ratio(drop_ratio)
    d = float(drop_ratio)
    if (weights is None) == (logits is None):
        raise ValueError("expected_weights takes either weights or logits=, not both or neither")
    if logits is not None:
        return _expected_from_logits(logits, d)
    p, total = _rows(weights, "expected_weights")
    if p is None:
        return weights.clone()                                        # an empty tensor
    if d == 0:
        return (p / total).reshape(weights.shape)                     # nothing is dropped: E[w] = q
    work = torch.float64 if weights.dtype == torch.float64 else torch.float32
    q = p.to(work) / total.to(work)                                   # (R, N), rows sum to 1
    return _expected(q, d, work).to(weights.dtype).reshape(weights.shape)


def _expected(q, d, work):
    """E[w] of rows q (R, N) that sum to 1, in `work` precision (see `expected_weights`)."""
    M = (q > 0).sum(-1, keepdim=True)                                 # (R, 1) keys that can be kept
    out = _integrate(q, d, work, coefficient=False).mul_(1 - d)       # the integral term of E[w_j]
    return out.addcmul_(q, torch.tensor(d, dtype=work, device=q.device) ** M)  # + d^M q_j: all dropped


def _expected_from_logits(logits, d):
    """`expected_weights` of softmax(logits), following DropKey's masked softmax where weights underflow."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError("expected_weights needs floating-point logits")
    shape, N = logits.shape, logits.shape[-1]
    if d == 0 or logits.numel() == 0:
        return logits.softmax(-1)
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.reshape(-1, N)                                      # (R, N)
    deep = ((rows.amax(-1, keepdim=True) - rows) > 80).any(-1)        # (R,) a weight below ~1e-35
    if work == torch.float64 or not deep.any():
        return _expected(rows.to(work).softmax(-1), d, work).to(logits.dtype).reshape(shape)
    out = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
    out[deep] = _expected(rows[deep].double().softmax(-1), d, torch.float64)
    if not deep.all():
        out[~deep] = _expected(rows[~deep].float().softmax(-1), d, torch.float32).double()
    return out.to(logits.dtype).reshape(shape)


@torch.no_grad()
def smoothing_coefficients(weights, drop_ratio):
    """The smoothing coefficients c_j of Eq. 3 directly: E[w_j] = c_j p_j, (..., N).

    c_j = E[k_j / sum_i k_i p_i] (+ d^M, the all-dropped row falling back to p)
        = (1 - d) int_0^inf e^{-t p_j} prod_{i != j} (d + (1 - d) e^{-t p_i}) dt + d^M,

    the integral of `expected_weights` without its factor p_j. Dividing
    E[w_j] by p_j instead loses c_j for small p_j: E[w_j] is accurate to an
    absolute ~1e-7, and the term (1 - d) d^{M-1} / p_j (the masks that keep
    only key j) lies out at t ~ 1 / p_j, where that integration stops. Here
    the nodes run on until t p_j >= 40 for every key, in float64 whatever the
    input: relative error below 1e-7 (9.1e-8 measured against exact sums
    over binomial counts, the test's reference) for p_j down to 1e-300. A
    key with p_j = 0 gets +inf (the limit as p_j -> 0; its E[w_j] is 0); at
    d = 0 every c_j is 1.
    Rows are re-normalised first, as in `expected_weights`.

    Args: weights (..., N), non-negative floating-point rows; drop_ratio: d in [0, 1).
    Returns: c of the same shape and dtype as weights.
    """
    _check_ratio(drop_ratio)
    d = float(drop_ratio)
    p, total = _rows(weights, "smoothing_coefficients")
    if p is None or d == 0:
        return torch.ones_like(weights)                               # empty, or nothing is dropped
    q = p.double() / total.double()                                   # (R, N), rows sum to 1
    M = (q > 0).sum(-1, keepdim=True)                                 # (R, 1)
    c = _integrate(q, d, torch.float64, coefficient=True).mul_(1 - d).add_(d ** M.double())  # Eq. 3
    c = torch.where(q > 0, c, math.inf)                               # p_j = 0: c_j -> inf
    return c.to(weights.dtype).reshape(weights.shape)


@torch.no_grad()
def _exact(q, k, v, mode, drop_ratio, return_weights):
    """Exact Align Expectation: E[w] @ v, the limit of `_monte_carlo` as T -> infinity (Eq. 3)."""
    B, H, N, D = q.shape
    logits = (q @ k.transpose(-2, -1)) * D ** -0.5                     # (B, H, N, N)
    p = logits.softmax(dim=-1)                                         # Eq. 2
    if mode == "vanilla":  # E[k_j p_j / (1 - d)] = p_j, plus the all-dropped row's p_j / (1 - d)
        weights = p * (1 + drop_ratio ** N / (1 - drop_ratio))
    else:
        weights = expected_weights(p, drop_ratio)                      # (B, H, N, N), c_j p_j
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


def _check_inputs(q, k, v, mode, drop_ratio, mc_samples, align=None):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    _check_ratio(drop_ratio)
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must all be (B, H, N, D) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(mc_samples, int) or mc_samples < 0:
        raise ValueError(f"mc_samples must be a non-negative integer, got {mc_samples!r}")
    if align not in (None, "none", "exact"):
        raise ValueError(f"align must be None, 'none' or 'exact', got {align!r}")
    if align == "exact" and mc_samples > 0:
        raise ValueError("use either mc_samples or align='exact', not both")


# ----------------------------------------------------------------------------- benchmark
# `python dropkey.py` times every mode against plain attention (see README, Performance).

def _algorithm1(q, k, v, drop_ratio):
    """The paper's Algorithm 1, written out as published: a float Bernoulli mask times -1e12."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5            # (B, H, N, N)
    m_r = torch.ones_like(attn) * drop_ratio
    attn = attn + torch.bernoulli(m_r) * -1e12
    return attn.softmax(dim=-1) @ v                                    # (B, H, N, D)


def _saved_bytes(fn):
    """Bytes of the distinct storages that autograd keeps for backward while running fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _time_rounds(fns, runs, device):
    """Wall times in ms of every fn in `fns` (a dict), {name: [ms per round]}, after 3 warm-ups each.

    Each round calls every fn once, in a fresh random order: a drift of the
    machine (a busy neighbour, a slower core) hits every row alike, and no row
    always runs right after one that leaves the allocator or caches cold.
    """
    import random
    import time
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(runs):
        for name in order.sample(list(fns), len(fns)):
            fn = fns[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _paired(times, base):
    """Median over rounds of time / base time in the same round: steadier than a ratio of medians."""
    return _median([t / b for t, b in zip(times, base)])


def _bench_attention(B, H, N, D, runs, dtype, device, drop_ratio=0.3):
    side = math.isqrt(N - 1)
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    cases = {"none (fused SDPA)": lambda: attention(q, k, v, "none", fused=True),
             "none (explicit)": lambda: attention(q, k, v, "none", fused=False)}
    for mode in DROPPING_MODES:
        cases[mode] = lambda mode=mode: attention(q, k, v, mode, drop_ratio, grid=(side, side), block_size=3)
    cases["paper Algorithm 1"] = lambda: _algorithm1(q, k, v, drop_ratio)
    saved = {name: _saved_bytes(fn) for name, fn in cases.items()}
    grad = torch.randn_like(q)  # a dense gradient, as in training (sum().backward() sends a stride-0 one)
    times = _time_rounds({name: (lambda fn=fn: fn().backward(grad)) for name, fn in cases.items()},
                         runs, device)
    fastest = min(["none (fused SDPA)", "none (explicit)"], key=lambda name: _median(times[name]))
    print(f"\nfwd+bwd of one attention op, B={B} H={H} N={N} D={D} {str(dtype)[6:]} on {device}, "
          f"d={drop_ratio}, {runs} rounds; mask elements: {B * H * N * N:,}")
    print(f"{'mode':<20}{'median ms':>10}{'min-max':>15}{'x ' + fastest:>22}{'saved MB':>10}")
    for name, ts in times.items():
        print(f"{name:<20}{_median(ts):10.2f}{f'{min(ts):.1f}-{max(ts):.1f}':>15}"
              f"{_paired(ts, times[fastest]):22.2f}{saved[name] / 2**20:10.1f}")
    print(f"dropkey is {_paired(times['paper Algorithm 1'], times['dropkey']):.2f}x faster than "
          f"the paper's Algorithm 1 (x columns: median of per-round ratios)")


def _bench_vit(patch_size, batch, runs, device):
    """Images/s of a training step per mode (round-robin), and the cost of evaluation with alignment."""
    import vit as vit_module  # the ViT of vit.py; Algorithm 1 is swapped in for its reference row
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    original = vit_module.dropkey.attention

    def algorithm1(q, k, v, mode, drop_ratio, training, **kw):
        if training and drop_ratio > 0:
            return _algorithm1(q, k, v, drop_ratio)
        return original(q, k, v, mode, drop_ratio, training, **kw)

    models, steps = {}, {}
    # "none, 2nd copy" is the same model again: its ratio to none is the resolution of the x column
    for name in ["none", "none, 2nd copy", "vanilla", "dropkey", "paper Algorithm 1"]:
        torch.manual_seed(0)
        mode = {"none, 2nd copy": "none", "paper Algorithm 1": "dropkey"}.get(name, name)
        model = models[name] = vit_module.ViT(patch_size=patch_size, attn_drop_mode=mode).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, swap=name == "paper Algorithm 1"):
            vit_module.dropkey.attention = algorithm1 if swap else original
            try:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            finally:
                vit_module.dropkey.attention = original
        steps[name] = step
    train = _time_rounds(steps, runs, device)
    model = models["dropkey"].eval()

    def evaluate(mc_samples=0, align="none"):
        model.mc_samples, model.align = mc_samples, align
        with torch.no_grad():
            model(x)
        model.mc_samples, model.align = 0, "none"
    evals = _time_rounds({"plain": evaluate, "MC-10": lambda: evaluate(mc_samples=10),
                          "exact": lambda: evaluate(align="exact")}, runs, device)
    print(f"\ntraining step (forward, backward, AdamW) of the default ViT, patch {patch_size} "
          f"(N={(32 // patch_size) ** 2 + 1}), batch {batch}, on {device}, {runs} rounds")
    print(f"{'mode':<20}{'images/s':>10}{'step ms':>10}{'min-max':>15}{'x none':>8}")
    for name, ts in train.items():
        print(f"{name:<20}{batch / _median(ts) * 1e3:10.1f}{_median(ts):10.1f}"
              f"{f'{min(ts):.0f}-{max(ts):.0f}':>15}{_paired(ts, train['none']):8.3f}")
    print(f"evaluation of the dropkey model: plain {_median(evals['plain']):.1f} ms, Monte-Carlo with "
          f"10 masks {_paired(evals['MC-10'], evals['plain']):.2f}x, exact expectation "
          f"{_paired(evals['exact'], evals['plain']):.2f}x")


def _main():
    import argparse
    parser = argparse.ArgumentParser(description="Benchmark every attention-dropout mode (fwd+bwd) "
                                     "and a full ViT training step.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--shapes", default="128,3,65,64;32,3,257,64;32,4,257,32", help="B,H,N,D;... (N = 1 + square; '' skips)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--runs", type=int, default=30, help="rounds: each times every row once (after 3 warm-ups)")
    parser.add_argument("--vit-patches", default="4,2", help="patch sizes for the ViT training step ('' skips)")
    parser.add_argument("--vit-batch", type=int, default=128)
    parser.add_argument("--vit-runs", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
        patches = [int(p) for p in args.vit_patches.split(",") if p]
        assert all(len(s) == 4 and math.isqrt(s[2] - 1) ** 2 == s[2] - 1 for s in shapes)
    except (ValueError, AssertionError):
        parser.error("--shapes is B,H,N,D;... with N - 1 a square, --vit-patches is sizes like 4,2")
    for shape in shapes:
        _bench_attention(*shape, args.runs, getattr(torch, args.dtype), device)
    for patch in patches:
        _bench_vit(patch, args.vit_batch, args.vit_runs, device)


if __name__ == "__main__":
    _main()
