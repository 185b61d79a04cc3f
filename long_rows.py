"""DropKey for long rows without any N x N tensor: tiles on the CPU, FlexAttention on CUDA.

`dropkey.attention` hands a training call over here (when this file is present,
dropkey.FLASH is on and Nq * Nk >= dropkey.LONG_ROWS); `attention` returns None
where it does not apply, and dropkey's whole-mask path runs instead.

Reading order:
  1. The counter mask (`mix64`, `draw_seed`, `counter_keep_mask`): every bit of
     Eq. 12's mask is a pure function of (seed, row, key), so any tile of it can
     be made again where it is needed (backward, a fused kernel's mask_mod).
  2. `_Tiles` and `_TiledAttention`: the CPU path. The mask D of Eq. 12
     (0 kept, -inf dropped) is written one tile of query rows at a time and
     handed to SDPA's CPU flash kernel (a private op); backward writes it again.
  3. `_flex_attention`: the CUDA path, the mask as FlexAttention's mask_mod.
  4. The op sweep, `python long_rows.py`.

The random stream is chosen here, in `draw_seed`: one draw of the caller's
generator (or torch's default) seeds the counter generator (SplitMix64), whose
bits differ from the ones `dropkey.bernoulli_mask` takes from torch's generator.
So for long rows dropkey.FLASH on and off give different masks (of the same
distribution, to 2^-16) unless a `keep_mask` is shared; under one keep_mask
every path gives the same numbers.

Eager only: torch.compile of the tile writer made the mask pass 2-3x faster, but
raised a fresh process's peak memory by ~130 MB over SDPA's at (1, 4, 4097, 32)
(eager: ~30 MB), more than the 16-bit mask it avoids.
"""
import math

import torch
import torch.nn.functional as F

import dropkey

# ----------------------------------------------------------------------------- the counter mask
# SplitMix64 (Steele, Lea and Flood, OOPSLA 2014): output n of seed s is mix64(s + n * GOLDEN), mix64
# being Stafford's "Mix13" finaliser. It passes BigCrush; a counter-based generator is also what
# FlashAttention's own dropout uses (Philox, seed and offset). Layout, for a mask (..., R, C) whose
# leading dimensions are flattened to L (row r = l * R + i):
#   seed key  k   = mix64(seed + stream * GOLDEN)       stream 1: keys, 2: prefix keys, 3: grid seeds
#   row key   k_r = mix64(k + (r + 1) * GOLDEN)
#   word      w   = mix64(k_r + (c // 4 + 1) * GOLDEN)   four 16-bit uniforms per 64-bit word
#   u(r, c)   = 16-bit piece c % 4 of w, read as int16, + 32768: uniform on 0 .. 65535
# Key c of row r is dropped when u < level = round(d * 65536), clipped to 1 .. 65535: the rate is d
# to 2^-16 (7.6e-6), never 0 for d > 0 and never every key.
GOLDEN = 0x9E3779B97F4A7C15 - 2**64                                   # as a signed int64
_MIX = ((30, 0xBF58476D1CE4E5B9 - 2**64), (27, 0x94D049BB133111EB - 2**64), (31, None))
TILE_ELEMENTS = 2**22   # mask elements of one CPU tile (16 MiB as float32)
WORD_CHUNK = 2**16      # 64-bit words mixed at a time (512 KiB, two reused buffers that stay in cache)


def mix64(x, scratch=None):
    """SplitMix64's finaliser on an int64 tensor: x ^= x >>> 30; x *= M1; x ^= x >>> 27; x *= M2; x ^= x >>> 31.

    With a `scratch` tensor like x it works in place (the CPU tiles); without,
    it makes new tensors (what FlexAttention's mask_mod needs).
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
    """The seed of one call's mask: the next draw of `generator` (or torch's default), int64 in [0, 2^63).

    Every training call that samples here draws exactly one: re-seed the
    generator and call this to get the seed a call used, then
    `counter_keep_mask(seed, ...)` for its mask. A tensor, so a GPU is not synced.
    """
    return torch.empty((), dtype=torch.int64, device=device).random_(generator=generator)


def drop_level(p, keep_one=True):
    """Bits u (0 .. 65535) below which a key is dropped at rate p: round(p * 2^16), at least 1 for p > 0.

    keep_one: at most 65535 (one value kept), so a drop ratio d < 1 never drops every key.
    """
    level = round(p * 65536)
    return 0 if p <= 0 else min(max(level, 1), 65535 if keep_one else 65536)


def row_keys(seed, stream, rows):
    """k_r of the int64 tensor of row indices `rows` (any shape), for a seed tensor or int."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=rows.device)
    key = mix64(seed + (stream * GOLDEN + 2**63) % 2**64 - 2**63)      # stream * GOLDEN as an int64
    return mix64(key + (rows + 1) * GOLDEN)


def counter_drops(keys, n, level):
    """Dropped keys (R, n), bool, of the rows with row keys `keys` (R,): u(r, c) < level (eager, any size)."""
    if level >= 65536:                                                 # 32768 would wrap around as an int16
        return torch.ones(len(keys), n, dtype=torch.bool, device=keys.device)
    words = mix64(keys[:, None] + torch.arange(1, (n + 3) // 4 + 1, device=keys.device) * GOLDEN)  # (R, W)
    return words.view(torch.int16)[:, :n] < level - 32768             # little-endian: piece c % 4


def _structured_drops(seed, rows, mode, d, grid, prefix_tokens, block_size):
    """Dropped keys (R, Nk) of DropKey-Block / -Cross (Fig. 2) for flat row indices `rows` (R,)."""
    n_h, n_w = grid
    s = block_size
    gamma = dropkey.seed_rate(mode, d, grid, block_size)
    prefix = counter_drops(row_keys(seed, 2, rows), prefix_tokens, drop_level(d))  # (R, prefix)
    seeds = counter_drops(row_keys(seed, 3, rows), (n_h - s + 1) * (n_w - s + 1), drop_level(gamma, False))
    seeds = seeds.view(-1, n_h - s + 1, n_w - s + 1)                   # (R, n_h-s+1, n_w-s+1)
    return torch.cat([prefix, dropkey._structured_drop(seeds, mode, s)], dim=-1)  # (R, Nk)


def counter_keep_mask(seed, shape, mode="dropkey", drop_ratio=0.0, *, grid=None, prefix_tokens=1, block_size=3):
    """The keep mask (True = kept) that a call with `seed` used: `dropkey.sample_keep_mask`'s distribution.

    shape (..., Nq, Nk). dropkey: each key dropped when u < drop_level(d)
    (stream 1, Eq. 12). dropkey_block / dropkey_cross: prefix keys at d
    (stream 2), grid seeds at gamma (stream 3), then windows or crosses. No
    fall-back applied (see `dropkey.fall_back`). Whole: for tests and references.
    """
    *lead, Nq, Nk = shape
    rows = torch.arange(math.prod(lead) * Nq, device=torch.as_tensor(seed).device)
    if mode in dropkey.STRUCTURED_MODES:
        dropkey._check_grid(grid, Nk, prefix_tokens, block_size)
        drops = _structured_drops(seed, rows, mode, drop_ratio, grid, prefix_tokens, block_size)
    else:
        drops = counter_drops(row_keys(seed, 1, rows), Nk, drop_level(drop_ratio))
    return ~drops.view(shape)


def _minus_inf_bits(dtype):
    """The integer dtype as wide as the float `dtype`, the bits of -inf in it, and the factor that turns 1.0 into -inf.

    1.0 is (2^(e-1) - 1) << m (e exponent bits, m mantissa bits); times
    2^(e-1) + 1 it is (2^e - 1) << m plus a carry out of the sign bit, modulo
    2^bits: the bits of -inf (0xFF800000 = 0x3F800000 * 129 for float32).
    """
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]
    one = torch.tensor(1.0, dtype=dtype).view(ints).item()
    return ints, torch.tensor(float("-inf"), dtype=dtype).view(ints).item(), (one >> (one & -one).bit_length() - 1) + 2


# ----------------------------------------------------------------------------- CPU: tiles

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _Tiles:
    """The float mask of any tile of query rows i0:i1 (all L leading indices, all keys), never stored whole.

    A tile is D of Eq. 12 plus the caller's masks: +0.0 (or the float bias)
    where kept, -inf where dropped, not allowed (padding, causal) or past the
    diagonal. Kept keys come from the counter (`seed`) or from the caller's
    `keep` (read, never written). `fallback` (L, Nq) bool marks rows whose
    allowed keys were all dropped: they keep every allowed key (`dropkey.fall_back`).
    """

    def __init__(self, lead, Nq, Nk, dtype, mode, d, seed, keep, attn_mask, causal, structured):
        self.lead, self.L, self.Nq, self.Nk, self.dtype = lead, math.prod(lead), Nq, Nk, dtype
        self.mode, self.d, self.seed, self.keep, self.structured = mode, d, seed, keep, structured
        self.attn_mask, self.causal, self.fallback = attn_mask, causal, None
        self.rows = max(1, min(Nq, TILE_ELEMENTS // (self.L * Nk)))   # query rows per tile
        rows = torch.arange(self.L)[:, None] * Nq + torch.arange(Nq)  # (L, Nq) flat row indices
        self.row_keys = row_keys(seed, 1, rows) if seed is not None and mode == "dropkey" else None
        self.free()

    def free(self):
        """Drop the buffers between forward and backward (each pass makes them once, reuses them per tile)."""
        self.buffer = self.words = self.scratch = None

    def query_tiles(self):
        return [(i0, min(i0 + self.rows, self.Nq)) for i0 in range(0, self.Nq, self.rows)]

    def _slice(self, t, i0, i1):
        return t.expand(*self.lead, self.Nq, self.Nk)[..., i0:i1, :].reshape(self.L, i1 - i0, self.Nk)

    def tile(self, i0, i1):
        """The float mask (1, L, i1 - i0, Nk) of query rows i0:i1, in the reused buffer."""
        L, bq, Nk = self.L, i1 - i0, self.Nk
        if self.buffer is None:                                        # reused: no page faults per tile
            self.buffer = torch.empty(L * self.rows * Nk, dtype=self.dtype)
        out = self.buffer[:L * bq * Nk].view(L, bq, Nk)
        ints, minus_inf, _ = _minus_inf_bits(self.dtype)
        if self.row_keys is not None:                                  # Eq. 12 from the counter
            self._counter_tile(self.row_keys[:, i0:i1].reshape(-1), out.view(L * bq, Nk))
        else:                                                          # the caller's mask (copied), or structured
            drops = ~self._slice(self.keep, i0, i1) if self.keep is not None else _structured_drops(
                self.seed, (torch.arange(L)[:, None] * self.Nq + torch.arange(i0, i1)).view(-1), self.mode,
                self.d, **self.structured)
            torch.mul(drops.view(L, bq, Nk), minus_inf, out=out.view(ints))  # kept: +0.0, dropped: -inf bits
        return self._other_masks(out, i0, i1)[None]

    def _counter_tile(self, keys, out):
        """`counter_drops` of the rows with keys `keys` (R,) as -inf / +0.0 bits into `out` (R, Nk), in place.

        WORD_CHUNK words at a time in buffers reused across tiles: a fresh
        tensor per op would be page-faulted in every time and cost more than
        the arithmetic.
        """
        R, Nk = out.shape
        W = (Nk + 3) // 4
        chunk = max(1, WORD_CHUNK // W)                                # rows per chunk
        if self.words is None:
            self.offsets = torch.arange(1, W + 1) * GOLDEN             # (W,)
            self.words, self.scratch = torch.empty(2, min(chunk, R), W, dtype=torch.int64)
        ints, _, factor = _minus_inf_bits(self.dtype)
        level = drop_level(self.d) - 32768
        for a in range(0, R, chunk):
            b = min(a + chunk, R)
            words = mix64(torch.add(keys[a:b, None], self.offsets, out=self.words[:b - a]), self.scratch[:b - a])
            torch.lt(words.view(torch.int16)[:, :Nk], level, out=out[a:b])  # 1.0 where dropped, +0.0 kept
            out[a:b].view(ints).mul_(factor)                            # the bits of 1.0 times factor: -inf

    def _other_masks(self, out, i0, i1):
        """The fall-back rows, the float bias, padding and the causal triangle on tile `out` (L, bq, Nk)."""
        Nk = self.Nk
        if self.fallback is not None:
            out.masked_fill_(self.fallback[:, i0:i1, None], 0.0)
        if self.attn_mask is not None and self.attn_mask.dtype == torch.bool:
            out.masked_fill_(~self._slice(self.attn_mask, i0, i1), float("-inf"))   # True = allowed
        elif self.attn_mask is not None:
            bias = self._slice(self.attn_mask, i0, i1)
            out += bias
            out.masked_fill_(bias <= dropkey.NOT_ALLOWED_AT, float("-inf"))  # padding: never attended
        if self.causal:
            out.masked_fill_(torch.arange(i0, i1)[:, None] < torch.arange(Nk), float("-inf"))
        return out


class _TiledAttention(torch.autograd.Function):
    """Masked attention one tile of query rows at a time through SDPA's CPU flash kernel (Eq. 12-14).

    Forward: per tile, the mask is written (`_Tiles.tile`) and the kernel
    run. A row with no finite mask entry gets log-sum-exp 0 and output 0 from
    the kernel; only such rows are checked, and a tile with a row whose
    allowed keys were all dropped runs again with that row's allowed keys.
    Backward: every tile's mask written again, the kernel's backward with the
    whole row's out and lse. Saved: q, k, v, out, lse (1, L, Nq) and the
    fall-back rows; nothing of size Nq x Nk.
    q (1, L, Nq, E), k (1, L, Nk, E), v (1, L, Nk, E).
    """

    @staticmethod
    def forward(ctx, q, k, v, tiles, scale):
        out, lse = torch.empty_like(q), None
        fallback = torch.zeros(tiles.L, tiles.Nq, dtype=torch.bool)
        for i0, i1 in tiles.query_tiles():
            mask = tiles.tile(i0, i1)                                  # (1, L, bq, Nk)
            o, l = _FLASH_CPU(q[:, :, i0:i1], k, v, 0.0, False, attn_mask=mask, scale=scale)
            suspect = l[0] == 0                                        # (L, bq): maybe nothing kept
            if suspect.any():
                empty = torch.zeros_like(suspect)
                empty[suspect] = (mask[0][suspect] == float("-inf")).all(-1)
                if empty.any():                                        # rare: every allowed key dropped
                    fallback[:, i0:i1] = empty
                    tiles.fallback = fallback
                    o, l = _FLASH_CPU(q[:, :, i0:i1], k, v, 0.0, False, attn_mask=tiles.tile(i0, i1), scale=scale)
            lse = l.new_empty(q.shape[:-1]) if lse is None else lse      # (1, L, Nq), float32 for bfloat16
            out[:, :, i0:i1], lse[:, :, i0:i1] = o, l
        tiles.fallback = fallback if fallback.any() else None
        tiles.free()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.scale = tiles, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        tiles, grad_out = ctx.tiles, grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i0, i1 in tiles.query_tiles():
            rows = slice(i0, i1)
            dq_i, dk_i, dv_i = _FLASH_CPU_BACKWARD(
                grad_out[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows], 0.0, False,
                attn_mask=tiles.tile(i0, i1), scale=ctx.scale)         # exact per tile: whole rows
            dq[:, :, rows] = dq_i
            dk += dk_i
            dv += dv_i
        tiles.free()
        return dq, dk, dv, None, None


def _tiled(query, key, value, attn_mask, d, is_causal, scale, mode, keep_mask, generator, structured):
    """The CPU path: None where SDPA's CPU flash kernel cannot take these inputs."""
    if (_FLASH_CPU is None or _FLASH_CPU_BACKWARD is None or torch.is_autocast_enabled("cpu")
            or query.dtype not in (torch.float32, torch.float64, torch.bfloat16)
            or len({query.dtype, key.dtype, value.dtype}) > 1 or query.shape[-1] != value.shape[-1]
            or (attn_mask is not None and attn_mask.requires_grad)):
        return None
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    Nq, Nk = query.shape[-2], key.shape[-2]
    seed = draw_seed(generator) if keep_mask is None else None
    tiles = _Tiles(lead, Nq, Nk, query.dtype, mode, d, seed, keep_mask, attn_mask, is_causal, structured)
    q, k, v = (t.expand(*lead, *t.shape[-2:]).reshape(1, tiles.L, *t.shape[-2:]) for t in (query, key, value))
    return _TiledAttention.apply(q, k, v, tiles, scale).view(*lead, Nq, value.shape[-1])


# ----------------------------------------------------------------------------- CUDA: FlexAttention

FLEX_TILE = 128     # queries and keys per tile of FlexAttention's block mask (its default)
_compiled_flex = []


def _flex_mask_mod(seed, lead, Nq, d, allowed, causal, fallback=None):
    """FlexAttention's mask_mod of DropKey: the bit of `counter_keep_mask` at (b, h, q, kv), then the masks.

    The row keys of the (B, H, Nq) rows are made once; per element, word kv // 4
    and its 16-bit piece kv % 4 as an offset-binary number u (Eq. 12: kept when
    u >= drop_level(d)). The level is a tensor, so a compiled kernel is reused
    across drop ratios. `fallback` (B, H, Nq) marks rows that keep every allowed key.
    """
    B, H = lead
    keys = row_keys(seed, 1, torch.arange(B * H * Nq, device=seed.device)).view(B, H, Nq)
    level = torch.tensor(drop_level(d), device=seed.device)

    def mask_mod(b, h, q_idx, kv_idx):
        word = mix64(keys[b, h, q_idx] + (kv_idx.long() // 4 + 1) * GOLDEN)
        keep = (((word >> (kv_idx.long() % 4) * 16) + 32768) & 0xFFFF) >= level   # u(r, c) >= level
        if fallback is not None:
            keep = keep | fallback[b, h, q_idx]
        if causal:
            keep = keep & (kv_idx <= q_idx)
        return keep if allowed is None else keep & allowed[b, h, q_idx, kv_idx]

    return mask_mod


def _flex_kernel(device):
    """flex_attention compiled on CUDA (its fused kernel, compiled once per process), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention                                          # the CPU tests: unfused
    if not _compiled_flex:
        _compiled_flex.append(torch.compile(flex_attention, dynamic=False))
    return _compiled_flex[0]


def _flex_attention(query, key, value, seed, d, attn_mask, is_causal, scale):
    """DropKey through FlexAttention: the mask is a function of the indices, nothing N x N is made.

    (B, H, N, E) inputs, a boolean attn_mask or none. A random mask drops keys
    in every tile, so every tile the allowed keys reach is partial; only
    padding and the causal triangle skip tiles (create_block_mask on them
    alone, not on the dropping mask_mod, which would cost as much as the
    attention). The kernel's log-sum-exp is -inf for a row that kept no key:
    only then is it run again with those rows' allowed keys (`dropkey.fall_back`).
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    lead, Nq, Nk = query.shape[:2], query.shape[-2], key.shape[-2]
    allowed = None if attn_mask is None else attn_mask.expand(*lead, Nq, Nk)
    if allowed is None and not is_causal:
        tiles = torch.ones(1, 1, -(-Nq // FLEX_TILE), -(-Nk // FLEX_TILE), dtype=torch.bool, device=query.device)
    else:
        def reach(b, h, q_idx, kv_idx):
            keep = (kv_idx <= q_idx) if is_causal else (kv_idx >= 0)
            return keep if allowed is None else keep & allowed[b, h, q_idx, kv_idx]
        tiles = create_block_mask(reach, *lead, Nq, Nk, device=query.device, BLOCK_SIZE=FLEX_TILE)
        tiles = tiles.to_dense().bool()                                # (B, H, Nq / 128, Nk / 128)

    def run(fallback):
        mask_mod = _flex_mask_mod(seed, lead, Nq, d, allowed, is_causal, fallback)
        block_mask = BlockMask.from_kv_blocks(
            tiles.sum(-1, dtype=torch.int32), tiles.int().argsort(dim=-1, descending=True, stable=True).int(),
            BLOCK_SIZE=FLEX_TILE, mask_mod=mask_mod, seq_lengths=(Nq, Nk))  # reached tiles first
        return _flex_kernel(query.device)(query, key, value, block_mask=block_mask, scale=scale, return_lse=True)

    out, lse = run(None)
    empty = lse == float("-inf")                                       # (B, H, Nq): no key kept
    return run(empty)[0] if empty.any() else out


def _flex_fits(q, k, v, attn_mask, mode, keep_mask):
    """Whether FlexAttention runs: CUDA, dropkey sampled here, (B, H, N, E) of one leading shape,
    E and Ev >= 16 (flex's least), a bool mask or none."""
    if not (q.device.type == "cuda" and mode == "dropkey" and keep_mask is None and q.dim() == 4
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and min(q.shape[-1], v.shape[-1]) >= 16
            and (attn_mask is None or attn_mask.dtype == torch.bool)):
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- the entry point

def _transformed(*tensors):
    """Whether a functorch transform (grad, jvp, vmap) or forward-mode AD is active on any of `tensors`."""
    from torch._C._functorch import is_functorch_wrapped_tensor
    from torch.autograd.forward_ad import unpack_dual
    return any(t is not None and (is_functorch_wrapped_tensor(t) or unpack_dual(t).tangent is not None)
               for t in tensors)


def attention(query, key, value, attn_mask, d, is_causal, scale, *, mode, keep_mask=None, generator=None,
              grid=None, prefix_tokens=1, block_size=3):
    """DropKey (Eq. 12-14) of long rows without an N x N tensor, or None: then dropkey's whole-mask path runs.

    Called by `dropkey.attention` with inputs it has checked, key and value
    already expanded for GQA, `scale` and `d` floats, mode one of
    dropkey.DROPKEY_MODES, in training. The mask is `keep_mask` when given
    (never modified), otherwise the counter mask of one `draw_seed` of
    `generator`. CPU: `_TiledAttention`; CUDA: FlexAttention (dropkey mode,
    mask sampled here). Declines under functorch transforms and forward-mode
    AD (left to the whole-mask path), autocast, a float attn_mask that
    needs a gradient, and inputs the kernels do not take.
    Returns out (..., Nq, Ev) or None.
    """
    if _transformed(query, key, value, attn_mask, keep_mask):
        return None
    structured = dict(grid=grid, prefix_tokens=prefix_tokens, block_size=block_size)
    if mode in dropkey.STRUCTURED_MODES and keep_mask is None:
        dropkey._check_grid(grid, key.shape[-2], prefix_tokens, block_size)
    if query.device.type == "cpu":
        return _tiled(query, key, value, attn_mask, d, is_causal, scale, mode, keep_mask, generator, structured)
    if _flex_fits(query, key, value, attn_mask, mode, keep_mask):
        seed = draw_seed(generator, query.device)
        return _flex_attention(query, key, value, seed, d, attn_mask, is_causal, scale)
    return None


# ----------------------------------------------------------------------------- the op sweep
# `python long_rows.py` times DropKey (forward + backward) against plain SDPA and the paper's Algorithm 1.

def algorithm1(q, k, v, drop_ratio):
    """The paper's Algorithm 1, as published: a float Bernoulli mask times -1e12 (a reference to time)."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5            # (B, H, N, N)
    m_r = torch.ones_like(attn) * drop_ratio
    attn = attn + torch.bernoulli(m_r) * -1e12
    return attn.softmax(dim=-1) @ v                                    # (B, H, N, D)


def peak_bytes(fn, device="cpu"):
    """Peak memory that fn() adds, in bytes: on CUDA torch's allocator; on CPU the process's resident set.

    CPU (Linux): freed heap memory handed back (malloc_trim), the high-water
    mark of the resident set reset (/proc/self/clear_refs), then VmHWM after
    fn() minus VmRSS before it: every byte touched, kernel scratch included.
    None where /proc is not there.
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


def _sweep(cases, title, grad, runs, device, memory):
    """Forward + backward of every case, timed round-robin (vit.time_rounds); ratios against the first case."""
    from vit import median, paired_ratio, time_rounds
    steps = {name: (lambda fn=fn: fn().backward(grad)) for name, fn in cases.items()}
    times = time_rounds(steps, runs, device)
    base = next(iter(times.values()))
    print(f"\n{title}, {runs} rounds")
    print(f"{'case':<28}{'median ms':>10}{'x first':>8}{'peak MB':>9}")
    for name, ts in times.items():
        peak = peak_bytes(steps[name], device) if memory else None
        mb = "n/a" if peak is None else f"{peak / 2**20:.1f}"
        print(f"{name:<28}{median(ts):10.2f}{paired_ratio(ts, base):8.2f}{mb:>9}")
    return times


def _main(argv=None):
    import argparse
    from vit import paired_ratio
    parser = argparse.ArgumentParser(
        description="Time DropKey (fwd+bwd) against SDPA and the paper's Algorithm 1, with peak memory "
                    "(CPU: growth of the resident set, see peak_bytes; CUDA: torch's allocator).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", default="32,4,257,32;8,4,1025,32;1,4,4097,32", help="B,H,N,D;...")
    parser.add_argument("--runs", type=int, default=10, help="rounds, each timing every case once")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the peak-memory column (one more untimed call per case)")
    parser.add_argument("--flex", action="store_true", help="CUDA, bfloat16: DropKey in FlexAttention "
                        "against the flash kernel without and with SDPA's dropout_p")
    args = parser.parse_args(argv)
    if args.flex and not torch.cuda.is_available():
        parser.error("--flex needs a CUDA GPU")
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
        assert shapes and all(len(s) == 4 and min(s) > 0 for s in shapes) and args.runs > 0
    except (ValueError, AssertionError):
        parser.error("--shapes takes B,H,N,D;... of positive integers and --runs a positive integer")
    device = torch.device("cuda" if args.flex else "cpu")
    dtype = torch.bfloat16 if args.flex else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = 0.3, "
          f"dropkey.LONG_ROWS = {dropkey.LONG_ROWS:,} (Nq * Nk from which this file runs)")
    for B, H, N, D in shapes:
        q, k, v = (torch.randn(B, H, N, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
        cases = {"SDPA, no dropout": lambda: F.scaled_dot_product_attention(q, k, v),
                 "dropkey": lambda: dropkey.attention(q, k, v, drop_ratio=0.3)}
        if args.flex:
            cases["SDPA, dropout_p=0.3"] = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        else:
            cases["paper Algorithm 1"] = lambda: algorithm1(q, k, v, 0.3)
        path = "this file" if N * N >= dropkey.LONG_ROWS else "dropkey.py, whole mask"
        times = _sweep(cases, f"fwd+bwd, (B, H, N, D) = ({B}, {H}, {N}, {D}), {str(dtype)[6:]} on {device}, "
                       f"dropkey by {path}", torch.randn_like(q), args.runs, device, args.memory)
        if not args.flex:
            print(f"dropkey is {paired_ratio(times['paper Algorithm 1'], times['dropkey']):.2f}x faster than "
                  f"Algorithm 1 (median of per-round ratios)")


if __name__ == "__main__":
    _main()
