"""DropKey (Li et al., "DropKey for Vision Transformer", CVPR 2023) as a drop-in for
`F.scaled_dot_product_attention`, with every attention-dropout mode the paper compares.

Reading order, which is the paper's order:

  1. `layer_drop_ratios` -- how much to drop in each layer (Sec. 3.2, Table 1).
  2. `sample_keep_mask` -- which keys to drop: independently per query (DropKey,
     Eq. 12), or in s x s blocks / crosses of the patch grid (DropKey-Block and
     DropKey-Cross, Fig. 2, Table 2). `allowed_keys` and `fall_back` compose the
     drop with the masks a model already has (padding, causal).
  3. `attention` -- softmax(q k^T / sqrt(E) + D) v with the dropout of `mode`:
     DropKey's D holds -inf for dropped keys, *before* the softmax (Eq. 12-14);
     DropAttention re-normalises after it (Eq. 1); vanilla is nn.Dropout on the
     weights. One explicit path, every step a named local you can inspect.
  4. `aligned_attention`, `expected_weights` -- Align Expectation at evaluation
     (Sec. 3.2, Table 4): the Monte-Carlo average over masks, or its exact limit
     c_j p_j (Eq. 3).
  5. The fast path (last section): the same numbers from fused kernels, with
     masks that are a pure function of one seed (`counter_keep_mask`), so that
     long rows are done by tiles and FlexAttention takes the mask as a
     function. One switch, `dropkey.FLASH`; set it to False to step through
     the explicit path.

The whole idea, next to plain attention (the paper's Algorithm 1):

    logits = q @ k.transpose(-2, -1) * scale
    logits = logits.masked_fill(torch.rand_like(logits) < drop_ratio, -inf)   # DropKey (Eq. 12)
    out = logits.softmax(-1) @ v                                              # Eq. 13-14

plus one rule the paper leaves open: a query whose keys are all dropped keeps
them instead (`fall_back`), where Algorithm 1's finite -1e12 silently makes the
row uniform.
"""
import math

import torch
import torch.nn.functional as F

MODES = ("none", "vanilla", "dropattention", "dropkey", "dropkey_block", "dropkey_cross")
DROPPING_MODES = MODES[1:]
STRUCTURED_MODES = ("dropkey_block", "dropkey_cross")
SCHEDULES = ("constant", "increasing", "decreasing")
FLASH = True  # the fast path (fused kernels, fast sampler); False: the explicit path everywhere


# ----------------------------------------------------------------------------- schedules

def layer_drop_ratios(drop_ratio, depth, schedule="decreasing"):
    """Drop ratio of every layer, a list of `depth` floats (Sec. 3.2, Table 1).

    constant:   d in every layer.
    decreasing: the paper's Scheduled-down, linear from d in the first layer
                to 0 in the last, d * (depth - 1 - i) / (depth - 1).
    increasing: its exact reverse, linear from 0 in the first layer to d.
    The paper gives no endpoints; ending the line at 0 is this project's
    choice: both schedules then have the same mean ratio d / 2 and differ only
    in where the dropping happens (the decreasing one equals timm's stochastic
    depth rates, linspace(0, d, depth), reversed). A single layer gets d.
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
    """Boolean tensor of `shape`, each element True independently with probability `prob`.

    With dropkey.FLASH (outside torch.compile) the bits come from the
    counter-based generator of the last section, seeded by one draw of
    `generator`: the same distribution, another random stream. Either way
    torch.manual_seed or `generator` fixes every mask.
    """
    if _fast_sampler(device):
        return _counter_bernoulli(shape, prob, draw_seed(generator, device or "cpu"))
    return torch.rand(shape, device=device, generator=generator) < prob


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


def _structured_drop(lead, mode, drop_ratio, grid, block_size, device, generator, seeds=None):
    """Dropped keys on the patch grid, (*lead, n_h * n_w), for DropKey-Block or -Cross (Fig. 2).

    `seeds`: the seed grid, if already drawn (the fast path's `counter_keep_mask`).
    """
    n_h, n_w = grid
    s = block_size
    if seeds is None:
        gamma = seed_rate(mode, drop_ratio, grid, block_size)
        seeds = bernoulli_mask((*lead, n_h - s + 1, n_w - s + 1), gamma,
                               device=device, generator=generator)    # (*lead, n_h-s+1, n_w-s+1)
    if mode == "dropkey_block":  # each seed drops the s x s window below-right of it
        drop = _dilate(_dilate(seeds, s, -2), s, -1)                   # (*lead, n_h, n_w)
    else:                        # each seed drops s full rows and s full columns
        rows = _dilate(seeds.any(-1), s, -1)                           # (*lead, n_h)
        cols = _dilate(seeds.any(-2), s, -1)                           # (*lead, n_w)
        drop = rows.unsqueeze(-1) | cols.unsqueeze(-2)                 # (*lead, n_h, n_w)
    return drop.flatten(-2)                                            # (*lead, n_h * n_w)


def sample_keep_mask(shape, mode="dropkey", drop_ratio=0.0, *, grid=None, prefix_tokens=1,
                     block_size=3, device=None, generator=None):
    """Sample a keep mask (True = key kept) of `shape` = (..., Nq, Nk) for `mode`.

    Every query row gets its own independent mask: the paper "generate[s]
    masked key map for each query" (Sec. 3.2).
      vanilla, dropattention, dropkey: each key dropped with probability d (Eq. 12).
      dropkey_block, dropkey_cross: seeds on the n_h x n_w patch grid of the
        keys, each dropping an s x s window or s full rows and columns (Fig. 2).
        The first `prefix_tokens` keys (the class token) are not on the grid:
        each is dropped independently with probability d, as in plain DropKey.
        The grid keys are not dropped at d: border keys less, centre keys
        more, the mean a little below d (`key_drop_rates`).
    The all-dropped rule is *not* applied here (see `fall_back`), so that the
    raw mask can be inspected. With dropkey.FLASH (outside torch.compile) the
    mask is `counter_keep_mask` of one seed drawn from `generator`.
    """
    *lead, n_keys = shape
    if _fast_sampler(device):         # one seed, then the mask as a pure function of it
        return counter_keep_mask(draw_seed(generator, device or "cpu"), shape, mode, drop_ratio, grid=grid,
                                 prefix_tokens=prefix_tokens, block_size=block_size)
    if mode not in STRUCTURED_MODES:  # each key kept with probability 1 - d
        return bernoulli_mask(shape, 1.0 - drop_ratio, device=device, generator=generator)
    _check_grid(grid, n_keys, prefix_tokens, block_size)
    prefix_drop = bernoulli_mask((*lead, prefix_tokens), drop_ratio, device=device, generator=generator)
    grid_drop = _structured_drop(lead, mode, drop_ratio, grid, block_size, device, generator)
    return ~torch.cat([prefix_drop, grid_drop], dim=-1)                # (..., Nq, Nk)


def allowed_keys(attn_mask, is_causal, Nq, Nk, device):
    """The keys each query may attend to, from SDPA's `attn_mask` and `is_causal`.

    A boolean attn_mask is True where attention is allowed (SDPA's meaning); a
    float one is a bias added to the logits, and its -inf entries count as not
    allowed. is_causal allows key j for query i when j <= i (the top-left
    triangle, as SDPA); it composes with attn_mask.
    Returns (allowed, bias): bool broadcastable to (..., Nq, Nk) or None (all
    allowed), and the float bias or None.
    """
    allowed, bias = None, None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask
    elif attn_mask is not None:
        bias = attn_mask
        allowed = attn_mask != float("-inf")
    if is_causal:
        causal = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()  # (Nq, Nk)
        allowed = causal if allowed is None else allowed & causal
    return allowed, bias


def fall_back(keep, allowed=None):
    """Drop only among the allowed keys; a query whose allowed keys are all dropped keeps them.

    keep: bool (..., Nq, Nk), True = kept; allowed: bool broadcastable to it,
    or None (every key allowed). The paper's Eq. 1 is 0/0 for a row with
    nothing kept; we give it the undropped weights over its allowed keys (never
    a padded or future key). A row with no allowed key stays empty: its
    weights are zeros, as in SDPA. No branch on the data (no host sync).
    """
    kept = keep if allowed is None else keep & allowed                  # (..., Nq, Nk)
    nothing_kept = ~kept.any(dim=-1, keepdim=True)                     # (..., Nq, 1)
    return kept | (nothing_kept if allowed is None else nothing_kept & allowed)


# ----------------------------------------------------------------------------- attention

def masked_softmax(logits, mask):
    """softmax over the keys where `mask` is True (Eq. 14: the logits plus d_j in {0, -inf}).

    mask: bool broadcastable to logits, or None (every key). A row with no
    True key gives zeros (as SDPA does), not the NaN of softmax(-inf, ..., -inf).
    """
    if mask is None:
        return logits.softmax(dim=-1)                                  # Eq. 2
    masked = torch.where(mask, logits, float("-inf"))                  # Eq. 12: d_j = -inf where dropped
    weights = masked.softmax(dim=-1)                                   # Eq. 14
    return torch.where(mask.any(dim=-1, keepdim=True), weights, 0.0)   # (..., Nq, Nk)


def dropped_weights(logits, keep, mode, drop_ratio, allowed=None):
    """Attention weights under `mode`'s drop, given logits and a raw keep mask, (..., Nq, Nk).

    dropkey (and -block, -cross), Eq. 12-14: d_j = -inf on the logits, then softmax.
    dropattention, Eq. 1: p = softmax(logits), zero the dropped p_j, re-normalise.
      Both drop among the `allowed` keys with `fall_back`; they are equal,
      except where every kept p_j underflows to 0 (kept logits ~100 below the
      row's largest in float32): Eq. 1 is then 0/0 and keeps p.
    vanilla: nn.Dropout on the weights, F.dropout(p, d) under this mask: the
      kept p_j scaled by 1 / (1 - d); rows no longer sum to 1, and a row with
      every key dropped is zeros.
    none: p itself.
    """
    if mode in ("dropkey",) + STRUCTURED_MODES:
        return masked_softmax(logits, fall_back(keep, allowed))        # Eq. 12-14
    p = masked_softmax(logits, allowed)                                # Eq. 2
    if mode == "vanilla":
        return torch.where(keep, p, 0.0) / (1.0 - drop_ratio)          # nn.Dropout's rule
    if mode == "none":
        return p
    kept = torch.where(fall_back(keep, allowed), p, 0.0)               # k_j p_j, k_j in {0, 1}
    total = kept.sum(dim=-1, keepdim=True)                             # (..., Nq, 1)
    return torch.where(total > 0, kept / total, p)                     # Eq. 1


def attention(query, key, value, attn_mask=None, drop_ratio=0.0, is_causal=False, scale=None, *,
              mode="dropkey", training=True, keep_mask=None, grid=None, prefix_tokens=1,
              block_size=3, generator=None, return_weights=False):
    """`F.scaled_dot_product_attention` with the attention dropout of `mode` (Eq. 12-14 for DropKey).

    Replacing `F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p)`
    by `dropkey.attention(q, k, v, attn_mask=m, drop_ratio=p, training=self.training)`
    is the whole change: arguments, shapes and mask meaning are SDPA's.

    Args:
      query (..., Nq, E), key (..., Nk, E), value (..., Nk, Ev); leading
        dimensions broadcast (e.g. one key/value head for many query heads).
      attn_mask: bool (True = may attend) or float (added to the logits),
        broadcastable to (..., Nq, Nk). is_causal: query i sees keys j <= i.
        scale: of the logits, default 1 / sqrt(E).
      drop_ratio: d in [0, 1). mode: one of MODES. training: drop only when
        True; otherwise this is exactly SDPA (see `aligned_attention` for the
        paper's evaluation with expected weights).
      keep_mask: bool broadcastable to (..., Nq, Nk), True = kept; replaces the
        sampled mask (training only), so modes can be compared under one mask.
      grid, prefix_tokens, block_size: the patch grid (n_h, n_w) of the keys,
        the tokens before it, and s, for dropkey_block / dropkey_cross.
      generator: a torch.Generator on the device of the tensors. With FLASH
        the call's first draw from it is the seed of its mask (`draw_seed`,
        `counter_keep_mask` give that mask back).
      return_weights: also return the weights multiplied with value (takes
        the explicit path).
    Dropping composes with attn_mask and is_causal: keys are dropped among
    those a query may attend to (`fall_back`). Returns out (..., Nq, Ev), or
    (out, weights (..., Nq, Nk)).
    """
    lead = _check_attention(query, key, value, attn_mask, drop_ratio, is_causal, scale, mode,
                            training, keep_mask, generator)
    Nq, Nk = query.shape[-2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dropping = mode != "none" and training and (keep_mask is not None or drop_ratio > 0)
    if FLASH and not return_weights:  # the fast path draws its own mask: a seed, see `draw_seed`
        out = _flash_attention(query, key, value, attn_mask, is_causal, scale, mode, drop_ratio if dropping else 0.0,
                               keep_mask if dropping else None, generator,
                               dict(grid=grid, prefix_tokens=prefix_tokens, block_size=block_size))
        if out is not None:
            return out
    keep = None                                                        # None: nothing dropped
    if dropping and keep_mask is None:
        keep = sample_keep_mask((*lead, Nq, Nk), mode, drop_ratio, grid=grid, prefix_tokens=prefix_tokens,
                                block_size=block_size, device=query.device, generator=generator)
    elif dropping:
        keep = keep_mask                                               # (..., Nq, Nk), broadcastable
    allowed, bias = allowed_keys(attn_mask, is_causal, Nq, Nk, query.device)  # (..., Nq, Nk) or None
    logits = (query @ key.transpose(-2, -1)) * scale                   # (..., Nq, Nk), q k^T / sqrt(E)
    if bias is not None:
        logits = logits + bias                                         # a float attn_mask
    if keep is None:
        weights = masked_softmax(logits, allowed)                      # Eq. 2
    else:
        weights = dropped_weights(logits, keep, mode, drop_ratio, allowed)  # Eq. 1, 12-14, or nn.Dropout
    out = weights @ value                                              # Eq. 13, (..., Nq, Ev)
    return (out, weights) if return_weights else out


# ----------------------------------------------------------------------------- Align Expectation

@torch.no_grad()
def aligned_attention(query, key, value, attn_mask=None, drop_ratio=0.0, is_causal=False, scale=None, *,
                      mode="dropkey", mc_samples=0, grid=None, prefix_tokens=1, block_size=3,
                      generator=None, return_weights=False):
    """Evaluation with the expected dropped weights: Align Expectation (Sec. 3.2, Table 4).

    mc_samples = T > 0: the paper's Monte-Carlo alignment, the dropped weights
    averaged over T independent masks, then @ value. mc_samples = 0: the exact
    expectation, the limit T -> inf: c_j p_j of Eq. 3 (`expected_weights`) for
    dropkey and dropattention; p itself for vanilla (nn.Dropout's rule keeps
    E[w] = p); not defined for dropkey_block / dropkey_cross, whose drops are
    not independent (ValueError: use mc_samples). Masks compose as in
    `attention`. No autograd. Returns out, or (out, weights) with return_weights.
    """
    lead = _check_attention(query, key, value, attn_mask, drop_ratio, is_causal, scale, mode,
                            False, None, generator)
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 0:
        raise ValueError(f"mc_samples must be a non-negative integer, got {mc_samples!r}")
    if mc_samples == 0 and mode in STRUCTURED_MODES:
        raise ValueError(f"exact alignment is not defined for {mode}: its drops are not "
                         f"independent; use mc_samples=T instead")
    Nq, Nk = query.shape[-2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    allowed, bias = allowed_keys(attn_mask, is_causal, Nq, Nk, query.device)
    logits = (query @ key.transpose(-2, -1)) * scale                   # (..., Nq, Nk)
    if bias is not None:
        logits = logits + bias
    if mode == "none" or drop_ratio == 0 or (mc_samples == 0 and mode == "vanilla"):
        weights = masked_softmax(logits, allowed)                      # p of Eq. 2: nothing to align
    elif mc_samples == 0:                                              # c_j p_j, Eq. 3, by DropKey's rule
        masked = logits if allowed is None else torch.where(allowed, logits, float("-inf"))
        weights = expected_weights(logits=masked, drop_ratio=drop_ratio).to(value.dtype)
    else:
        total = torch.zeros_like(logits, dtype=torch.float32)          # one mask at a time
        for _ in range(mc_samples):
            keep = sample_keep_mask((*lead, Nq, Nk), mode, drop_ratio, grid=grid, prefix_tokens=prefix_tokens,
                                    block_size=block_size, device=query.device, generator=generator)
            total += dropped_weights(logits, keep, mode, drop_ratio, allowed)
        weights = (total / mc_samples).to(value.dtype)                 # estimate of c_j p_j (Eq. 3)
    out = weights @ value                                              # (..., Nq, Ev)
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



# ----------------------------------------------------------------------------- checks

def _check_ratio(drop_ratio):
    if isinstance(drop_ratio, bool) or not (isinstance(drop_ratio, (int, float)) and 0.0 <= drop_ratio < 1.0):
        raise ValueError(f"drop_ratio must be a number in [0, 1), got {drop_ratio!r}")


def _check_grid(grid, n_keys, prefix_tokens, block_size):
    if grid is None:
        raise ValueError("dropkey_block and dropkey_cross need grid=(n_h, n_w), the patch grid of the keys")
    if len(grid) != 2 or grid[0] * grid[1] != n_keys - prefix_tokens:
        raise ValueError(f"grid {tuple(grid)} does not match {n_keys} keys with "
                         f"prefix_tokens={prefix_tokens}: need n_h * n_w == {n_keys - prefix_tokens}")
    if not 1 <= block_size <= min(grid):
        raise ValueError(f"block_size must be between 1 and {min(grid)} for grid {tuple(grid)}, "
                         f"got {block_size}")


def _check_mask(name, mask, target, device):
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but query is on {device}")
    try:
        fits = torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to "
                         f"(..., Nq, Nk) = {tuple(target)}")


def _check_attention(query, key, value, attn_mask, drop_ratio, is_causal, scale, mode, training,
                     keep_mask, generator):
    """Every argument of `attention` checked, each mistake one ValueError; returns the leading shape."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    _check_ratio(drop_ratio)
    tensors = dict(query=query, key=key, value=value)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (..., N, E), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{' of ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"query, key, value are on different devices: "
                         f"{query.device}, {key.device}, {value.device}")
    if len({t.dtype for t in tensors.values()}) > 1 and not torch.is_autocast_enabled(query.device.type):
        raise ValueError(f"query, key, value have different dtypes: "
                         f"{query.dtype}, {key.dtype}, {value.dtype}")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"need query (..., Nq, E), key (..., Nk, E), value (..., Nk, Ev); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[-2] == 0 or key.shape[-2] == 0:
        raise ValueError(f"empty sequence: Nq = {query.shape[-2]}, Nk = {key.shape[-2]}; attention needs "
                         f"at least one query and one key")
    try:
        lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the leading dimensions of query, key, value do not broadcast: "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}") from None
    target = (*lead, query.shape[-2], key.shape[-2])
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, target, query.device)
        if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise ValueError(f"attn_mask must be bool (True = may attend) or float (added to the logits), "
                             f"got {attn_mask.dtype}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be True or False, got {is_causal!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a number or None, got {scale!r}")
    if keep_mask is not None:
        if mode == "none" or not training:
            raise ValueError("keep_mask is only used by a dropping mode in training")
        _check_mask("keep_mask", keep_mask, target, query.device)
        if keep_mask.dtype != torch.bool:
            raise ValueError(f"keep_mask must be bool (True = kept), got {keep_mask.dtype}")
    if generator is not None and generator.device.type != query.device.type:
        raise ValueError(f"generator is on {generator.device} but the tensors are on {query.device}; "
                         f"pass a torch.Generator(device={query.device.type!r})")
    return lead


# ----------------------------------------------------------------------------- the fast path
# Everything below gives the numbers of the explicit path above, faster; dropkey.FLASH = False skips it.

MASK_CHUNK = 2**21  # mask elements sampled, or given to the CPU kernel, at a time (8 MiB as float32)
GPU_MASK_CHUNK = 2**25  # the same on a GPU, which has no such cache: fewer, larger launches


def _fast_sampler(device):
    """Whether masks come from the counter generator below: with FLASH, outside torch.compile (torch's RNG there)."""
    return FLASH and not torch.compiler.is_compiling()


# Random bits that need not be stored: every mask bit is a pure function of (seed, row, key), so
# any tile of the mask can be made again where it is needed (backward, a fused kernel's mask_mod).
#
# The generator is SplitMix64 (Steele, Lea and Flood, OOPSLA 2014; java.util.SplittableRandom, the
# seeder of xoshiro): output n of seed s is mix64(s + n * GOLDEN), mix64 being Stafford's "Mix13"
# finaliser (two multiply-xorshift rounds). It passes BigCrush and PractRand, and a counter-based
# generator is what FlashAttention's own dropout does (Philox, seed and offset). Against Philox-4x32
# (10 rounds of 32-bit multiplies) it is 3 int64 ops per shift-xor and 2 multiplies, which torch
# runs on int64 tensors as they are. The alternative, a bit-packed mask (1 bit per element) kept
# from forward for backward, measured on a (2048, 4096) tile, one thread: packing 16 ms plus
# unpacking to the float mask 19 ms, against 13.5 ms (18.6 eager) to make the float mask again
# from the counter; so nothing is stored. Layout, for a mask of shape (..., R, C) with the
# leading dimensions flattened to L:
#   seed key    k   = mix64(seed + stream * GOLDEN)          stream 1: keys, 2: prefix, 3: grid seeds
#   row key     k_r = mix64(k + (r + 1) * GOLDEN)             r = l * R + i, row i of leading index l
#   word        w   = mix64(k_r + (c // 4 + 1) * GOLDEN)      four 16-bit uniforms per 64-bit word
#   bit (r, c)  = (16-bit piece c % 4 of w, as int16) < round(prob * 65536) - 32768
# so the probability is prob on a 1/65536 grid (error <= 7.6e-6). Limits: seeds in [0, 2^63) (what
# Tensor.random_() draws); r + 1 and c // 4 + 1 below 2^63 (far beyond any tensor); a row repeats
# only after 2^64 words and two rows' streams overlap with probability ~ (words per row) / 2^64.
GOLDEN = 0x9E3779B97F4A7C15 - 2**64                                   # as a signed int64
_MIX = ((30, 0xBF58476D1CE4E5B9 - 2**64), (27, 0x94D049BB133111EB - 2**64), (31, None))
SEED_LIMIT = 2**63


def _int64(n):
    """A Python integer modulo 2^64, as a signed int64."""
    return (n + 2**63) % 2**64 - 2**63


def mix64(x, scratch=None):
    """SplitMix64's finaliser on an int64 tensor: x ^= x >>> 30; x *= M1; x ^= x >>> 27; x *= M2; x ^= x >>> 31.

    With a `scratch` tensor like x, in place (the CPU path); without, a new
    tensor (what FlexAttention's mask_mod needs).
    """
    for shift, multiplier in _MIX:
        low = (1 << (64 - shift)) - 1                                  # >> is arithmetic: keep 64 - shift bits
        if scratch is None:
            x = x ^ ((x >> shift) & low)
            x = x if multiplier is None else x * multiplier            # wraps modulo 2^64
            continue
        torch.bitwise_right_shift(x, shift, out=scratch)
        x ^= scratch.bitwise_and_(low)
        if multiplier is not None:
            x *= multiplier
    return x


def draw_seed(generator=None, device="cpu"):
    """The seed of one mask: the next draw of `generator` (or torch's default), an int64 tensor in [0, 2^63).

    Every training call with dropkey.FLASH draws exactly one, first (outside
    torch.compile, where torch's RNG draws the mask): re-seed the generator
    and call this to get the seed a call used, then `counter_keep_mask(seed,
    ...)` for its mask. A tensor, so a GPU is not synced.
    """
    return torch.empty((), dtype=torch.int64, device=device).random_(generator=generator)


def _seed_key(seed, stream, device):
    if not isinstance(seed, torch.Tensor):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        seed = torch.tensor(seed, dtype=torch.int64)
    elif seed.dtype != torch.int64 or seed.dim() != 0:
        raise ValueError(f"seed must be an int64 scalar tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
    x = seed.to(device) + _int64(stream * GOLDEN)
    return mix64(x, torch.empty_like(x))


def _seed_device(seed):
    """Where a mask of `seed` is made: the device of a seed tensor (`draw_seed`), the CPU for an int."""
    return seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")


def _row_keys(seed_key, rows):
    """mix64(k + (r + 1) * GOLDEN) for the int64 tensor of row indices `rows`."""
    x = seed_key + (rows + 1) * GOLDEN
    return mix64(x, torch.empty_like(x))


def _threshold(prob):
    return round(prob * 65536) - 32768


def _word_offsets(c0, c1, device):
    """(c // 4 + 1) * GOLDEN for the words of columns c0 .. c1 - 1 (c0 % 4 == 0), (W,)."""
    return torch.arange(c0 // 4 + 1, (c1 + 3) // 4 + 1, dtype=torch.int64, device=device) * GOLDEN


WORD_CHUNK = 2**16  # 64-bit words mixed at a time: two 512 KiB buffers, reused, stay in cache
# Mask elements of a float tile of the tiled path from which it is written by one compiled loop
# (torch.compile, `_compiled_patterns`): 2-3x faster than the 14 eager passes. Below it, and where
# compiling fails (no C++ compiler), eager: the same bits. Compiling costs seconds, a few times per
# process (a new tile size); tests and short rows stay under it. 2**62: never compiled.
COMPILE_FROM = 2**20
_compiled = {}  # what torch.compile made: the tile writer (None where compiling failed), flex_attention


def _patterns_into(out, row_keys, offsets, limit, minus_inf):
    """The bit patterns of D (Eq. 12), 0 where kept and those of -inf where dropped, into out (R, W, 4) ints.

    The arithmetic of `counter_bits` in one expression, for torch.compile to
    make one loop of: the word of each (row, 4 keys), its four 16-bit pieces
    as offset-binary numbers (+32768: u < limit is int16 < threshold).
    """
    w = mix64(row_keys[:, None] + offsets)[:, :, None]                 # (R, W, 1)
    u = ((w >> torch.arange(0, 64, 16, device=w.device)) + 32768) & 0xFFFF  # (R, W, 4): piece c % 4 of word c // 4
    out.copy_(torch.where(u < limit, 0, minus_inf))


def _compiled_patterns(out, row_keys, c0, prob):
    """`counter_bits(row_keys, c0, c0 + C, prob, out=out)` for a float `out` (R, C) by the compiled loop.

    False where it does not apply (then call `counter_bits`). It writes whole
    words, 4 keys each, so past column C up to the next multiple of 4: the
    caller's rows must have that room (a row stride of at least 4 W, as the
    tiled path's buffer has). The first call in a process is checked against
    eager on two rows.
    """
    R, C = out.shape
    offsets = _word_offsets(c0, c0 + C, row_keys.device)               # (W,)
    W = len(offsets)
    if (out.device.type != "cpu" or R * C < COMPILE_FROM or out.dtype not in (torch.float32, torch.float64)
            or out.stride(1) != 1
            or out.stride(0) < 4 * W or _compiled.get("writer", 0) is None or torch.compiler.is_compiling()):
        return False
    ints, minus_inf = _minus_inf_bits(out.dtype)
    view = out.view(ints)
    padded = view.as_strided((R, W, 4), (view.stride(0), 4, 1))        # (R, W, 4) over the rows' room
    try:
        if "writer" not in _compiled:
            _compiled["writer"] = torch.compile(_patterns_into)  # a size that changes is made dynamic: few compiles
        _compiled["writer"](padded, row_keys, offsets, _threshold(prob) + 32768, minus_inf)
    except Exception:                                                  # no compiler, or an unsupported platform
        _compiled["writer"] = None
        return False
    if not _compiled.get("checked"):
        eager = counter_bits(row_keys[:2], c0, c0 + C, prob, out=torch.empty(min(R, 2), C, dtype=out.dtype))
        _compiled["checked"] = torch.equal(eager.view(ints), view[:2])
        if not _compiled["checked"]:
            _compiled["writer"] = None
            return False
    return True


def counter_bits(row_keys, c0, c1, prob, out=None):
    """Bits (R, c1 - c0) of the R rows with keys `row_keys`, columns c0 .. c1 - 1 (c0 % 4 == 0).

    True with probability `prob` (on a 1/65536 grid); the same bits for any
    split into blocks of rows or columns. `out`: a bool tensor (R, c1 - c0) to
    fill, or a float one: then the mask D of Eq. 12 is written, 0 where True
    and -inf where False (`additive_mask`). The words are mixed WORD_CHUNK at
    a time in reused buffers: a fresh tensor per op would be page-faulted in
    each time and cost more than the arithmetic.
    """
    R, C = row_keys.shape[0], c1 - c0
    out = torch.empty(R, C, dtype=torch.bool, device=row_keys.device) if out is None else out
    offsets = _word_offsets(c0, c1, row_keys.device)                   # (W,)
    rows = max(1, WORD_CHUNK // len(offsets)) if row_keys.device.type == "cpu" else R  # a GPU has no such cache
    words = row_keys.new_empty(min(rows, R), len(offsets))             # (rows, W)
    scratch = torch.empty_like(words)
    bits = words.new_empty(min(rows, R), C, dtype=torch.bool) if out.is_floating_point() else None
    for a in range(0, R, rows):                                        # blocks of rows, never a loop over tokens
        b = min(a + rows, R)
        w = words[:b - a]
        mix64(torch.add(row_keys[a:b, None], offsets, out=w), scratch[:b - a])  # k_r + (c // 4 + 1) * GOLDEN
        uniform16 = w.view(torch.int16)[:, :C]                         # little-endian: piece c % 4 of word c // 4
        if bits is None:
            torch.lt(uniform16, _threshold(prob), out=out[a:b])
        else:
            _additive_into(torch.lt(uniform16, _threshold(prob), out=bits[:b - a]), out[a:b])
    return out


def _check_rows(n_rows, n_cols):
    if n_rows >= SEED_LIMIT - 1 or n_cols >= SEED_LIMIT:
        raise ValueError(f"a counter mask of {n_rows} rows of {n_cols} bits is beyond the generator's "
                         f"counter range (2^63 rows, 2^63 columns)")


def _counter_bernoulli(shape, prob, seed, stream=1):
    """A counter mask of `shape` (rows: everything but the last dimension), MASK_CHUNK elements at a time."""
    *lead, C = shape
    R = math.prod(lead)
    _check_rows(R, C)
    device = _seed_device(seed)
    key = _seed_key(seed, stream, device)
    if prob <= 0 or prob >= 1:
        return torch.full(shape, prob >= 1, dtype=torch.bool, device=device)
    mask = torch.empty(R, C, dtype=torch.bool, device=device)
    rows = max(1, (MASK_CHUNK if device.type == "cpu" else GPU_MASK_CHUNK) // max(C, 1))
    cols = C if rows > 1 else max(4, MASK_CHUNK // 4 * 4)
    for a in range(0, R, rows):                                        # blocks of rows (or of one row)
        keys = _row_keys(key, torch.arange(a, min(a + rows, R), device=device))
        for c in range(0, C, cols):
            counter_bits(keys, c, min(c + cols, C), prob, out=mask[a:a + rows, c:c + cols])
    return mask.view(shape)


def counter_keep_mask(seed, shape, mode="dropkey", drop_ratio=0.0, *, grid=None, prefix_tokens=1, block_size=3):
    """The keep mask that the fast path uses for `seed`: `sample_keep_mask`'s distribution, as a pure function.

    seed: int in [0, 2^63) or the int64 tensor of `draw_seed` (the mask is
    made on its device). shape (..., Nq, Nk), True = kept. dropkey,
    dropattention, vanilla: key j of query row r kept with probability 1 - d
    (stream 1). dropkey_block / dropkey_cross: the prefix keys dropped at d
    (stream 2), the grid seeds at gamma (stream 3), then the windows or
    crosses of `sample_keep_mask`. No fall-back applied (see `fall_back`).
    """
    _check_ratio(drop_ratio)
    *lead, Nq, Nk = shape
    if mode not in STRUCTURED_MODES:
        return _counter_bernoulli(shape, 1.0 - drop_ratio, seed)
    _check_grid(grid, Nk, prefix_tokens, block_size)
    L = math.prod(lead)
    _check_rows(L * Nq, Nk)
    rows = torch.arange(L * Nq, device=_seed_device(seed)).view(L, Nq)
    return _structured_keep(seed, rows, mode, drop_ratio, grid, prefix_tokens, block_size).view(shape)


def _structured_keep(seed, rows, mode, drop_ratio, grid, prefix_tokens, block_size):
    """Keep mask (*rows.shape, Nk) of DropKey-Block / -Cross for the row indices `rows` (Fig. 2)."""
    n_h, n_w = grid
    s = block_size
    gamma = seed_rate(mode, drop_ratio, grid, block_size)
    flat = rows.reshape(-1)
    prefix_drop = counter_bits(_row_keys(_seed_key(seed, 2, rows.device), flat), 0, prefix_tokens, drop_ratio)
    seeds = counter_bits(_row_keys(_seed_key(seed, 3, rows.device), flat), 0, (n_h - s + 1) * (n_w - s + 1), gamma)
    grid_drop = _structured_drop([len(flat)], mode, drop_ratio, grid, block_size, None, None,
                                 seeds=seeds.view(-1, n_h - s + 1, n_w - s + 1))
    return ~torch.cat([prefix_drop, grid_drop], dim=-1).view(*rows.shape, -1)  # (*rows.shape, Nk)


def additive_mask(keep, dtype):
    """The mask D of Eq. 12 as numbers: 0 where kept, -inf where dropped.

    Written as bits, ~8x faster on CPU than torch.where(keep, 0, -inf): a
    dropped key gets the bit pattern of -inf, a kept one that of +0.0.
    """
    return _additive_into(keep, torch.empty(keep.shape, dtype=dtype, device=keep.device))


def _minus_inf_bits(dtype):
    """The integer dtype as wide as the float `dtype`, and the bits of -inf in it (0xFF800000 for float32)."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    return ints, torch.tensor(float("-inf"), dtype=dtype).view(ints).item()


def _additive_into(keep, out):
    """`additive_mask` written into the float tensor `out`: (keep - 1) & pattern(-inf), as integers."""
    ints, minus_inf = _minus_inf_bits(out.dtype)
    bits = out.view(ints)
    bits.copy_(keep).sub_(1).bitwise_and_(minus_inf)                  # kept: 0 & pattern = +0.0; dropped: -1 & pattern
    return out


def _private_op(name):
    """A private aten op, or None where this torch lacks it (then public SDPA is used)."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return getattr(torch.ops.aten, name, None) if version >= (2, 3) else None


# SDPA's own CPU flash kernel, called directly so that backward can keep a boolean mask.
_CPU_FLASH = _private_op("_scaled_dot_product_flash_attention_for_cpu")
_CPU_FLASH_BACKWARD = _private_op("_scaled_dot_product_flash_attention_for_cpu_backward")


def _batch_slices(B, per_item):
    """Slices of a batch of B items with at most MASK_CHUNK mask elements each (at least one item).

    A fresh float mask of more than 32 MiB is page-faulted in on every call
    (glibc hands it out by mmap); a slice of it stays in cache.
    """
    rows = max(1, MASK_CHUNK // max(1, per_item))
    return [slice(a, a + rows) for a in range(0, max(B, 1), rows)]


def _slice_mask(keep, bias, s, dtype):
    """The float mask of batch slice s: bias (or 0) where kept, -inf where not."""
    if bias is None:
        return additive_mask(keep[s], dtype)
    return torch.where(keep[s], bias[s].to(dtype), float("-inf"))


class _FlashCPU(torch.autograd.Function):
    """SDPA's CPU flash kernel under a keep mask, keeping the *boolean* mask for backward.

    F.scaled_dot_product_attention with a boolean mask turns it into a float
    one and keeps that for backward (4 bytes per mask element); this keeps the
    boolean (1 byte) and rebuilds the float mask, a batch slice at a time, in
    backward. Same kernels, same outputs and gradients.

    The all-dropped rule costs almost nothing here: the kernel returns a
    log-sum-exp of exactly 0 for a row with every key masked, so only when
    some lse is 0 (or not finite) is `fall_back` applied and the kernel run
    again. At N = 65 and d = 0.3 an all-dropped row has probability ~1e-34.
    """

    @staticmethod
    def _run(q, k, v, keep, bias, scale):
        parts = [_CPU_FLASH(q[s], k[s], v[s], 0.0, False, attn_mask=_slice_mask(keep, bias, s, q.dtype), scale=scale)
                 for s in _batch_slices(q.shape[0], math.prod(keep.shape[1:]))]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])  # (B, H, Nq, E), (B, H, Nq)

    @staticmethod
    def forward(ctx, q, k, v, keep, allowed, bias, scale):
        out, lse = _FlashCPU._run(q, k, v, keep, bias, scale)
        if (lse == 0).any() or not lse.isfinite().all():              # maybe a row with nothing kept
            keep = fall_back(keep, allowed).expand(keep.shape)
            out, lse = _FlashCPU._run(q, k, v, keep, bias, scale)
        ctx.save_for_backward(q, k, v, out, lse, keep, bias)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, keep, bias = ctx.saved_tensors
        parts = [_CPU_FLASH_BACKWARD(grad_out[s], q[s], k[s], v[s], out[s], lse[s], 0.0, False,
                                     attn_mask=_slice_mask(keep, bias, s, q.dtype), scale=ctx.scale)
                 for s in _batch_slices(q.shape[0], math.prod(keep.shape[1:]))]
        dq, dk, dv = parts[0] if len(parts) == 1 else (torch.cat(grads) for grads in zip(*parts))
        return dq, dk, dv, None, None, None, None


TILE_ELEMENTS = 2**22  # mask elements (L x queries x keys) of one tile of the tiled path: 16 MiB as float32


class _TileMasks:
    """The mask of any tile (queries i0:i1 x keys j0:j1) of (L, Nq, Nk), made when needed, never stored whole.

    Kept keys come from the counter generator (`seed`) or from a given boolean
    `keep` (broadcastable to (*lead, Nq, Nk)); they are and-ed with `allowed`
    (bool, broadcastable) and the causal triangle. `fallback` (L, Nq), set
    after the first forward pass, marks the rows whose allowed keys were all
    dropped: they keep their allowed keys (`fall_back`).
    """

    def __init__(self, lead, Nq, Nk, mode, drop_ratio, seed, keep, allowed, bias, causal, structured):
        self.lead, self.L, self.Nq, self.Nk = lead, math.prod(lead), Nq, Nk
        self.mode, self.drop_ratio, self.seed, self.structured = mode, drop_ratio, seed, structured
        self.keep = None if keep is None else keep.expand(*lead, Nq, Nk)
        self.allowed = None if allowed is None else allowed.expand(*lead, Nq, Nk)
        self.bias = None if bias is None else bias.expand(*lead, Nq, Nk)
        self.causal, self.fallback = causal, None
        # Whole rows of keys when TILE_ELEMENTS holds 16 of them; else 16 rows by key blocks (multiples of 4).
        self.tile_q = max(16, TILE_ELEMENTS // (self.L * Nk))
        self.tile_k = Nk if self.L * Nk * 16 <= TILE_ELEMENTS else max(4, TILE_ELEMENTS // (self.L * 64) * 4)
        if seed is not None and mode not in STRUCTURED_MODES:
            self.seed_key = _seed_key(seed, 1, seed.device)

    def _slice(self, t, i0, i1, j0, j1):
        return t[..., i0:i1, j0:j1].reshape(self.L, i1 - i0, j1 - j0)  # (L, bq, bk), a copy of one tile

    def rows(self, i0, i1):
        """Per query tile: what the tiles of these rows share (row keys, or the structured mask of whole rows)."""
        if self.seed is None:
            return None
        rows = torch.arange(self.L, device=self.seed.device)[:, None] * self.Nq + torch.arange(i0, i1)  # (L, bq)
        if self.mode in STRUCTURED_MODES:
            return _structured_keep(self.seed, rows, self.mode, self.drop_ratio, **self.structured)  # (L, bq, Nk)
        return _row_keys(self.seed_key, rows.view(-1))                 # (L * bq,)

    def tile(self, shared, i0, i1, j0, j1):
        """(mask, bias) of one tile: bool (L, bq, bk) or None (every key), float (L, bq, bk) or None."""
        if self.keep is not None:
            mask = self._slice(self.keep, i0, i1, j0, j1)
        elif self.mode in STRUCTURED_MODES:
            mask = shared[:, :, j0:j1]
        else:
            mask = counter_bits(shared, j0, j1, 1.0 - self.drop_ratio).view(self.L, i1 - i0, j1 - j0)
        if self.fallback is not None:
            mask |= self.fallback[:, i0:i1, None]
        if self.allowed is not None:
            mask &= self._slice(self.allowed, i0, i1, j0, j1)
        if self.causal:
            mask &= torch.arange(i0, i1)[:, None] >= torch.arange(j0, j1)  # (bq, bk): key j <= query i
        bias = None if self.bias is None else self._slice(self.bias, i0, i1, j0, j1)
        return mask, bias

    def key_tiles(self, i0, i1):
        """Key tiles of the query rows i0:i1; under a causal mask the tiles right of the diagonal are skipped."""
        end = min(self.Nk, i1) if self.causal else self.Nk
        return [(j0, min(j0 + self.tile_k, end)) for j0 in range(0, end, self.tile_k)]

    def query_tiles(self):
        return [(i0, min(i0 + self.tile_q, self.Nq)) for i0 in range(0, self.Nq, self.tile_q)]

    def float_tile(self, shared, i0, i1, j0, j1, dtype):
        """The tile as the CPU kernel's float mask (L, bq, bk): bias (or 0) where kept, -inf where not.

        Written into one buffer reused by every tile (a fresh one would be page-faulted in each time);
        the counter bits go straight to floats (one compiled loop for large tiles, `_compiled_patterns`).
        """
        shape, width = (self.L, i1 - i0, j1 - j0), -(-(j1 - j0) // 4) * 4  # rows with room for whole words
        if getattr(self, "buffer", None) is None or self.buffer.dtype != dtype:
            self.buffer = torch.empty(self.L * self.tile_q * -(-min(self.tile_k, self.Nk) // 4) * 4, dtype=dtype)
        out = self.buffer[:self.L * (i1 - i0) * width].view(-1, width)[:, :j1 - j0].view(shape)  # (L, bq, bk)
        if self.keep is None and self.mode not in STRUCTURED_MODES:
            rows = out.view(-1, j1 - j0)                               # (L * bq, bk), with room for whole words
            if not _compiled_patterns(rows, shared, j0, 1.0 - self.drop_ratio):
                counter_bits(shared, j0, j1, 1.0 - self.drop_ratio, out=rows)
        else:
            _additive_into(self._slice(self.keep, i0, i1, j0, j1) if self.keep is not None
                           else shared[:, :, j0:j1], out)
        if self.fallback is not None:
            out.masked_fill_(self.fallback[:, i0:i1, None], 0.0)
        if self.allowed is not None:
            out.masked_fill_(~self._slice(self.allowed, i0, i1, j0, j1), float("-inf"))
        if self.causal:
            out.masked_fill_(torch.arange(i0, i1)[:, None] < torch.arange(j0, j1), float("-inf"))
        if self.bias is not None:
            out += self._slice(self.bias, i0, i1, j0, j1)
        return out


def _scores(q_i, k, masks, shared, i0, i1, j0, j1):
    """Scaled logits of one tile with -inf where masked, (L, bq, bk): Eq. 12 on a tile."""
    s = torch.bmm(q_i, k[:, j0:j1].transpose(1, 2))                    # (L, bq, bk), q already scaled
    mask, bias = masks.tile(shared, i0, i1, j0, j1)
    if bias is not None:
        s += bias
    return s.masked_fill_(~mask, float("-inf"))


def _forward_rows(q_i, k, v, masks, i0, i1):
    """Rows i0:i1 of the output and their log-sum-exp, one key tile at a time (online softmax)."""
    L, bq = q_i.shape[:2]
    shared = masks.rows(i0, i1)
    m = q_i.new_full((L, bq, 1), float("-inf"))                        # running row maximum
    total = q_i.new_zeros(L, bq, 1)                                    # running sum of exp(s - m)
    acc = q_i.new_zeros(L, bq, v.shape[-1])                            # running sum of exp(s - m) v
    for j0, j1 in masks.key_tiles(i0, i1):
        s = _scores(q_i, k, masks, shared, i0, i1, j0, j1)             # (L, bq, bk)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)       # a row with nothing yet: exp(-inf) = 0
        p = s.sub_(m_safe).exp_()                                      # exp(s - m), in place
        alpha = (m - m_safe).exp_()
        total.mul_(alpha).add_(p.sum(-1, keepdim=True))
        acc.mul_(alpha).baddbmm_(p, v[:, j0:j1])
        m = m_new
    empty = total == 0                                                 # no key kept (or none allowed)
    out = acc.div_(total.masked_fill(empty, 1.0))                     # zeros where empty
    lse = (m + total.log()).masked_fill_(empty, float("inf"))         # exp(s - inf) = 0 in backward
    return out, lse, empty.squeeze(-1)


def _flash_rows(q_i, k, v, masks, i0, i1, scale):
    """Rows i0:i1 from SDPA's CPU flash kernel, one key tile per call, merged by their log-sum-exp."""
    shared = masks.rows(i0, i1)
    outs, lses, kept = [], [], torch.zeros(q_i.shape[:2], dtype=torch.bool)
    for j0, j1 in masks.key_tiles(i0, i1):
        mask = masks.float_tile(shared, i0, i1, j0, j1, q_i.dtype)
        o, lse = _CPU_FLASH(q_i[None], k[None, :, j0:j1], v[None, :, j0:j1], 0.0, False,
                            attn_mask=mask[None], scale=scale)         # (1, L, bq, E), (1, L, bq)
        any_kept = torch.ones_like(kept)
        suspect = lse[0] == 0                                          # the kernel gives an empty row lse 0
        if suspect.any():                                              # check only those rows
            any_kept[suspect] = (mask[suspect] > float("-inf")).any(-1)
        outs.append(o[0])
        lses.append(lse[0].masked_fill(~any_kept, float("-inf")))
        kept |= any_kept
    lse = torch.logsumexp(torch.stack(lses), 0) if len(lses) > 1 else lses[0]  # (L, bq)
    lse = lse.masked_fill(~kept, 0.0)                                  # empty: out 0, and p = 0 in backward
    out = outs[0] if len(outs) == 1 else sum((l_j - lse).exp()[..., None] * o_j for o_j, l_j in zip(outs, lses))
    return out, lse[..., None], ~kept


def _flash_rows_backward(do_i, q_i, k, v, out_i, lse_i, masks, i0, i1, scale, dq, dk, dv):
    """Gradients of rows i0:i1 from the kernel's backward, one key tile per call, added into dq, dk, dv."""
    shared = masks.rows(i0, i1)
    for j0, j1 in masks.key_tiles(i0, i1):
        mask = masks.float_tile(shared, i0, i1, j0, j1, q_i.dtype)
        grads = _CPU_FLASH_BACKWARD(do_i[None], q_i[None], k[None, :, j0:j1], v[None, :, j0:j1], out_i[None],
                                    lse_i[None, ..., 0], 0.0, False, attn_mask=mask[None], scale=scale)
        dq[:, i0:i1] += grads[0][0]                                    # with the whole row's out and lse, each
        dk[:, j0:j1] += grads[1][0]                                    # tile's share of the gradient is exact
        dv[:, j0:j1] += grads[2][0]


class _TiledAttention(torch.autograd.Function):
    """Masked attention by tiles of queries x keys (TILE_ELEMENTS mask elements each), flash-attention style.

    Forward: for each query tile, its key tiles merged by their log-sum-exp
    (SDPA's CPU flash kernel per tile, `_flash_rows`; or, without that private
    op, an online softmax on public ops, `_forward_rows`). Backward: every
    tile recomputed from q, k, v with its mask made again. Nothing of size
    Nq x Nk is stored: for backward q, k, v, out, the log-sum-exp (L, Nq) and
    the fall-back rows (L, Nq) bool, if any. Rows whose allowed keys were all
    dropped are found after their tile's first pass (nothing kept) and run
    again with their allowed keys (`fall_back`).
    q (L, Nq, E), k (L, Nk, E), v (L, Nk, Ev), contiguous; masks: _TileMasks.
    """

    @staticmethod
    def forward(ctx, q, k, v, masks, scale):
        L, Nq = q.shape[:2]
        out = q.new_empty(L, Nq, v.shape[-1])
        lse = q.new_empty(L, Nq, 1)
        fallback = torch.zeros(L, Nq, dtype=torch.bool)
        kernel = _flash_rows if _tiled_kernel(q, v) else (lambda q_i, *a: _forward_rows(q_i * scale, *a[:-1]))
        for i0, i1 in masks.query_tiles():
            out_i, lse_i, empty = kernel(q[:, i0:i1], k, v, masks, i0, i1, scale)
            if empty.any():                                            # rare: a row with every allowed key dropped
                fallback[:, i0:i1] = empty
                masks.fallback = fallback
                out_i, lse_i, _ = kernel(q[:, i0:i1], k, v, masks, i0, i1, scale)
            out[:, i0:i1], lse[:, i0:i1] = out_i, lse_i
        masks.fallback = fallback if fallback.any() else None
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks, ctx.scale = masks, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        masks, scale = ctx.masks, ctx.scale
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i0, i1 in masks.query_tiles():
            if _tiled_kernel(q, v):
                _flash_rows_backward(grad_out[:, i0:i1], q[:, i0:i1], k, v, out[:, i0:i1], lse[:, i0:i1],
                                     masks, i0, i1, scale, dq, dk, dv)
                continue
            shared = masks.rows(i0, i1)
            q_i, do_i, lse_i = q[:, i0:i1] * scale, grad_out[:, i0:i1], lse[:, i0:i1]
            delta = (do_i * out[:, i0:i1]).sum(-1, keepdim=True)       # (L, bq, 1): rowsum(dO o O)
            for j0, j1 in masks.key_tiles(i0, i1):
                p = _scores(q_i, k, masks, shared, i0, i1, j0, j1).sub_(lse_i).exp_()  # (L, bq, bk), Eq. 14
                dv[:, j0:j1].baddbmm_(p.transpose(1, 2), do_i)
                ds = torch.bmm(do_i, v[:, j0:j1].transpose(1, 2)).sub_(delta).mul_(p)  # dL/ds
                dq[:, i0:i1].baddbmm_(ds, k[:, j0:j1], alpha=scale)
                dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), q_i)
        return dq, dk, dv, None, None


def _tiled_kernel(q, v):
    """Whether the tiles go to SDPA's CPU flash kernel (a private op) rather than the public-op loop above."""
    return _CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None and q.dtype == torch.float32 \
        and q.shape[-1] == v.shape[-1]


def _cpu_flash_fits(q, k, v, bias):
    """Whether _FlashCPU can run these inputs: CPU eager, float32/bfloat16, (B, H, N, E) of one layout."""
    return (_CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None and q.device.type == "cpu"
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and q.dtype in (torch.float32, torch.bfloat16) and q.dim() == 4
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and q.shape[-1] == v.shape[-1]
            and (bias is None or not bias.requires_grad))


def _flex_mask_mod(seed, lead, Nq, drop_ratio, allowed, causal, fallback=None):
    """FlexAttention's mask_mod of DropKey: the bit of `counter_keep_mask` at (b, h, q, kv), then the masks.

    The same arithmetic as `counter_bits`, for one element: the row keys of
    the (B, H, Nq) rows are made here, once (`_row_keys`, row r = (b H + h)
    Nq + q); per element, the word of key kv // 4 and its 16-bit piece
    kv % 4, compared as an offset-binary number (+32768, so that the signed
    comparison of `counter_bits` holds). The seed and the threshold are
    tensors, so a compiled kernel is reused across calls and drop ratios.
    Composed with the boolean `allowed` (broadcast to (B, H, Nq, Nk)) and the
    causal triangle; `fallback` (B, H, Nq) marks rows that keep every allowed key.
    """
    B, H = lead
    device = seed.device
    row_keys = _row_keys(_seed_key(seed, 1, device), torch.arange(B * H * Nq, device=device)).view(B, H, Nq)
    limit = torch.tensor(_threshold(1.0 - drop_ratio) + 32768, device=device)
    reach = _allowed_mod(allowed, causal)

    def mask_mod(b, h, q_idx, kv_idx):
        word = mix64(row_keys[b, h, q_idx] + (kv_idx.long() // 4 + 1) * GOLDEN)
        keep = (((word >> (kv_idx.long() % 4) * 16) + 32768) & 0xFFFF) < limit    # Eq. 12: kept with 1 - d
        if fallback is not None:
            keep = keep | fallback[b, h, q_idx]
        return keep if reach is None else keep & reach(b, h, q_idx, kv_idx)

    return mask_mod


def _allowed_mod(allowed, causal):
    """The mask_mod of the keys a query may attend to: `allowed` (B, H, Nq, Nk) and the causal triangle; None: all."""
    if allowed is None and not causal:
        return None

    def reach(b, h, q_idx, kv_idx):
        keep = (kv_idx <= q_idx) if causal else (kv_idx >= 0)
        return keep if allowed is None else keep & allowed[b, h, q_idx, kv_idx]
    return reach


def _flex_kernel(device):
    """flex_attention compiled on CUDA (its fused kernel; compiled once per process and shape), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention                                          # the CPU tests: unfused, forward only
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["flex"]


FLEX_TILE = 128  # queries and keys per tile of FlexAttention's block mask (its default)


def _flex_tiles(lead, Nq, Nk, allowed, causal, device):
    """The (B, H, Nq / FLEX_TILE, Nk / FLEX_TILE) tiles that the allowed keys reach: the block mask's layout.

    A random mask drops keys in every tile, so no tile is full, and
    evaluating the dropping mask_mod over all N x N elements to learn that
    (what create_block_mask does) would cost as much as the attention. Only
    the allowed keys (padding, causal) decide which tiles are skipped.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    reach = _allowed_mod(allowed, causal)
    if reach is None:
        return torch.ones(1, 1, -(-Nq // FLEX_TILE), -(-Nk // FLEX_TILE), dtype=torch.bool, device=device)
    return create_block_mask(reach, *lead, Nq, Nk, device=device, BLOCK_SIZE=FLEX_TILE).to_dense().bool()


def _flex_block_mask(tiles, mask_mod, Nq, Nk):
    """A BlockMask with every reached tile partial: the mask_mod decides each element."""
    from torch.nn.attention.flex_attention import BlockMask
    kv_num_blocks = tiles.sum(-1, dtype=torch.int32)                  # (B, H, Nq / FLEX_TILE)
    kv_indices = tiles.int().argsort(dim=-1, descending=True, stable=True).int()  # the reached tiles first
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=FLEX_TILE, mask_mod=mask_mod,
                                    seq_lengths=(Nq, Nk))


def _flex_attention(query, key, value, seed, drop_ratio, attn_mask, is_causal, scale):
    """DropKey through `torch.nn.attention.flex_attention`: the mask is a function, nothing N x N is made.

    (B, H, N, E) inputs, a boolean attn_mask or none. The block mask is built
    on every call (each call has its own seed) without evaluating the
    mask_mod (`_flex_tiles`). The fall-back needs to know which rows kept
    no key: the kernel's log-sum-exp says (-inf), and only then is it run
    again with those rows' allowed keys (a host sync on the GPU for that
    check). Backward recomputes the mask from the same mask_mod, as
    FlexAttention does for any mask.
    """
    lead, (Nq, Nk) = query.shape[:2], (query.shape[-2], key.shape[-2])
    allowed = None if attn_mask is None else attn_mask.expand(*lead, Nq, Nk)
    flex = _flex_kernel(query.device)
    tiles = _flex_tiles(lead, Nq, Nk, allowed, is_causal, query.device)  # the same for a fall-back run

    def run(fallback):
        mask_mod = _flex_mask_mod(seed, lead, Nq, drop_ratio, allowed, is_causal, fallback)
        block_mask = _flex_block_mask(tiles, mask_mod, Nq, Nk)
        return flex(query, key, value, block_mask=block_mask, scale=scale, return_lse=True)

    out, lse = run(None)
    empty = lse == float("-inf")                                       # (B, H, Nq): no key kept
    if empty.any():
        out, _ = run(empty)
    return out


# Nq * Nk (one row block of one head) from which training takes the path that keeps nothing N x N:
# tiled on the CPU, FlexAttention on CUDA. Short rows stay whole even in a large batch, where one
# fused call with a mask tensor is cheaper: a ViT at N = 257, batch 128, trained 1.8x slower tiled on
# the CPU; at N = 65 on an H200, 5.6x slower than `none` through FlexAttention (its per-call cost).
LONG_ROWS = 2**20


def _flex_fits(q, k, v, attn_mask, mode):
    """Whether the FlexAttention path runs: CUDA, long rows, (B, H, N, E) of one leading shape, E and Ev >= 16
    (flex's least), a boolean mask or none."""
    if not (q.device.type == "cuda" and mode in ("dropkey", "dropattention") and not torch.compiler.is_compiling()
            and q.shape[-2] * k.shape[-2] >= LONG_ROWS
            and q.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2] and min(q.shape[-1], v.shape[-1]) >= 16
            and (attn_mask is None or attn_mask.dtype == torch.bool)):
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _tiled_fits(q, k, v, attn_mask, lead):
    """Whether _TiledAttention runs these inputs: CPU eager, float32/float64, long rows, no bias gradient."""
    return (q.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and q.dtype in (torch.float32, torch.float64) and len({q.dtype, k.dtype, v.dtype}) == 1
            and q.shape[-2] * k.shape[-2] >= LONG_ROWS
            and (attn_mask is None or not attn_mask.requires_grad))


def _flash_attention(query, key, value, attn_mask, is_causal, scale, mode, drop_ratio, keep, generator, structured):
    """`attention` from fused kernels; None where they cannot give its numbers (the explicit path runs).

    keep: the caller's keep_mask, or None: then, if drop_ratio > 0, the mask
    is `counter_keep_mask` of one seed drawn here (`draw_seed`), made whole
    for the kernels that take a mask tensor, tile by tile for the tiled path.
    No drop: SDPA itself. DropKey, its structured variants and DropAttention
    (Eq. 1 = Eq. 14): the allowed-and-kept keys as the kernel's mask, after
    `fall_back`; long rows on the CPU: `_TiledAttention`. Vanilla dropout is
    not a masked softmax: explicit path (None before any seed is drawn).
    """
    Nq, Nk = query.shape[-2], key.shape[-2]
    dropping = keep is not None or drop_ratio > 0
    if not dropping and not (attn_mask is not None and is_causal):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, is_causal=is_causal, scale=scale)
    if dropping and mode == "vanilla":
        return None
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    if dropping and keep is None and not _fast_sampler(query.device):  # under torch.compile: torch's RNG
        keep = sample_keep_mask((*lead, Nq, Nk), mode, drop_ratio, **structured, device=query.device,
                                generator=generator)
    seed = draw_seed(generator, query.device) if dropping and keep is None else None
    if mode in STRUCTURED_MODES and seed is not None:
        _check_grid(structured["grid"], Nk, structured["prefix_tokens"], structured["block_size"])
    if dropping and _tiled_fits(query, key, value, attn_mask, lead):
        boolean = attn_mask is not None and attn_mask.dtype == torch.bool
        masks = _TileMasks(lead, Nq, Nk, mode, drop_ratio, seed, keep, attn_mask if boolean else None,
                           None if boolean else attn_mask, is_causal, structured)
        L = math.prod(lead)
        q, k, v = (t.expand(*lead, *t.shape[-2:]).reshape(L, *t.shape[-2:]).contiguous()
                   for t in (query, key, value))                       # (L, N, E)
        return _TiledAttention.apply(q, k, v, masks, scale).view(*lead, Nq, value.shape[-1])
    if seed is not None and _flex_fits(query, key, value, attn_mask, mode):
        return _flex_attention(query, key, value, seed, drop_ratio, attn_mask, is_causal, scale)
    if seed is not None:
        keep = counter_keep_mask(seed, (*lead, Nq, Nk), mode, drop_ratio, **structured)  # (..., Nq, Nk)
    allowed, bias = allowed_keys(attn_mask, is_causal, Nq, Nk, query.device)
    if keep is None:                                                   # attn_mask and is_causal: SDPA takes one
        mask = allowed if bias is None else torch.where(allowed, bias, float("-inf"))
        return F.scaled_dot_product_attention(query, key, value, mask, scale=scale)
    if bias is not None:
        bias = bias.expand(*lead, Nq, Nk)
    if _cpu_flash_fits(query, key, value, bias):                      # fall_back inside, only where needed
        kept = (keep if allowed is None else keep & allowed).expand(*lead, Nq, Nk)
        return _FlashCPU.apply(query, key, value, kept, allowed, bias, scale)
    keep = fall_back(keep, allowed).expand(*lead, Nq, Nk)              # (..., Nq, Nk)
    mask = keep if bias is None else torch.where(keep, bias, float("-inf"))
    return F.scaled_dot_product_attention(query, key, value, mask, scale=scale)


# ----------------------------------------------------------------------------- benchmark
# `python dropkey.py` times every mode against plain SDPA, forward + backward (README, Performance).

def algorithm1(q, k, v, drop_ratio):
    """The paper's Algorithm 1, as published: a float Bernoulli mask times -1e12 (a reference to time)."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5            # (B, H, N, N)
    m_r = torch.ones_like(attn) * drop_ratio
    attn = attn + torch.bernoulli(m_r) * -1e12
    return attn.softmax(dim=-1) @ v                                    # (B, H, N, D)


def saved_bytes(fn):
    """Bytes of the distinct storages that autograd keeps for backward while running fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def peak_bytes(fn, device="cpu"):
    """Peak memory that fn() adds, in bytes: on CUDA torch's allocator; on CPU the process's resident set.

    CPU (Linux): freed heap memory is handed back (malloc_trim), the
    high-water mark of the resident set reset (/proc/self/clear_refs), then
    VmHWM after fn() minus VmRSS before it: every byte the process touched,
    allocator and kernel scratch included. None where /proc is not there.
    """
    import ctypes
    import re
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024
    try:
        getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return status("VmHWM") - before


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


def _time_cases(cases, grad, runs, device, memory=True):
    """Forward + backward (with the dense `grad`, as in training) of every case: times, first calls, peaks."""
    steps = {name: (lambda fn=fn: fn().backward(grad)) for name, fn in cases.items()}
    first = {}
    times = time_rounds(steps, runs, device, first)
    peak = {name: peak_bytes(step, device) if memory else None for name, step in steps.items()}
    return times, first, peak


def _bench(B, H, N, D, runs, dtype, device, drop_ratio=0.3, memory=True):
    side = math.isqrt(N - 1)
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    cases = {"SDPA, no dropout": lambda: F.scaled_dot_product_attention(q, k, v)}
    for mode in DROPPING_MODES:
        cases[mode] = lambda mode=mode: attention(q, k, v, drop_ratio=drop_ratio, mode=mode,
                                                  grid=(side, side), block_size=min(3, side))
    cases["paper Algorithm 1"] = lambda: algorithm1(q, k, v, drop_ratio)
    times, first, peak = _time_cases(cases, torch.randn_like(q), runs, device, memory)
    saved = {name: saved_bytes(fn) for name, fn in cases.items()}
    base = times["SDPA, no dropout"]
    tiled = _tiled_fits(q, k, v, None, (B, H)) and FLASH
    print(f"\nfwd+bwd, (B, H, N, D) = ({B}, {H}, {N}, {D}), {str(dtype)[6:]} on {device}, d = {drop_ratio}, "
          f"{runs} rounds; mask elements: {B * H * N * N:,}; {'tiled' if tiled else 'whole-mask'} fast path")
    print(f"{'mode':<20}{'median ms':>10}{'x SDPA':>8}{'1st call':>10}{'peak MB':>9}{'saved MB':>10}")
    for name, ts in times.items():
        mb = "n/a" if peak[name] is None else f"{peak[name] / 2**20:.1f}"
        print(f"{name:<20}{median(ts):10.2f}{paired_ratio(ts, base):8.2f}{first[name]:10.1f}{mb:>9}"
              f"{saved[name] / 2**20:10.1f}")
    print(f"dropkey is {paired_ratio(times['paper Algorithm 1'], times['dropkey']):.2f}x faster than "
          f"Algorithm 1 (x: median of per-round ratios)")


def _bench_flex(B, H, N, D, runs, drop_ratio=0.3):
    """CUDA, bfloat16: DropKey in FlexAttention against the fused kernels without dropout and SDPA's dropout_p."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))

    def flash(**kw):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    seed = draw_seed(device="cuda")
    cases = {"flash SDPA, no dropout": flash,
             f"flash SDPA, dropout_p={drop_ratio}": lambda: flash(dropout_p=drop_ratio),
             "flex, no mask": lambda: _flex_kernel(q.device)(q, k, v),
             "dropkey in flex": lambda: attention(q, k, v, drop_ratio=drop_ratio),
             "dropkey, mask tensor": lambda: attention(
                 q, k, v, keep_mask=counter_keep_mask(seed, (B, H, N, N), drop_ratio=drop_ratio),
                 drop_ratio=drop_ratio)}
    times, first, peak = _time_cases(cases, torch.randn_like(q), runs, "cuda")
    base = times["flash SDPA, no dropout"]
    print(f"\nfwd+bwd, (B, H, N, D) = ({B}, {H}, {N}, {D}), bfloat16 on {torch.cuda.get_device_name()}, "
          f"d = {drop_ratio}, {runs} rounds")
    print(f"{'kernel':<28}{'median ms':>10}{'x flash':>8}{'1st call':>10}{'peak MB':>9}")
    for name, ts in times.items():
        print(f"{name:<28}{median(ts):10.3f}{paired_ratio(ts, base):8.2f}{first[name]:10.1f}"
              f"{peak[name] / 2**20:9.1f}")


def _main():
    import argparse
    parser = argparse.ArgumentParser(
        description="Time every attention-dropout mode (fwd+bwd) against SDPA, with its peak memory "
                    "(CPU: growth of the resident set, see peak_bytes; CUDA: torch's allocator).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", default="128,4,65,32;32,4,257,32;8,4,1025,32;1,4,4097,32",
                        help="B,H,N,D;... with N - 1 a square (the patch grid)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=20,
                        help="rounds at N <= 257 (each times every row once); fewer for longer rows, "
                             "down to 3 (the explicit rows take seconds there)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the peak-memory column (one more untimed call per row)")
    parser.add_argument("--flex", metavar="SHAPES", nargs="?", const="8,12,1024,64;2,12,4096,64",
                        help="CUDA: time DropKey in FlexAttention instead, at these B,H,N,D;... in bfloat16")
    args = parser.parse_args()
    if args.flex is not None:
        if not torch.cuda.is_available():
            parser.error("--flex needs a CUDA GPU")
        try:
            shapes = [tuple(int(x) for x in s.split(",")) for s in args.flex.split(";") if s]
            assert shapes and all(len(s) == 4 and min(s) > 0 for s in shapes)
        except (ValueError, AssertionError):
            parser.error("--flex takes B,H,N,D;...")
        for B, H, N, D in shapes:
            _bench_flex(B, H, N, D, args.runs)
        return
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
        assert all(len(s) == 4 and s[2] > 1 and math.isqrt(s[2] - 1) ** 2 == s[2] - 1 for s in shapes)
    except (ValueError, AssertionError):
        parser.error("--shapes is B,H,N,D;... with N - 1 a square")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for B, H, N, D in shapes:
        runs = max(min(args.runs, 3), args.runs * 257**2 // max(N, 257)**2)
        _bench(B, H, N, D, runs, getattr(torch, args.dtype), torch.device(args.device), memory=args.memory)


if __name__ == "__main__":
    _main()
