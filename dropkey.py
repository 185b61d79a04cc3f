"""DropKey (Li et al., "DropKey for Vision Transformer", CVPR 2023) as a drop-in for
`F.scaled_dot_product_attention`, with every attention-dropout mode the paper compares.

In the paper's order: `layer_drop_ratios` (Sec. 3.2, Table 1), `sample_keep_mask` (Eq. 12,
Fig. 2), `masked_softmax` and `attention` (Eq. 12-14), `aligned_attention` (Table 4),
`expected_weights` (Eq. 3-4). A first reading can stop after `attention`. The idea:

    logits = q @ k.transpose(-2, -1) * scale
    logits = logits.masked_fill(torch.rand_like(logits) < drop_ratio, -inf)   # Eq. 12
    out = logits.softmax(-1) @ v                                              # Eq. 13-14

`dropkey.FLASH` hands the same mask to the fused F.scaled_dot_product_attention (True) or
runs the softmax written out (False): same numbers. Long rows go to long_rows.py, if present.
"""
import math
import numbers

import torch
import torch.nn.functional as F

MODES = ("none", "vanilla", "dropattention", "dropkey", "dropkey_block", "dropkey_cross")
DROPPING_MODES = MODES[1:]
STRUCTURED_MODES = ("dropkey_block", "dropkey_cross")
DROPKEY_MODES = ("dropkey",) + STRUCTURED_MODES     # -inf on the logits before the softmax
SCHEDULES = ("constant", "increasing", "decreasing")
FLASH = True            # fused SDPA with the same mask; False: the softmax written out (same numbers)
NOT_ALLOWED_AT = -1e4   # a float attn_mask entry <= this is padding: never attended, never a fall-back
LONG_ROWS = 2**20       # Nq * Nk from which long_rows.py (if present) takes DropKey, without an N x N mask


# ----------------------------------------------------------------------------- schedules

def layer_drop_ratios(drop_ratio, depth, schedule="decreasing"):
    """Drop ratio of every layer, a list of `depth` floats (Sec. 3.2, Table 1).

    constant: d everywhere. decreasing (the paper's best): d (depth - 1 - i) / (depth - 1),
    from d in the first layer to 0 in the last; increasing: the reverse. The endpoints are
    this project's choice (the paper gives none): both lines have mean d / 2.
    """
    d = _check_ratio(drop_ratio)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    if schedule == "constant" or depth == 1:
        return [d] * depth
    ratios = [d * (depth - 1 - i) / (depth - 1) for i in range(depth)]
    return ratios if schedule == "decreasing" else ratios[::-1]


# ----------------------------------------------------------------------------- masks

def uniforms(shape, *, device=None, generator=None):
    """Uniform int16 in [-2^15, 2^15) of `shape`: 64-bit words of torch's generator, read as four each."""
    n = math.prod(shape)
    seed = {} if generator is None else dict(generator=generator)    # generator=None upsets torch.compile
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device, **seed)
    return words.view(torch.int16)[:n].view(shape)


def level(prob):
    """u >= level(prob) has probability prob rounded to a multiple of 2^-16, at least 2^-16 (never 0)."""
    return 32768 - min(max(round(prob * 65536), 1), 65536)


def bernoulli_mask(shape, prob, *, device=None, generator=None):
    """Bool tensor of `shape`, each element True independently with probability `prob` (on a 2^-16 grid)."""
    return uniforms(shape, device=device, generator=generator) >= level(prob)


def _dilate(x, s, dim):
    """Boolean OR-dilation along `dim`: out[i] = any(x[i-s+1 .. i]); length grows by s - 1."""
    shape = list(x.shape)
    shape[dim] += s - 1
    out = x.new_zeros(shape)
    for offset in range(s):  # a loop over the window, never over tokens
        out.narrow(dim, offset, x.shape[dim]).logical_or_(x)
    return out


def _structured_drop(seeds, mode, s):
    """Dropped keys (..., n_h * n_w) of DropKey-Block or -Cross from seeds (..., n_h-s+1, n_w-s+1) (Fig. 2)."""
    if mode == "dropkey_block":  # each seed drops the s x s window below-right of it
        drop = _dilate(_dilate(seeds, s, -2), s, -1)                   # (..., n_h, n_w)
    else:                        # each seed drops s full rows and s full columns
        rows = _dilate(seeds.any(-1), s, -1)                           # (..., n_h)
        cols = _dilate(seeds.any(-2), s, -1)                           # (..., n_w)
        drop = rows.unsqueeze(-1) | cols.unsqueeze(-2)                 # (..., n_h, n_w)
    return drop.flatten(-2)                                            # (..., n_h * n_w)


def sample_keep_mask(shape, mode="dropkey", drop_ratio=0.0, *, grid=None, prefix_tokens=1,
                     block_size=3, device=None, generator=None):
    """A keep mask (True = kept) of `shape` = (..., Nq, Nk): every query row its own (Sec. 3.2).

    vanilla, dropattention, dropkey: each key dropped with probability d (Eq. 12).
    dropkey_block, dropkey_cross: seeds on the n_h x n_w patch grid, each dropping an
    s x s window or s rows and s columns (Fig. 2); the `prefix_tokens` keys before the
    grid (the class token) are dropped at d. The all-dropped rule comes later (`fall_back`).
    """
    *lead, n_keys = shape
    d = _check_ratio(drop_ratio)
    if mode not in STRUCTURED_MODES:
        return bernoulli_mask(shape, 1.0 - d, device=device, generator=generator)
    _check_grid(grid, n_keys, prefix_tokens, block_size)
    (n_h, n_w), s = grid, block_size
    prefix_drop = bernoulli_mask((*lead, prefix_tokens), d, device=device, generator=generator)
    seeds = bernoulli_mask((*lead, n_h - s + 1, n_w - s + 1), seed_rate(mode, d, grid, s), device=device,
                           generator=generator)                        # (..., n_h-s+1, n_w-s+1), at gamma
    grid_drop = _structured_drop(seeds, mode, s)                       # (..., n_h * n_w)
    return ~torch.cat([prefix_drop, grid_drop], dim=-1)                # (..., Nq, Nk)


def allowed_keys(attn_mask, is_causal, Nq, Nk, device):
    """The keys each query may attend to, from SDPA's `attn_mask` and `is_causal`.

    bool attn_mask: True = allowed (SDPA's meaning). A float one is added to the logits;
    entries at or below NOT_ALLOWED_AT (-inf, finfo.min, -1e9, BERT's -1e4) are padding,
    not allowed. is_causal allows keys j <= i. Returns (allowed, bias): bool broadcastable
    to (..., Nq, Nk) or None (all allowed), and the float bias or None.
    """
    bias = None if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask
    allowed = attn_mask if bias is None else bias > NOT_ALLOWED_AT     # (..., Nq, Nk) or None
    if is_causal:
        causal = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()  # (Nq, Nk)
        allowed = causal if allowed is None else allowed & causal
    return allowed, bias


def fall_back(keep, allowed=None):
    """Drop only among allowed keys; a query whose allowed keys are all dropped keeps them.

    Eq. 1 is 0/0 for a row with nothing kept; it gets its undropped weights over the allowed
    keys (never a padded or future key). A row with no allowed key stays empty, as SDPA.
    """
    kept = keep if allowed is None else keep & allowed                 # (..., Nq, Nk)
    nothing_kept = ~kept.any(dim=-1, keepdim=True)                     # (..., Nq, 1)
    return kept | (nothing_kept if allowed is None else nothing_kept & allowed)


# ----------------------------------------------------------------------------- attention

def masked_softmax(logits, mask):
    """softmax over the keys where `mask` is True (Eq. 12 then 14); a row with none gives zeros, as SDPA."""
    if mask is None:
        return logits.softmax(dim=-1)                                  # Eq. 2
    masked = torch.where(mask, logits, float("-inf"))                  # Eq. 12
    weights = masked.softmax(dim=-1)                                   # Eq. 14
    return torch.where(mask.any(dim=-1, keepdim=True), weights, 0.0)   # (..., Nq, Nk)


def dropped_weights(logits, keep, mode, drop_ratio, allowed=None):
    """Weights under `mode`'s drop, given logits and a raw keep mask, (..., Nq, Nk).

    dropkey, -block, -cross (Eq. 12-14): -inf on the dropped logits, then softmax.
    dropattention (Eq. 1): softmax, dropped p_j zeroed, re-normalised (DropKey's numbers
      unless every kept p_j underflows: 0/0 keeps p). vanilla: nn.Dropout, kept p_j / (1 - d).
    """
    if mode in DROPKEY_MODES:
        return masked_softmax(logits, fall_back(keep, allowed))        # Eq. 12-14
    p = masked_softmax(logits, allowed)                                # Eq. 2
    if mode in ("none", "vanilla"):
        return p if mode == "none" else torch.where(keep, p, 0.0) / (1.0 - drop_ratio)  # nn.Dropout's rule
    kept = torch.where(fall_back(keep, allowed), p, 0.0)               # k_j p_j, k_j in {0, 1}
    total = kept.sum(dim=-1, keepdim=True)                             # (..., Nq, 1)
    return torch.where(total > 0, kept / total, p)                     # Eq. 1


def attention(query, key, value, attn_mask=None, drop_ratio=0.0, is_causal=False, scale=None, *,
              enable_gqa=False, mode="dropkey", training=True, keep_mask=None, grid=None,
              prefix_tokens=1, block_size=3, generator=None, return_weights=False):
    """`F.scaled_dot_product_attention` with the attention dropout of `mode` (Eq. 12-14 for DropKey).

    `F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p)` becomes
    `dropkey.attention(q, k, v, attn_mask=m, drop_ratio=p, training=self.training)`:
    arguments, shapes and mask meaning are SDPA's.

    Args:
      query (..., Nq, E), key (..., Nk, E), value (..., Nk, Ev); leading dims broadcast;
        enable_gqa: key and value may have fewer heads (dim -3), as SDPA.
      attn_mask: bool (True = may attend) or float of query's dtype (added to the logits;
        entries <= NOT_ALLOWED_AT are padding: never attended, even when every other key
        is dropped), broadcastable to (..., Nq, Nk). is_causal: keys j <= i. scale: 1 / sqrt(E).
      drop_ratio: d in [0, 1), a number or 0-dim tensor. mode: one of MODES.
      training: drop only when True; otherwise this is SDPA (see `aligned_attention`).
      keep_mask: bool (..., Nq, Nk), True = kept: replaces the sampled mask (never modified).
      grid, prefix_tokens, block_size: the keys' patch grid (n_h, n_w), the tokens before
        it, and s, for dropkey_block / dropkey_cross. generator: for the mask.
    Keys are dropped among those a query may attend to (`fall_back`).
    Returns out (..., Nq, Ev), or (out, weights (..., Nq, Nk)) with return_weights.
    """
    d = _check_attention(query, key, value, attn_mask, drop_ratio, is_causal, scale, mode,
                         training, keep_mask, generator, enable_gqa)
    key, value, lead, scale = _heads(query, key, value, scale, enable_gqa)  # lead: (...) of the output
    Nq, Nk = query.shape[-2], key.shape[-2]
    dropping = mode != "none" and training and (keep_mask is not None or d > 0)
    fused = FLASH and not return_weights                               # SDPA does the softmax, same mask
    if fused and dropping and mode in DROPKEY_MODES and Nq * Nk >= LONG_ROWS and not torch.compiler.is_compiling():
        out = _long_rows_attention(query, key, value, attn_mask, d, is_causal, scale, mode=mode,
                                   keep_mask=keep_mask, generator=generator, grid=grid,
                                   prefix_tokens=prefix_tokens, block_size=block_size)
        if out is not None:
            return out
    if fused and dropping and mode == "dropkey" and keep_mask is None and attn_mask is None and not is_causal:
        mask = _dropkey_bias((*lead, Nq, Nk), d, query.dtype, query.device, generator)  # the mask below
        return F.scaled_dot_product_attention(query, key, value, mask, scale=scale)
    keep = None                                                        # None: nothing dropped
    if dropping:
        keep = keep_mask if keep_mask is not None else sample_keep_mask(
            (*lead, Nq, Nk), mode, d, grid=grid, prefix_tokens=prefix_tokens, block_size=block_size,
            device=query.device, generator=generator)                  # (..., Nq, Nk), Eq. 12's k_j
    if fused and keep is None and attn_mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale)
    allowed, bias = allowed_keys(attn_mask, is_causal, Nq, Nk, query.device)  # (..., Nq, Nk) or None
    after = keep is not None and mode in ("vanilla", "dropattention")  # dropped after the softmax
    kept = allowed if keep is None or after else fall_back(keep, allowed)  # (..., Nq, Nk) or None
    if fused and not after:
        mask = kept if bias is None else torch.where(kept, bias, float("-inf"))
        return F.scaled_dot_product_attention(query, key, value, mask, scale=scale)
    logits = query @ key.transpose(-2, -1) * scale                     # (..., Nq, Nk), q k^T / sqrt(E)
    if bias is not None:
        logits = logits + bias                                         # a float attn_mask
    if after:
        weights = dropped_weights(logits, keep, mode, d, allowed)      # Eq. 1, or nn.Dropout's rule
    else:
        masked = logits if kept is None else torch.where(kept, logits, float("-inf"))  # Eq. 12
        weights = masked.softmax(dim=-1)                               # Eq. 14
        if kept is not None:                                           # no allowed key: zeros, as SDPA
            weights = torch.where(kept.any(dim=-1, keepdim=True), weights, 0.0)
    out = weights @ value                                              # Eq. 13, (..., Nq, Ev)
    return (out, weights) if return_weights else out


def _dropkey_bias(shape, d, dtype, device, generator):
    """fall_back(sample_keep_mask(shape, "dropkey", d)) from the same draws as SDPA's float mask, 0 kept and
    finfo.min dropped (-inf's effect: every row keeps a key), in passes that are fast on a CPU (no where)."""
    u = uniforms(shape, device=device, generator=generator)            # (..., Nq, Nk)
    row = torch.where(u.amax(-1, keepdim=True) < level(1.0 - d), -32768, level(1.0 - d))  # nothing kept: all
    dropped = (u < row.to(torch.int16)).view(torch.uint8)              # uint8: cast to float faster than bool
    return dropped.to(dtype).mul_(torch.finfo(dtype).min)              # (..., Nq, Nk)


def _heads(query, key, value, scale, enable_gqa):
    """key, value with a head per query head (GQA), the output's leading shape, and the scale (E = 0: 1)."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    return key, value, lead, 1 / math.sqrt(query.shape[-1] or 1) if scale is None else scale


def _long_rows_attention(*args, **kwargs):
    """long_rows.attention where that optional file is present; None where it is absent or declines."""
    try:
        import long_rows
    except ImportError:
        return None
    return long_rows.attention(*args, **kwargs)


# ----------------------------------------------------------------------------- Align Expectation

@torch.no_grad()
def aligned_attention(query, key, value, attn_mask=None, drop_ratio=0.0, is_causal=False, scale=None, *,
                      enable_gqa=False, mode="dropkey", mc_samples=0, grid=None, prefix_tokens=1,
                      block_size=3, generator=None, return_weights=False):
    """Evaluation with the expected dropped weights: Align Expectation (Sec. 3.2, Table 4).

    mc_samples = T > 0: the paper's Monte-Carlo alignment, the dropped weights averaged
    over T masks. mc_samples = 0: its limit T -> inf, c_j p_j of Eq. 3 (`expected_weights`);
    p for vanilla (nn.Dropout keeps E[w] = p); not for block / cross (drops not independent).
    Arguments and returns as `attention`'s; no autograd.
    """
    d = _check_attention(query, key, value, attn_mask, drop_ratio, is_causal, scale, mode,
                         False, None, generator, enable_gqa)
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 0:
        raise ValueError(f"mc_samples must be a non-negative integer, got {mc_samples!r}")
    if mc_samples == 0 and mode in STRUCTURED_MODES:
        raise ValueError(f"exact alignment is not defined for {mode} (drops not independent); use mc_samples=T")
    key, value, lead, scale = _heads(query, key, value, scale, enable_gqa)
    Nq, Nk = query.shape[-2], key.shape[-2]
    allowed, bias = allowed_keys(attn_mask, is_causal, Nq, Nk, query.device)
    logits = query @ key.transpose(-2, -1) * scale                     # (..., Nq, Nk)
    if bias is not None:
        logits = logits + bias
    if mode == "none" or d == 0 or (mc_samples == 0 and mode == "vanilla"):
        weights = masked_softmax(logits, allowed)                      # p of Eq. 2: nothing to align
    elif mc_samples == 0:                                              # c_j p_j, Eq. 3
        masked = logits if allowed is None else torch.where(allowed, logits, float("-inf"))
        weights = expected_weights(logits=masked, drop_ratio=d).to(value.dtype)
    else:
        total = torch.zeros_like(logits, dtype=torch.float32)          # one mask at a time
        for _ in range(mc_samples):
            keep = sample_keep_mask((*lead, Nq, Nk), mode, d, grid=grid, prefix_tokens=prefix_tokens,
                                    block_size=block_size, device=query.device, generator=generator)
            total += dropped_weights(logits, keep, mode, d, allowed)
        weights = (total / mc_samples).to(value.dtype)                 # estimate of c_j p_j (Eq. 3)
    out = weights @ value                                              # (..., Nq, Ev)
    return (out, weights) if return_weights else out


# ----------------------------------------------------------------------------- exact rates and expectations

def seed_rate(mode, drop_ratio, grid, block_size):
    """Rate gamma of the seeds on the valid region (Sec. 3.2), capped at 1.

    gamma = d / K * n_h n_w / ((n_h - s + 1)(n_w - s + 1)), K the keys one seed drops:
    s^2 (block), s (n_h + n_w - s) (cross: s rows and s columns). Overlaps lower the rate.
    """
    (n_h, n_w), s = grid, block_size
    per_seed = s * s if mode == "dropkey_block" else s * (n_h + n_w - s)
    return min(1.0, drop_ratio / per_seed * n_h * n_w / ((n_h - s + 1) * (n_w - s + 1)))


def key_drop_rates(mode, drop_ratio, grid, block_size=3):
    """Exact probability that each patch key is dropped, an (n_h, n_w) float64 tensor.

    dropkey, dropattention, vanilla: d for every key (Eq. 12); none: 0. Block and cross: seeds
    fall independently at gamma (`seed_rate`) on the valid region, so a key covered by m
    possible seeds is dropped with 1 - (1 - gamma)^m. With r(i) = min(i, n - s) - max(0, i - s + 1)
    + 1 seed rows (or columns) covering i, m = r(i) r(j) for a block, r(i) (n_w - s + 1) +
    (n_h - s + 1) r(j) - r(i) r(j) for a cross: corners are dropped less, centres more.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    _check_ratio(drop_ratio)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(n, int) and n > 0 for n in grid)):
        raise ValueError(f"grid must be (n_h, n_w), two positive integers, got {grid!r}")
    n_h, n_w = grid
    if mode not in STRUCTURED_MODES:
        return torch.full((n_h, n_w), 0.0 if mode == "none" else float(drop_ratio), dtype=torch.float64)
    _check_grid(grid, n_h * n_w + 1, 1, block_size)
    s = block_size

    i, j = torch.arange(n_h, dtype=torch.float64), torch.arange(n_w, dtype=torch.float64)
    r_h = (i.clamp(max=n_h - s) - (i - s + 1).clamp(min=0) + 1)[:, None]  # (n_h, 1): r(i)
    r_w = (j.clamp(max=n_w - s) - (j - s + 1).clamp(min=0) + 1)[None, :]  # (1, n_w): r(j)
    if mode == "dropkey_block":
        covering = r_h * r_w                                          # (n_h, n_w)
    else:
        covering = r_h * (n_w - s + 1) + (n_h - s + 1) * r_w - r_h * r_w
    gamma = seed_rate(mode, drop_ratio, grid, block_size)
    return 1 - (1 - gamma) ** covering                                # (n_h, n_w)


# Trapezoid step h in y, and the size below which the rest of the integral is dropped, per precision.
QUADRATURE = {torch.float64: (0.5, 1e-9), torch.float32: (0.6, 1e-7)}
_CHUNK = 2**20  # elements of one (rows, nodes, N) block: bounds memory (3 such tensors), few ops
LN2 = math.log(2)


def _nodes(h, k0, k1, y_lo, device=None):
    """Trapezoid nodes k0 .. k1-1 in y: t = exp(y - e^-y) and the weights h (dt/dy) / t."""
    y = y_lo + h * torch.arange(k0, k1, dtype=torch.float64, device=device)
    return torch.exp(y - torch.exp(-y)), h * (1 + torch.exp(-y))


def _first_node(h, tol):
    """First node y_lo, and `below`: the nodes under it summed in closed form (integrand ~ p_j there)."""
    for y_lo in torch.arange(-1.0, -4.0, -0.05).tolist():
        t, w = _nodes(h, -300, 0, y_lo)
        if (w * t * t).sum() <= tol:
            return y_lo, (w * t).sum().item()
    raise AssertionError("no first node found")


_FIRST = {dtype: _first_node(*QUADRATURE[dtype]) for dtype in QUADRATURE}


def _integrate(q, d, work, coefficient):
    """The integral of `expected_weights` for rows q (R, N) summing to 1, (R, N), in `work` precision.

    coefficient=False: int_0^inf p_j e^{-t p_j} prod_{i != j} f_i(t) dt, f_i = d + (1 - d) e^{-t p_i},
    to an absolute error ~tol (for E[w_j]); True: without the factor p_j, to a relative error ~tol
    (for c_j, whose tail reaches t ~ 1 / p_j). Derivation and error bounds: docs/align-expectation.md.
    """
    (R, N), device = q.shape, q.device
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
    DropAttention (Eq. 1) give w_j = k_j p_j / sum_i k_i p_i (p itself when nothing
    is kept, `fall_back`). Writing 1 / s = int_0^inf e^{-ts} dt, the expectation factorises:

      E[w_j] = (1 - d) p_j int_0^inf e^{-t p_j} prod_{i != j} (d + (1 - d) e^{-t p_i}) dt + d^M p_j

    M = #{i: p_i > 0}. This is Table 4's Monte-Carlo average in the limit of infinitely
    many masks. The integral is a trapezoid rule after t = exp(y - e^-y), O(N) per node
    and row; error against all 2^N masks ~1e-7 (float64 input) or ~2e-6 (other inputs,
    integrated in float32). Rows are re-normalised first; the result sums to 1.
    A weight that underflowed to 0 cannot take part (DropAttention's rule); pass `logits=`
    (keyword only) instead to follow DropKey's masked softmax, which still gives such a
    key weight when every larger key is dropped. Eval only. Returns E[w], same shape and dtype.
    """
    d = _check_ratio(drop_ratio)
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

    c_j = (1 - d) int_0^inf e^{-t p_j} prod_{i != j} (d + (1 - d) e^{-t p_i}) dt + d^M,
    the integral of `expected_weights` without its factor p_j, integrated in float64
    until t p_j >= 40 for every key: relative error below 1e-7 for p_j down to 1e-300
    (E[w_j] / p_j would lose small p_j). Eq. 4: c_s < c_t when p_s > p_t. A key with
    p_j = 0 gets +inf (the limit); at d = 0 every c_j is 1. Rows are re-normalised first.
    """
    d = _check_ratio(drop_ratio)
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
    """d as a float: a number, numpy scalar or 0-dim tensor in [0, 1) (as SDPA's dropout_p)."""
    number = isinstance(drop_ratio, numbers.Real) and not isinstance(drop_ratio, bool)
    scalar = (isinstance(drop_ratio, torch.Tensor) and drop_ratio.dim() == 0
              and (drop_ratio.is_floating_point() or drop_ratio.dtype in (torch.int32, torch.int64)))
    d = float(drop_ratio) if number or scalar else math.nan
    if not 0.0 <= d < 1.0:
        raise ValueError(f"drop_ratio must be a number in [0, 1), got {drop_ratio!r}")
    return d


def _check_grid(grid, n_keys, prefix_tokens, block_size):
    if grid is None:
        raise ValueError("dropkey_block and dropkey_cross need grid=(n_h, n_w), the patch grid of the keys")
    if len(grid) != 2 or grid[0] * grid[1] != n_keys - prefix_tokens:
        raise ValueError(f"grid {tuple(grid)} does not match {n_keys} keys with "
                         f"prefix_tokens={prefix_tokens}: need n_h * n_w == {n_keys - prefix_tokens}")
    if not (isinstance(block_size, int) and 1 <= block_size <= min(grid)):
        raise ValueError(f"block_size must be between 1 and {min(grid)} for grid {tuple(grid)}, got {block_size}")


def _check_mask(name, mask, target, device):
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but query is on {device}")
    if not 2 <= mask.dim() <= len(target) or any(m not in (1, t) for m, t in zip(mask.shape[::-1], target[::-1])):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to (..., Nq, Nk) = {tuple(target)}")


def _check_attention(query, key, value, attn_mask, drop_ratio, is_causal, scale, mode, training,
                     keep_mask, generator, enable_gqa):
    """Every argument of `attention` checked, each mistake one ValueError; returns d as a float."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    d = _check_ratio(drop_ratio)
    tensors = dict(query=query, key=key, value=value)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
            got = f"{tuple(t.shape)} of {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point tensor (..., N, E), got {got}")
    if len({t.device for t in tensors.values()}) > 1 or (len({t.dtype for t in tensors.values()}) > 1
                                                         and not torch.is_autocast_enabled(query.device.type)):
        raise ValueError(f"query, key, value must share one device and dtype; got devices {query.device}, "
                         f"{key.device}, {value.device} and dtypes {query.dtype}, {key.dtype}, {value.dtype}")
    shapes = f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"need query (..., Nq, E), key (..., Nk, E), value (..., Nk, Ev); got {shapes}")
    if query.shape[-2] == 0 or key.shape[-2] == 0:
        raise ValueError(f"empty sequence: need a query and a key, got Nq = {query.shape[-2]}, Nk = {key.shape[-2]}")
    kv_lead = [key.shape[:-2], value.shape[:-2]]
    if enable_gqa:
        if min(t.dim() for t in tensors.values()) < 3 or any(query.shape[-3] % t.shape[-3] for t in (key, value)):
            raise ValueError(f"enable_gqa needs (..., H, N, E) with key/value heads dividing query heads, got {shapes}")
        kv_lead = [(*t.shape[:-3], query.shape[-3]) for t in (key, value)]
    try:
        lead = torch.broadcast_shapes(query.shape[:-2], *kv_lead)
    except RuntimeError:
        gqa = "" if enable_gqa else " (fewer key/value heads need enable_gqa=True)"
        raise ValueError(f"the leading dimensions of query, key, value do not broadcast: {shapes}{gqa}") from None
    target = (*lead, query.shape[-2], key.shape[-2])
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, target, query.device)
        if attn_mask.dtype not in (torch.bool, query.dtype) and not torch.is_autocast_enabled(query.device.type):
            raise ValueError(f"attn_mask must be bool or query's {query.dtype} (as SDPA), got {attn_mask.dtype}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be True or False, got {is_causal!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
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
    return d
