"""Tests for dropkey.py, vit.py, train_cifar.py and theory.ipynb.

Statistical tests use fixed seeds and state their tolerance: a realised rate
over n Bernoulli(d) draws must lie within 4 sigma = 4 sqrt(d (1 - d) / n).
"""
import argparse
import builtins
import contextlib
import errno
import hashlib
import http.server
import io
import itertools
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dropkey
import train_cifar
from vit import ViT


@contextlib.contextmanager
def _one_thread():
    """Tiny models gain nothing from two threads, and on a busy 2-core CPU they can run 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ============================================================================ shared helpers

# e.g. cuda: the device-generic tests run there
DEVICE = torch.device(os.environ.get("DROPKEY_TEST_DEVICE", "cpu"))


def _qkv(B=4, H=3, N=17, D=8, seed=0, dtype=torch.float32, grad=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def _softmax_weights(q, k):
    """Plain attention weights p = softmax(q k^T / sqrt(D)) (Eq. 2), written again in the test."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


def _reference(q, k, v, keep, mode, d, allowed=None):
    """Independent reference: Eq. 2, then zero the dropped weights and re-normalise (Eq. 1), or nn.Dropout.

    allowed: which keys each query may see (None: all); dropping happens among them, and a row whose
    allowed keys are all dropped keeps them; a row with no allowed key is zeros.
    """
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    allowed = torch.ones_like(logits, dtype=torch.bool) if allowed is None else allowed.expand_as(logits)
    p = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    if mode == "vanilla":
        w = p * keep / (1 - d)
    else:
        kept = keep & allowed
        kept = torch.where(kept.any(-1, keepdim=True), kept, allowed)   # the fall-back, written again
        w = (p * kept) / (p * kept).sum(-1, keepdim=True).clamp_min(1e-30)
    return w @ v, w


def _out_and_grads(out, inputs):
    """out and the gradients of sum(out^2) with respect to `inputs`: what the equivalence tests compare."""
    return (out, *torch.autograd.grad(out.square().sum(), inputs))


def _assert_all_close(results, expected, tol=1e-5):
    for a, b in zip(results, expected, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _four_sigma(d, n):
    return 4 * math.sqrt(d * (1 - d) / n)


@contextlib.contextmanager
def _flash(on):
    """dropkey.FLASH set to `on` for the block: the fast path (True) or the explicit one (False)."""
    old, dropkey.FLASH = dropkey.FLASH, on
    try:
        yield
    finally:
        dropkey.FLASH = old


def _attend(q, k, v, mode="dropkey", d=0.0, flash=True, **kw):
    with _flash(flash):
        return dropkey.attention(q, k, v, drop_ratio=d, mode=mode, **kw)


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


STRUCTURED = dict(grid=(4, 4), prefix_tokens=1, block_size=2)  # N = 17


# ============================================================================ Sec. 3.2, Table 1: schedules

def test_sec_3_2_layer_drop_ratios_constant_decreasing_increasing():
    assert dropkey.layer_drop_ratios(0.3, 4, "constant") == [0.3] * 4
    dec = dropkey.layer_drop_ratios(0.3, 4, "decreasing")
    torch.testing.assert_close(torch.tensor(dec), torch.tensor([0.3, 0.2, 0.1, 0.0]))
    assert dropkey.layer_drop_ratios(0.3, 4, "increasing") == dec[::-1]
    assert dropkey.layer_drop_ratios(0.3, 1, "decreasing") == [0.3]


# ============================================================================ Eq. 12, Fig. 2: masks

@pytest.mark.parametrize("d", [0.1, 0.3, 0.5])
def test_eq_12_each_key_is_dropped_at_rate_d_within_4_sigma(d):
    keep = dropkey.sample_keep_mask((16, 4, 65, 65), "dropkey", d, generator=_gen(2))
    n = keep.numel()                                  # 270k Bernoulli(d) draws
    assert abs((~keep).float().mean().item() - d) < _four_sigma(d, n)


@pytest.mark.parametrize("d", [0.1, 0.3])
def test_eq_12_fast_sampler_rate_at_large_sample_size(d):
    n = 20_000_000  # 4 sigma ~ 5e-4 at d = 0.1: a 63-bit or 1/256 grid fails
    m = dropkey.bernoulli_mask((n,), d, generator=_gen(3))
    assert abs(m.float().mean().item() - d) < _four_sigma(d, n)


def test_eq_12_fast_sampler_neighbours_sharing_a_word_are_independent():
    n = 4_000_000  # neighbours share a 64-bit word: their joint rate is d^2
    m = dropkey.bernoulli_mask((n // 2, 2), 0.5, generator=_gen(4))
    both = (m[:, 0] & m[:, 1]).float().mean().item()
    assert abs(both - 0.25) < _four_sigma(0.25, n // 2)


def test_eq_12_masks_follow_the_torch_seed_or_the_generator():
    shape = (3, 1001)                                 # not a whole number of 64-bit words
    torch.manual_seed(44)
    a = dropkey.bernoulli_mask(shape, 0.3)
    torch.manual_seed(44)
    b = dropkey.bernoulli_mask(shape, 0.3)
    c, d = (dropkey.bernoulli_mask(shape, 0.3, generator=_gen(45)) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("d", [1e-6, 7e-6, 3e-5, 0.3, 1 - 3e-5, 1 - 1e-6])
def test_eq_12_any_ratio_drops_at_d_on_the_2_to_the_16_grid_and_never_everything(d):
    """The keep probability is 1 - d on a 2^-16 grid, at least 2^-16; the realised rate within 4 sigma of it."""
    n = 2**22
    keep = dropkey.sample_keep_mask((n // 1024, 1024), "dropkey", d, generator=_gen(46))
    kept = max(round((1 - d) * 65536), 1) / 65536     # the stated resolution, written again
    assert abs((1 - kept) - d) <= 2**-16
    assert abs(keep.float().mean().item() - kept) <= _four_sigma(kept, n) + 1 / n
    assert keep.any()                                 # never everything dropped
    if d >= 3e-5:
        assert not keep.all()


def test_eq_12_masks_differ_across_queries_heads_and_batch():
    keep = dropkey.sample_keep_mask((2, 2, 65, 65), "dropkey", 0.5, generator=_gen(11))
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0], keep[1])
    block = dropkey.sample_keep_mask((1, 1, 65, 65), "dropkey_block", 0.5, grid=(8, 8), block_size=2,
                                     generator=_gen(12))
    assert len({tuple(row.tolist()) for row in block[0, 0]}) > 32   # per query in the structured modes too


def _grid_drop(keep, grid):
    return (~keep[..., 1:]).reshape(*keep.shape[:-1], *grid).float()   # (..., n_h, n_w), 1 = dropped


@pytest.mark.parametrize("s", [1, 2, 3])
def test_fig_2_block_mask_is_a_union_of_s_by_s_windows(s):
    keep = dropkey.sample_keep_mask((2, 2, 65, 65), "dropkey_block", 0.3, grid=(8, 8), block_size=s,
                                    generator=torch.Generator().manual_seed(13))
    drop = _grid_drop(keep, (8, 8)).reshape(-1, 1, 8, 8)
    full_windows = -F.max_pool2d(-drop, s, stride=1)  # 1 where a whole s x s window is dropped
    covered = F.max_pool2d(F.pad(full_windows, (s - 1,) * 4), s, stride=1)
    assert drop.sum() > 0 and torch.equal(covered, drop)


@pytest.mark.parametrize("s", [1, 2])
def test_fig_2_cross_mask_is_a_union_of_full_rows_and_columns(s):
    keep = dropkey.sample_keep_mask((2, 2, 65, 65), "dropkey_cross", 0.3, grid=(8, 8), block_size=s,
                                    generator=torch.Generator().manual_seed(14))
    drop = _grid_drop(keep, (8, 8)).bool()
    rows, cols = drop.all(-1), drop.all(-2)                           # fully dropped rows / columns
    assert drop.any() and torch.equal(rows.unsqueeze(-1) | cols.unsqueeze(-2), drop)
    # every seed drops s adjacent rows: a run of dropped rows is at least s long
    runs = F.max_pool1d(F.pad(-F.max_pool1d(-rows.float().reshape(-1, 1, 8), s, 1), (s - 1, s - 1)), s, 1)
    assert torch.equal(runs.reshape(rows.shape).bool(), rows)


def _exact_structured_rate(mode, d, n, s):
    """Expected drop rate of a grid key: 1 - (1 - gamma)^(number of valid seeds that would drop it)."""
    gamma = dropkey.seed_rate(mode, d, (n, n), s)
    v = n - s + 1
    reach = torch.tensor([min(r, v - 1) - max(r - s + 1, 0) + 1 for r in range(n)], dtype=torch.float64)
    if mode == "dropkey_block":
        count = reach[:, None] * reach[None, :]
    else:
        count = reach[:, None] * v + reach[None, :] * v - reach[:, None] * reach[None, :]
    return (1 - (1 - gamma) ** count).mean().item()


@pytest.mark.parametrize("mode,s", [("dropkey_block", 3), ("dropkey_block", 5),
                                    ("dropkey_cross", 1), ("dropkey_cross", 3)])
def test_sec_3_2_structured_drop_rate_matches_its_exact_expectation_and_is_near_d(mode, s):
    d = 0.3
    keep = dropkey.sample_keep_mask((32, 4, 65, 65), mode, d, grid=(8, 8), block_size=s,
                                    generator=torch.Generator().manual_seed(15))
    frac = (~keep[..., 1:]).float().mean(-1).flatten()  # per-row drop fraction; rows independent
    expected = _exact_structured_rate(mode, d, 8, s)
    assert abs(frac.mean().item() - expected) < 4 * frac.std().item() / math.sqrt(frac.numel())
    # overlaps make the paper's rate formula approximate (Sec. 3.2): realised rate within 0.1 of d
    assert abs(expected - d) < 0.1


@pytest.mark.parametrize("mode", ["dropkey_block", "dropkey_cross"])
def test_fig_2_structured_modes_drop_the_class_token_key_independently_at_rate_d(mode):
    keep = dropkey.sample_keep_mask((64, 4, 65, 65), mode, 0.3, grid=(8, 8), block_size=3,
                                    generator=torch.Generator().manual_seed(16))
    cls = ~keep[..., 0]                                               # (B, H, N)
    assert abs(cls.float().mean().item() - 0.3) < _four_sigma(0.3, cls.numel())
    grid_any = (~keep[..., 1:]).any(-1)
    # independent of the grid: P(cls dropped | some grid key dropped) is still d
    assert abs(cls[grid_any].float().mean().item() - 0.3) < _four_sigma(0.3, int(grid_any.sum()))


# ============================================================================ Eq. 1, 12-14: the attention op

@pytest.mark.parametrize("mode", ["dropattention", "dropkey", "dropkey_block", "dropkey_cross"])
@pytest.mark.parametrize("flash", [True, False])
def test_eq_1_and_14_rows_sum_to_one(mode, flash):
    q, k, v = _qkv(seed=5)
    _, w = _attend(q, k, v, mode, 0.5, flash, return_weights=True, **STRUCTURED)
    assert (w == 0).any()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("N", [17, 257])
def test_eq_14_dropkey_equals_eq_1_dropattention_and_the_reference_under_one_mask(N):
    q, k, v = _qkv(B=2, N=N, seed=9, grad=True)
    keep = dropkey.sample_keep_mask((2, 3, N, N), "dropkey", 0.4, generator=_gen(10))
    keep[0, 0, 3] = False                             # one fully dropped row: falls back to p
    expected = _out_and_grads(_reference(q, k, v, keep, "dropkey", 0.4)[0], (q, k, v))
    outs = {}
    for mode in ["dropkey", "dropattention"]:
        for flash in [True, False]:
            out = _attend(q, k, v, mode, 0.4, flash, keep_mask=keep)
            _assert_all_close(_out_and_grads(out, (q, k, v)), expected)
            outs[mode, flash] = out
    assert (outs["dropkey", False] - outs["dropattention", False]).abs().max() <= 1e-6
    _, w = _attend(q, k, v, "dropkey", 0.4, keep_mask=keep, return_weights=True)
    torch.testing.assert_close(w[0, 0, 3], torch.softmax(q[0, 0, 3] @ k[0, 0].T / math.sqrt(8), -1))


def test_vanilla_is_nn_dropout_on_the_weights_exactly():
    """F.dropout(p, d), its mask replayed as keep_mask: the same weights; an all-dropped row is zeros."""
    q, k, v = _qkv(B=2, H=2, N=5, seed=6)
    d = 0.6
    p = _softmax_weights(q, k)
    torch.manual_seed(7)
    dropped = F.dropout(p, d)                         # what timm's attn_drop does
    torch.manual_seed(7)
    keep = F.dropout(torch.ones_like(p), d) > 0       # the same draw, as a keep mask
    assert (~keep).all(-1).any()                      # some row has every key dropped
    _, w = _attend(q, k, v, "vanilla", d, keep_mask=keep, return_weights=True)
    torch.testing.assert_close(w, dropped, atol=1e-6, rtol=1e-6)
    assert (w[(~keep).all(-1)] == 0).all()
    assert (w.sum(-1) - 1).abs().max() > 0.05        # rows no longer sum to 1


@pytest.mark.parametrize("mode", ["dropattention", "dropkey"])
def test_eq_1_fully_dropped_row_falls_back_to_the_undropped_weights(mode):
    q, k, v = _qkv(seed=18)
    keep = torch.zeros(4, 3, 17, 17, dtype=torch.bool)               # every key dropped
    _, w = _attend(q, k, v, mode, 0.5, keep_mask=keep, return_weights=True)
    torch.testing.assert_close(w, _softmax_weights(q, k))


@pytest.mark.parametrize("mode", dropkey.DROPPING_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eq_14_extreme_drop_ratio_gives_no_nan(mode, dtype):
    q, k, v = _qkv(B=8, N=5, seed=17, dtype=dtype)
    opts = dict(grid=(2, 2), prefix_tokens=1, block_size=1)
    for flash in [True, False]:
        out, w = _attend(q, k, v, mode, 0.999, flash, return_weights=True, **opts)
        assert torch.isfinite(out).all() and torch.isfinite(w).all() and out.dtype == dtype
        assert torch.isfinite(_attend(q, k, v, mode, 0.999, flash, **opts)).all()


@pytest.mark.parametrize("mode", dropkey.MODES)
def test_eq_13_gradients_flow_to_q_k_v(mode):
    q, k, v = _qkv(seed=19, grad=True)
    _attend(q, k, v, mode, 0.3, **STRUCTURED).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", dropkey.MODES)
def test_eval_is_exactly_sdpa(mode):
    q, k, v = _qkv(seed=8)
    out = _attend(q, k, v, mode, 0.5, training=False, **STRUCTURED)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_keep_mask_broadcasts_and_generator_reproduces():
    q, k, v = _qkv(seed=20)
    keep = dropkey.sample_keep_mask((1, 1, 17, 17), "dropkey", 0.5, generator=_gen(21))
    _, w = _attend(q, k, v, "dropkey", 0.5, keep_mask=keep, return_weights=True)
    assert torch.equal(w == 0, (~dropkey.fall_back(keep)).expand(4, 3, 17, 17))
    a = _attend(q, k, v, "dropkey", 0.5, generator=_gen(22))
    b = _attend(q, k, v, "dropkey", 0.5, generator=_gen(22))
    assert torch.equal(a, b)


# ============================================================================ SDPA's terms: shapes and masks
# dropkey.attention must be a one-line swap for F.scaled_dot_product_attention.

def _shapes_case(case, seed=30):
    """(q, k, v) for cross-attention, value width, 3-D inputs, broadcast heads."""
    g = _gen(seed)
    shapes = {"cross": [(2, 3, 10, 8), (2, 3, 60, 8), (2, 3, 60, 8)],
              "value width": [(2, 3, 9, 8), (2, 3, 9, 8), (2, 3, 9, 5)],
              "3-D": [(4, 9, 8), (4, 9, 8), (4, 9, 8)],
              "broadcast heads": [(2, 4, 9, 8), (2, 1, 11, 8), (2, 1, 11, 6)]}[case]
    return [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("case", ["cross", "value width", "3-D", "broadcast heads"])
@pytest.mark.parametrize("mode", ["dropkey", "dropattention", "vanilla"])
def test_sdpa_shapes_cross_attention_value_width_3d_and_broadcast_heads(case, mode):
    q, k, v = _shapes_case(case)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    keep = dropkey.sample_keep_mask((*lead, q.shape[-2], k.shape[-2]), mode, 0.4, generator=_gen(31))
    expected = _out_and_grads(_reference(q, k, v, keep, mode, 0.4)[0], (q, k, v))
    for flash in [True, False]:
        out = _attend(q, k, v, mode, 0.4, flash, keep_mask=keep)
        _assert_all_close(_out_and_grads(out, (q, k, v)), expected)
    torch.testing.assert_close(_attend(q, k, v, mode, 0.4, training=False),
                               F.scaled_dot_product_attention(q, k, v))


def _padding(lengths, Nk):
    return (torch.arange(Nk) < torch.tensor(lengths).view(-1, 1, 1, 1))  # (B, 1, 1, Nk), True = a real key


@pytest.mark.parametrize("flash", [True, False])
def test_sdpa_masks_in_eval_and_at_d_zero_equal_sdpa(flash):
    q, k, v = _qkv(B=2, N=12, seed=32)
    bias = torch.randn(2, 3, 12, 12, generator=_gen(33))
    pad = _padding([5, 12], 12)
    for kw in [dict(attn_mask=pad), dict(attn_mask=bias), dict(is_causal=True), dict(scale=0.7),
               dict(attn_mask=torch.where(pad, 0.0, -math.inf))]:
        want = F.scaled_dot_product_attention(q, k, v, **kw)
        for training, d in [(False, 0.5), (True, 0.0)]:
            torch.testing.assert_close(_attend(q, k, v, "dropkey", d, flash, training=training, **kw), want,
                                       atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["dropkey", "dropattention", "dropkey_block"])
@pytest.mark.parametrize("flash", [True, False])
def test_sdpa_padded_and_future_keys_get_zero_weight_and_zero_gradient(mode, flash):
    """DropKey drops among the allowed keys; the fall-back never brings back a padded or a future key."""
    B, H, N = 3, 2, 17
    q, k, v = _qkv(B=B, H=H, N=N, seed=34, grad=True)
    pad = _padding([2, 5, 17], N)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    for kw, allowed in [(dict(attn_mask=pad), pad), (dict(is_causal=True), causal),
                        (dict(attn_mask=pad, is_causal=True), pad & causal),
                        (dict(attn_mask=torch.where(pad, 0.0, -math.inf)), pad)]:
        allowed = allowed.expand(B, H, N, N)
        _, w = _attend(q, k, v, mode, 0.9, False, return_weights=True, generator=_gen(35), **kw, **STRUCTURED)
        assert (w[~allowed] == 0).all() and torch.isfinite(w).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(B, H, N))   # every row has an allowed key here
        out = _attend(q, k, v, mode, 0.9, flash, generator=_gen(35), **kw, **STRUCTURED)
        dv, = torch.autograd.grad(out[:, :, 0].square().sum(), v)    # the first query's output
        unseen = ~allowed[:, :, 0]  # keys the first query may not see, (B, H, N)
        assert unseen.any() and (dv[unseen] == 0).all() and (dv[~unseen] != 0).any()


@pytest.mark.parametrize("flash", [True, False])
def test_sdpa_a_row_with_no_allowed_key_is_zeros_as_in_sdpa(flash):
    q, k, v = _qkv(B=1, N=6, seed=36)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False                           # query 2 may see nothing
    out = _attend(q, k, v, "dropkey", 0.5, flash, attn_mask=mask, generator=_gen(37))
    assert (out[..., 2, :] == 0).all() and torch.isfinite(out).all()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attend(q, k, v, "dropkey", 0.5, flash, attn_mask=mask, training=False), sdpa)


def test_sdpa_padding_under_masks_equals_the_reference_with_its_fall_back():
    q, k, v = _qkv(B=4, N=32, seed=38, grad=True)
    pad = _padding([2, 5, 8, 32], 32)
    keep = dropkey.sample_keep_mask((4, 3, 32, 32), "dropkey", 0.7, generator=_gen(39))
    expected = _out_and_grads(_reference(q, k, v, keep, "dropkey", 0.7, pad)[0], (q, k, v))
    for flash in [True, False]:
        out = _attend(q, k, v, "dropkey", 0.7, flash, keep_mask=keep, attn_mask=pad)
        _assert_all_close(_out_and_grads(out, (q, k, v)), expected)


class TimmAttention(torch.nn.Module):
    """timm's Attention as people copy it: qkv linear, q/k norm, SDPA, proj; DropKey is a one-line swap."""

    def __init__(self, dim, heads, attn_drop=0.0, qk_norm=True, dropkey_swap=False):
        super().__init__()
        self.heads, self.attn_drop, self.dropkey_swap = heads, attn_drop, dropkey_swap
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.q_norm = torch.nn.LayerNorm(dim // heads) if qk_norm else torch.nn.Identity()
        self.k_norm = torch.nn.LayerNorm(dim // heads) if qk_norm else torch.nn.Identity()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.dropkey_swap:
            x = dropkey.attention(q, k, v, attn_mask=attn_mask, drop_ratio=self.attn_drop,
                                  training=self.training)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def test_recipe_timm_attention_switched_to_dropkey_by_one_line():
    torch.manual_seed(50)
    plain = TimmAttention(16, 2, attn_drop=0.3)
    swapped = TimmAttention(16, 2, attn_drop=0.3, dropkey_swap=True)
    swapped.load_state_dict(plain.state_dict())
    x = torch.randn(3, 9, 16)
    pad = _padding([4, 9, 6], 9)
    plain.eval(), swapped.eval()
    torch.testing.assert_close(swapped(x, pad), plain(x, pad))      # eval: identical
    swapped.train()
    torch.manual_seed(51)
    a = swapped(x, pad)
    torch.manual_seed(51)
    assert torch.equal(a, swapped(x, pad)) and not torch.allclose(a, plain(x, pad).detach())


class DetrDecoderLayer(torch.nn.Module):
    """A DETR-style decoder layer: self-attention of the queries, then cross-attention to padded memory."""

    def __init__(self, dim=16, heads=2, drop_ratio=0.3):
        super().__init__()
        self.heads, self.drop_ratio = heads, drop_ratio
        linear = torch.nn.Linear
        self.q1, self.kv1, self.o1 = linear(dim, dim), linear(dim, 2 * dim), linear(dim, dim)
        self.q2, self.kv2, self.o2 = linear(dim, dim), linear(dim, 2 * dim), linear(dim, dim)

    def _heads(self, x):
        B, N, C = x.shape
        return x.reshape(B, N, self.heads, C // self.heads).transpose(1, 2)   # (B, H, N, C / H)

    def _attend(self, q, kv, o, x, memory, attn_mask=None, is_causal=False):
        k, v = kv(memory).chunk(2, dim=-1)
        out = dropkey.attention(self._heads(q(x)), self._heads(k), self._heads(v), attn_mask=attn_mask,
                                drop_ratio=self.drop_ratio, is_causal=is_causal, training=self.training)
        return x + o(out.transpose(1, 2).reshape(x.shape))

    def forward(self, queries, memory, memory_valid, is_causal=False):
        x = self._attend(self.q1, self.kv1, self.o1, queries, queries, is_causal=is_causal)
        return self._attend(self.q2, self.kv2, self.o2, x, memory, attn_mask=memory_valid[:, None, None, :])


def test_recipe_detr_decoder_trains_and_padded_memory_and_future_queries_get_zero_gradient():
    torch.manual_seed(52)
    layer = DetrDecoderLayer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    queries, memory = torch.randn(2, 6, 16), torch.randn(2, 30, 16, requires_grad=True)
    valid = torch.arange(30) < torch.tensor([[12], [30]])            # image 0: 18 padded memory tokens
    target = torch.randn(2, 6, 16)
    losses = []
    for _ in range(20):
        loss = (layer(queries, memory, valid, is_causal=True) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert (memory.grad[0, 12:] == 0).all() and memory.grad[0, :12].abs().sum() > 0
        memory.grad = None
    assert losses[-1] < 0.8 * losses[0]
    x = queries.clone().requires_grad_(True)  # causal self-attention: query 0 sees only itself
    layer(x, memory, valid, is_causal=True)[:, 0].sum().backward()
    assert (x.grad[:, 1:] == 0).all() and x.grad[:, 0].abs().sum() > 0


int_mask = torch.ones(4, 3, 17, 17, dtype=torch.int64)


@pytest.mark.parametrize("call,message", [
    (lambda q: dropkey.attention(q, q, q, drop_ratio=0.1, mode="dropout"), "unknown mode"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=1.0), "drop_ratio"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=-0.1), "drop_ratio"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=0.1, mode="dropkey_block"), "grid"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=0.1, mode="dropkey_cross", grid=(3, 3)),
     "does not match"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=0.1, mode="dropkey_block", grid=(4, 4), block_size=0),
     "block_size"),
    (lambda q: dropkey.attention(q, q, q[..., :4, :], drop_ratio=0.1), "value"),
    (lambda q: dropkey.attention(q, q[..., :4], q, drop_ratio=0.1), "key"),
    (lambda q: dropkey.attention(q, q[:3], q[:3], drop_ratio=0.1), "broadcast"),
    (lambda q: dropkey.attention(q[..., :0, :], q, q, drop_ratio=0.1), "empty"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=0.1, keep_mask=int_mask), "bool"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=0.1, keep_mask=int_mask.bool()[..., :5]), "broadcast"),
    (lambda q: dropkey.attention(q, q, q, drop_ratio=0.1, keep_mask=int_mask.bool(), training=False),
     "training"),
    (lambda q: dropkey.attention(q, q, q, attn_mask=int_mask), "attn_mask must be bool"),
    (lambda q: dropkey.attention(q, q, q, attn_mask=int_mask.bool()[0, 0, :3]), "broadcast"),
    (lambda q: dropkey.attention(q, q, q, attn_mask=int_mask.bool()[0, 0, 0]), "broadcast"),  # 1-D, as SDPA
    (lambda q: dropkey.attention(q, q.double(), q), "dtypes"),
    (lambda q: dropkey.attention(q, q.to("meta"), q), "devices"),
    (lambda q: dropkey.attention(q.to("meta"), q.to("meta"), q.to("meta"), drop_ratio=0.1, generator=_gen(0)),
     "generator"),
    (lambda q: dropkey.attention(q.long(), q.long(), q.long()), "floating"),
    (lambda q: dropkey.aligned_attention(q, q, q, drop_ratio=0.1, mc_samples=-1), "mc_samples"),
    (lambda q: dropkey.layer_drop_ratios(0.1, 3, "cosine"), "unknown schedule"),
    (lambda q: ViT(image_size=30, patch_size=4), "divisible"),
    (lambda q: ViT(dim=100, heads=3), "divisible"),
])
def test_bad_input_is_a_one_line_value_error(call, message):
    q = torch.randn(4, 3, 17, 8)
    with pytest.raises(ValueError, match=message) as info:
        call(q)
    assert "\n" not in str(info.value)


# ============================================================================ one switch, and SDPA's terms kept
# dropkey.FLASH changes speed, never numbers: both settings draw the same mask from the same generator.

def _switch_results(mode, kw, flash, d=0.5, seed=70, device="cpu"):
    q, k, v = _qkv(B=2, H=4, N=17, seed=seed, grad=True, device=device)
    with _flash(flash):
        out = dropkey.attention(q, k, v, drop_ratio=d, mode=mode, generator=_gen(seed + 1, device),
                                **STRUCTURED, **kw)
    return _out_and_grads(out, (q, k, v))


@pytest.mark.parametrize("mode", dropkey.MODES)
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "bias and causal", "gqa"])
def test_flash_switch_changes_speed_never_numbers(mode, masks):
    bias = torch.randn(2, 1, 17, 17, generator=_gen(72)).masked_fill(~_padding([17, 6], 17), -1e9)
    kw = {"none": {}, "padding": dict(attn_mask=_padding([17, 6], 17).to(DEVICE)),
          "causal": dict(is_causal=True), "bias and causal": dict(attn_mask=bias.to(DEVICE), is_causal=True),
          "gqa": dict(enable_gqa=True)}[masks]
    if masks == "gqa":
        q, k, v = _qkv(B=2, H=4, N=17, seed=73, grad=True, device=DEVICE)
        k, v = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()
        results = []
        for flash in [True, False]:
            with _flash(flash):
                out = dropkey.attention(q, k, v, drop_ratio=0.5, mode=mode, generator=_gen(74, DEVICE),
                                        **STRUCTURED, **kw)
            results.append(_out_and_grads(out, (q, k, v)))
    else:
        results = [_switch_results(mode, kw, flash, device=DEVICE) for flash in [True, False]]
    _assert_all_close(*results)
    assert not torch.equal(results[0][0], _switch_results(mode, kw, True, seed=80, device=DEVICE)[0]) or \
        mode == "none"                                # a test that can fail: another seed, another mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_flash_switch_with_fallen_back_rows_on_the_plain_dropkey_mask(dtype):
    """d = 0.99 over 17 keys: most rows lose every key and keep them all (`fall_back`), in both settings."""
    q, k, v = _qkv(B=2, N=17, seed=92, dtype=dtype, grad=True)
    results = []
    for flash in [True, False]:
        with _flash(flash):
            out = dropkey.attention(q, k, v, drop_ratio=0.99, generator=_gen(93))
        results.append(_out_and_grads(out.float(), (q, k, v)))
    keep = dropkey.sample_keep_mask((2, 3, 17, 17), "dropkey", 0.99, generator=_gen(93))
    assert (~keep.any(-1)).float().mean() > 0.5                  # the case under test happens
    _assert_all_close(*results, tol=1e-5 if dtype != torch.bfloat16 else 2e-2)


@pytest.mark.parametrize("mode", dropkey.MODES)
@pytest.mark.parametrize("flash", [True, False])
def test_return_weights_never_changes_the_output(mode, flash):
    q, k, v = _qkv(B=2, N=17, seed=75)
    with _flash(flash):
        plain = dropkey.attention(q, k, v, drop_ratio=0.5, mode=mode, generator=_gen(76), **STRUCTURED)
        out, weights = dropkey.attention(q, k, v, drop_ratio=0.5, mode=mode, generator=_gen(76), **STRUCTURED,
                                         return_weights=True)
    torch.testing.assert_close(plain, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights @ v, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("flash", [True, False])
def test_dropattention_output_with_underflowing_kept_weights_is_the_same_with_return_weights(flash):
    """float16, a logit gap of 20: every kept weight underflows, Eq. 1 is 0/0 and keeps p (both calls)."""
    q = torch.zeros(1, 1, 1, 4, dtype=torch.float16)
    k = torch.zeros(1, 1, 4, 4, dtype=torch.float16)
    q[..., 0], k[..., 0, 0] = 1.0, 20.0
    v = torch.randn(1, 1, 4, 4, generator=_gen(77)).half()
    keep = torch.tensor([False, True, True, True]).expand(1, 1, 1, 4)
    with _flash(flash):
        plain = dropkey.attention(q, k, v, drop_ratio=0.5, mode="dropattention", keep_mask=keep, scale=1.0)
        out, _ = dropkey.attention(q, k, v, drop_ratio=0.5, mode="dropattention", keep_mask=keep, scale=1.0,
                                   return_weights=True)
    torch.testing.assert_close(plain, out, atol=0, rtol=0)


@pytest.mark.parametrize("mode", dropkey.DROPPING_MODES)
@pytest.mark.parametrize("flash", [True, False])
def test_a_callers_keep_mask_and_attn_mask_are_never_modified(mode, flash):
    q, k, v = _qkv(B=2, N=17, seed=78, grad=True)
    keep = dropkey.sample_keep_mask((2, 3, 17, 17), mode, 0.9, generator=_gen(79), **STRUCTURED)
    bias = torch.randn(2, 1, 17, 17, generator=_gen(80)).masked_fill(~_padding([17, 5], 17), float("-inf"))
    keep_before, bias_before = keep.clone(), bias.clone()
    with _flash(flash):
        dropkey.attention(q, k, v, bias, 0.9, True, mode=mode, keep_mask=keep, **STRUCTURED).sum().backward()
    assert torch.equal(keep, keep_before) and torch.equal(bias, bias_before)


@pytest.mark.parametrize("fill", ["finfo.min", -1e9, -1e4])
@pytest.mark.parametrize("d", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("flash", [True, False])
def test_finite_padding_gets_exactly_zero_weight_and_gradient_under_any_drop(fill, d, flash):
    """Hugging Face style masks: padding at finfo.min, -1e9 or -1e4 (<= NOT_ALLOWED_AT) is never attended."""
    q, k, v = _qkv(B=3, N=33, seed=81, grad=True)
    lengths = [33, 9, 2]
    value = torch.finfo(torch.float32).min if fill == "finfo.min" else fill
    bias = torch.zeros(3, 1, 1, 33).masked_fill(~_padding(lengths, 33), value)
    assert value <= dropkey.NOT_ALLOWED_AT
    with _flash(flash):
        out = dropkey.attention(q, k, v, attn_mask=bias, drop_ratio=d, generator=_gen(82))
        _, weights = dropkey.attention(q, k, v, attn_mask=bias, drop_ratio=d, generator=_gen(82),
                                       return_weights=True)
    out.square().sum().backward()
    for b, n in enumerate(lengths):
        assert (weights[b, ..., n:] == 0).all()
        assert (v.grad[b, :, n:] == 0).all() and (k.grad[b, :, n:] == 0).all()
        torch.testing.assert_close(weights[b].sum(-1), torch.ones(3, 33), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["dropkey", "vanilla", "dropkey_cross"])
def test_func_grad_and_vmap_with_different_randomness_train_as_with_sdpa(mode):
    q, k, v = _qkv(B=2, N=17, seed=83)

    def loss(q):
        return dropkey.attention(q, k, v, drop_ratio=0.5, mode=mode, **STRUCTURED).square().sum()
    torch.manual_seed(84)
    grad = torch.func.grad(loss)(q)
    torch.manual_seed(84)
    q_ = q.clone().requires_grad_()
    expected, = torch.autograd.grad(loss(q_), q_)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)
    same = q[0].expand(4, 3, 17, 8)                   # four identical inputs: "different" masks
    out = torch.vmap(lambda x: dropkey.attention(x, k[0], v[0], drop_ratio=0.5, mode=mode, **STRUCTURED),
                     randomness="different")(same)
    assert out.shape == (4, 3, 17, 8) and not torch.equal(out[0], out[1])
    grads = torch.vmap(torch.func.grad(loss), randomness="different")(q.unsqueeze(1))
    assert grads.shape == (2, 1, 3, 17, 8) and torch.isfinite(grads).all()


@pytest.mark.parametrize("dynamic", [None, True])
def test_torch_compile_fullgraph_trains_across_changing_shapes(dynamic):
    torch._dynamo.reset()
    torch.manual_seed(85)
    model = ViT(image_size=16, patch_size=4, dim=16, depth=1, heads=2, attn_drop_mode="dropkey")
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for batch in [2, 3, 5]:                            # the second shape is where symbolic shapes start
        loss = compiled(torch.randn(batch, 3, 16, 16)).square().mean()
        loss.backward()
        assert torch.isfinite(loss)


def test_enable_gqa_is_sdpas_and_drops_as_repeated_heads():
    q, k, v = _qkv(B=2, H=8, N=17, seed=86)
    k, v = k[:, :2], v[:, :2]                          # 8 query heads, 2 key/value heads
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(dropkey.attention(q, k, v, enable_gqa=True, training=False), expected)
    keep = dropkey.sample_keep_mask((2, 8, 17, 17), "dropkey", 0.5, generator=_gen(87))
    repeated = [t.repeat_interleave(4, dim=1) for t in (k, v)]
    ref, _ = _reference(q, *repeated, keep, "dropkey", 0.5)
    torch.testing.assert_close(dropkey.attention(q, k, v, drop_ratio=0.5, enable_gqa=True, keep_mask=keep), ref,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        dropkey.attention(q, k, v)
    with pytest.raises(ValueError, match="enable_gqa needs"):
        dropkey.attention(q, torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8), enable_gqa=True)


def test_drop_ratio_as_float_zero_dim_tensor_or_numpy_scalar_gives_the_same_mask():
    q, k, v = _qkv(B=2, N=17, seed=88)
    outs = [dropkey.attention(q, k, v, drop_ratio=d, generator=_gen(89))
            for d in [0.3, torch.tensor(0.3), np.float64(0.3), np.float32(0.3)]]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-6)
    for bad in [torch.tensor([0.3]), np.float64(1.0), torch.tensor(True), "0.3", float("nan")]:
        with pytest.raises(ValueError, match="drop_ratio"):
            dropkey.attention(q, k, v, drop_ratio=bad)


def test_empty_head_dim_and_a_mask_of_another_dtype_as_sdpa():
    q, k, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 6, 0), torch.randn(2, 3, 6, 4)
    expected = F.scaled_dot_product_attention(q, k, v)            # E = 0: the mean of the values
    for flash in [True, False]:
        with _flash(flash):
            torch.testing.assert_close(dropkey.attention(q, k, v, training=False), expected)
            assert dropkey.attention(q, k, v, drop_ratio=0.5).shape == (2, 3, 5, 4)
    q, k, v = _qkv(B=2, N=5, seed=90)
    with pytest.raises(RuntimeError):                              # SDPA refuses it ...
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="attn_mask must be bool or query's torch.float32"):  # ... and so do we
        dropkey.attention(q, k, v, attn_mask=torch.zeros(5, 5, dtype=torch.float64))


def test_sec_3_2_seed_rates_are_the_papers_formulas():
    """gamma = d / K * n_h n_w / ((n_h - s + 1)(n_w - s + 1)), K = s^2 (block) or s (n_h + n_w - s) (cross)."""
    assert dropkey.seed_rate("dropkey_block", 0.3, (8, 6), 3) == pytest.approx(0.3 / 9 * 48 / (6 * 4))
    assert dropkey.seed_rate("dropkey_cross", 0.3, (8, 6), 3) == pytest.approx(0.3 / (3 * 11) * 48 / (6 * 4))



# ======================================================================= Eq. 3-4, Table 4: Align Expectation
# expected_weights against an independent reference: every one of the 2^N keep
# masks, weighted by its probability (N <= 12), or 10^5 sampled masks (N = 65, 257).

def _every_mask(p):
    """Number of kept keys (2^N,) and weights w = k p / sum(k p), or p if no kept p_j > 0, (..., 2^N, N)."""
    p = p.double()
    N = p.shape[-1]
    keep = ((torch.arange(2 ** N)[:, None] >> torch.arange(N)) & 1).bool()     # (2^N, N)
    kp = p[..., None, :] * keep                                                  # (..., 2^N, N)
    total = kp.sum(-1, keepdim=True)
    return keep.sum(-1).double(), torch.where(total > 0, kp / total.clamp_min(1e-300), p[..., None, :])


def _enumerated_expectation(p, d, masks=None):
    """E[w] = sum over all 2^N keep masks of P(mask) w(mask), (..., N); masks: _every_mask(p), reused."""
    kept, w = masks or _every_mask(p)
    prob = (1 - d) ** kept * d ** (p.shape[-1] - kept)                          # (2^N,)
    return (prob[:, None] * w).sum(-2)                                           # (..., N)


def _softmax_rows(R, N, scale, seed, dtype):
    """R rows of softmax(scale * randn) computed in dtype: scale 30 underflows some p to 0 in float32."""
    logits = torch.randn(R, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return logits.to(dtype).softmax(-1)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("N", [1, 2, 5, 12])
def test_expected_weights_matches_enumeration_of_all_masks(N, dtype, atol):
    """Max abs error <= 1e-6 (float64) / 1e-5 (float32), flat to peaked rows, d up to 0.95."""
    for i, scale in enumerate([0.01, 1.0, 3.0, 10.0, 30.0]):       # near-uniform ... p down to 1e-40 or 0
        p = _softmax_rows(12, N, scale, seed=100 + i, dtype=dtype)
        masks = _every_mask(p)
        for d in [0.01, 0.1, 0.3, 0.5, 0.8, 0.95]:
            got = dropkey.expected_weights(p, d)
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), _enumerated_expectation(p, d, masks), atol=atol, rtol=0,
                                       msg=lambda m: f"N={N} scale={scale} d={d}: {m}")


def _sampled_expectation(p, d, n, seed):
    """Mean of w = k p / sum(k p) (p when nothing is kept) over n sampled keep masks, (R, N)."""
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(p)
    for _ in range(n // 10_000):
        keep = torch.rand(10_000, *p.shape, generator=g, dtype=p.dtype) >= d       # (10^4, R, N)
        kp = keep * p
        s = kp.sum(-1, keepdim=True)
        total += torch.where(s > 0, kp / s, p).sum(0)
    return total / n


@pytest.mark.parametrize("N,d", [(65, 0.3), (65, 0.8), (257, 0.5)])
def test_expected_weights_matches_monte_carlo_within_4_sigma(N, d):
    """10^5 masks, per element |E - mean| <= 4 sigma, sigma = sqrt(E (1 - E) / 10^5).

    w_j lies in [0, 1], so var(w_j) <= E (1 - E). The sample variance is no
    safe sigma here: a tiny p_j gets most of its weight from rare rows where
    every larger key is dropped, which 10^5 samples under-represent.
    """
    p = torch.cat([_softmax_rows(1, N, scale, seed=200 + N, dtype=torch.float64) for scale in (0.5, 3.0)])
    mean = _sampled_expectation(p, d, n=100_000, seed=N)
    exact = dropkey.expected_weights(p, d)
    sigma = (exact * (1 - exact) / 100_000).sqrt()
    assert ((exact - mean).abs() <= 4 * sigma).all(), f"max z {((exact - mean).abs() / sigma).max():.1f}"
    assert ((exact - p).abs() / sigma).max() > 20                    # and far from p itself
    assert ((dropkey.expected_weights(p.float(), d).double() - mean).abs() <= 4 * sigma + 1e-5).all()


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_expected_weights_rows_sum_to_one_also_with_zero_weights(dtype, atol):
    """Sum_j c_j p_j = 1 (Eq. 3); keys with p_j = 0 get 0 and leave the fall-back at d^M, M = #{p > 0}."""
    p = _softmax_rows(64, 65, 2.0, seed=3, dtype=dtype)
    p[:, ::2] = 0.0                                                  # half the keys never take part
    p = p / p.sum(-1, keepdim=True)
    for d in [0.1, 0.5, 0.9]:
        got = dropkey.expected_weights(p, d)
        torch.testing.assert_close(got.sum(-1), torch.ones(64, dtype=dtype), atol=atol, rtol=0)
        assert (got[:, ::2] == 0).all()
    small = torch.tensor([[0.6, 0.0, 0.4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(dropkey.expected_weights(small, 0.7), _enumerated_expectation(small, 0.7),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("d", [0.1, 0.5, 0.9])
def test_smoothing_coefficient_decreases_with_p(d):
    """Eq. 4: c_s < c_t when p_s > p_t; and sum_j c_j p_j = 1 puts c of the largest p below 1."""
    p = torch.linspace(0.0, 6.0, 12, dtype=torch.float64).softmax(-1)[None]   # p_j grows by e^0.55 per key
    c = (dropkey.expected_weights(p, d) / p)[0]
    assert (c.diff() < 0).all(), c
    assert c[-1] < 1 < c[0]


def test_expected_weights_is_p_at_d_zero_and_keeps_shape_dtype_and_no_grad():
    p = _softmax_rows(6, 9, 1.0, seed=5, dtype=torch.float32).reshape(2, 3, 9).requires_grad_(True)
    # re-normalised p
    torch.testing.assert_close(dropkey.expected_weights(p, 0.0), p.detach(), atol=1e-7, rtol=0)
    got = dropkey.expected_weights(p, 0.3)                          # eval only: runs under no_grad
    assert got.shape == p.shape and got.dtype == p.dtype and not got.requires_grad
    torch.testing.assert_close(got.reshape(6, 9), dropkey.expected_weights(p.detach().reshape(6, 9), 0.3))
    torch.testing.assert_close(dropkey.expected_weights(p, 1e-7), p.detach(), atol=1e-6, rtol=0)



def test_table_4_monte_carlo_alignment_matches_the_enumerated_expectation_eq_3():
    """aligned_attention(mc_samples=T) averages the re-normalised weights: E[w_j] = c_j p_j (Eq. 3)."""
    q, k, v = (t[:1].expand(500, 1, 4, 8) for t in _qkv(B=1, H=1, N=4, seed=23))  # 500 copies of one row set
    d, T = 0.5, 8                                                    # 500 x 8 = 4000 masks per weight
    p = _softmax_weights(q, k)[0, 0].double()                        # (4, 4)
    expected = _enumerated_expectation(p, d)                         # all 2^4 keep masks, (4, 4)
    _, w = dropkey.aligned_attention(q, k, v, drop_ratio=d, mc_samples=T, return_weights=True,
                                     generator=_gen(24))
    w = w[:, 0].double().mean(0)                                     # average of 4000 sampled weights
    sigma = torch.sqrt(expected * (1 - expected) / 4000)  # each w_j lies in [0, 1]: var <= E(1 - E)
    assert ((w - expected).abs() <= 4 * sigma + 1e-6).all()
    assert (w - p).abs().max() > 0.01                                # and it is not plain attention


@pytest.mark.parametrize("mode", ["dropkey", "dropattention"])
def test_table_4_exact_alignment_is_expected_weights_at_v(mode):
    """aligned_attention(mc_samples=0): out = E[w] @ v, E[w] by enumeration; weights returned, no autograd."""
    q, k, v = _qkv(B=2, H=2, N=6, D=4, seed=7, grad=True)
    d = 0.4
    out, w = dropkey.aligned_attention(q, k, v, drop_ratio=d, mode=mode, return_weights=True)
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    want_w = _enumerated_expectation(p.detach(), d)
    torch.testing.assert_close(w.double(), want_w, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, (want_w.float() @ v).detach(), atol=1e-5, rtol=1e-5)
    assert not out.requires_grad
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3   # not plain attention
    torch.testing.assert_close(dropkey.aligned_attention(q, k, v, drop_ratio=0.0, mode=mode),
                               F.scaled_dot_product_attention(q, k, v).detach())   # d = 0: nothing to align


def test_table_4_vanilla_expectation_is_exactly_p():
    """nn.Dropout's rule: E[k_j p_j / (1 - d)] = p_j, the all-dropped row included (it is zeros)."""
    q, k, v = _qkv(B=2, H=2, N=3, D=4, seed=8)
    d = 0.8
    _, w = dropkey.aligned_attention(q, k, v, drop_ratio=d, mode="vanilla", return_weights=True)
    p = _softmax_weights(q, k)
    torch.testing.assert_close(w, p)
    want = torch.zeros_like(p, dtype=torch.float64)
    for bits in range(8):                                            # the 2^3 masks, written out
        keep = torch.tensor([(bits >> j) & 1 for j in range(3)], dtype=torch.bool)
        prob = (1 - d) ** keep.sum().item() * d ** (3 - keep.sum().item())
        want += prob * p.double() * keep / (1 - d)
    torch.testing.assert_close(w.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", dropkey.STRUCTURED_MODES)
def test_table_4_exact_alignment_is_an_error_for_structured_modes(mode):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not independent.*mc_samples"):
        dropkey.aligned_attention(q, k, v, drop_ratio=0.3, mode=mode, **STRUCTURED)
    model = ViT(image_size=16, patch_size=4, dim=8, depth=1, heads=2, attn_drop_mode=mode,
                block_size=2).eval()
    model.align = "exact"
    with pytest.raises(ValueError, match="not independent"):
        model(torch.randn(1, 3, 16, 16))


def test_table_4_exact_alignment_follows_dropkey_where_weights_underflow():
    """Two keys, the second 110 below the first: its float32 p underflows to 0, yet DropKey gives it all
    the weight when only it is kept. E[w] = (0.79, 0.21) at d = 0.3, not the (1, 0) of the weights."""
    logits = torch.tensor([0.0, -110.0])                              # two keys: p = (1, 0) in float32
    q = torch.tensor([[[[1.0]]]])                                     # (1, 1, 1, 1): logits = q k^T * scale
    k = logits.view(1, 1, 2, 1)
    v = torch.eye(2).view(1, 1, 2, 2)
    _, w = dropkey.aligned_attention(q, k, v, drop_ratio=0.3, scale=1.0, return_weights=True)
    torch.testing.assert_close(w[0, 0, 0], torch.tensor([0.7 + 0.3 * 0.3, 0.3 * 0.7]), atol=1e-6, rtol=0)


def test_table_4_alignment_composes_with_padding():
    q, k, v = _qkv(B=2, N=6, seed=12)
    pad = _padding([3, 6], 6)
    for T in [0, 16]:
        _, w = dropkey.aligned_attention(q, k, v, pad, drop_ratio=0.5, mc_samples=T, return_weights=True,
                                         generator=_gen(13))
        assert (w[0, :, :, 3:] == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 6), atol=1e-5, rtol=0)


def test_table_4_vit_align_exact_uses_expected_weights_in_every_layer():
    """model.align = 'exact' at eval equals the forward written by hand with enumerated E[w] (N = 5)."""
    torch.manual_seed(11)
    model = ViT(image_size=8, patch_size=4, dim=8, depth=2, heads=2, drop_ratio=0.5,
                schedule="constant").eval()
    x = torch.randn(2, 3, 8, 8)
    assert model.align == "none"
    plain = model(x)
    model.align = "exact"
    got = model(x)
    with torch.no_grad():
        h = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]        # (2, 4, 8)
        h = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), h], dim=1)
        for block in model.blocks:
            qkv = block.attn.qkv(block.norm1(h)).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
            p = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / 2.0, dim=-1)           # (2, 2, 5, 5)
            o = (_enumerated_expectation(p, 0.5).float() @ qkv[2]).transpose(1, 2).reshape(2, 5, 8)
            h = h + block.attn.proj(o)
            h = h + block.mlp(block.norm2(h))
        want = model.head(model.norm(h[:, 0]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-4
    model.train()
    assert model.align == "exact" and model(x).shape == (2, 10)       # training ignores it


def test_table_4_vit_monte_carlo_eval_changes_output_and_is_off_by_default():
    torch.manual_seed(26)
    model = ViT(dim=32, depth=2, heads=2, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    plain = model(x)
    assert torch.equal(model(x), plain)                              # eval is deterministic
    model.mc_samples = 20
    assert not torch.allclose(model(x), plain, atol=1e-6)


# ============================================================================ the ViT (vit.py)

def test_vit_shapes_attention_and_layer_ratios():
    model = ViT(dim=32, depth=3, heads=2, patch_size=8, num_classes=7).eval()
    x = torch.randn(5, 3, 32, 32)
    logits, attn = model(x, return_attention=True)
    assert logits.shape == (5, 7) and len(attn) == 3
    for w in attn:
        assert w.shape == (5, 2, 17, 17)
        torch.testing.assert_close(w.sum(-1), torch.ones(5, 2, 17))
    assert model.layer_ratios == dropkey.layer_drop_ratios(0.3, 3, "decreasing")
    assert [b.attn.drop_ratio for b in model.blocks] == model.layer_ratios
    logits, attn = model(x, return_attention=True, drop_patches=0.5)
    assert logits.shape == (5, 7) and attn[0].shape == (5, 2, 9, 9)


def test_vit_print_shows_each_blocks_mode_and_drop_ratio():
    text = str(ViT(dim=8, depth=3, heads=2, attn_drop_mode="dropkey_cross", drop_ratio=0.3))
    assert [line.strip() for line in text.splitlines() if "mode=" in line] == [
        f"heads=2, mode='dropkey_cross', drop_ratio={r}" for r in ("0.3", "0.15", "0")]


def test_table_3_vit_drop_patches_keeps_a_different_subset_per_image():
    from vit import remove_patches
    torch.manual_seed(25)
    x = torch.arange(16.0).reshape(1, 16, 1).expand(8, 16, 1)        # token i carries the value i
    kept = remove_patches(x, 0.75)[..., 0]                          # (8, 4)
    assert kept.shape == (8, 4)
    assert len({tuple(r.tolist()) for r in kept}) > 1                # subsets differ per image
    assert (kept.diff(dim=1) > 0).all()                              # original order kept


def test_fig_4_cls_attention_entropy_of_uniform_and_one_hot_rows():
    from vit import cls_attention_entropy
    w = torch.zeros(2, 3, 5, 5)
    w[0, :, 0] = 1 / 5                                               # uniform class-token row: log 5
    w[1, :, 0, 2] = 1.0                                              # one-hot: 0
    torch.testing.assert_close(cls_attention_entropy(w), torch.tensor([math.log(5), 0.0]))


def test_python_vit_py_prints_schedules_and_entropy():
    out = subprocess.run([sys.executable, "vit.py"], capture_output=True, text=True, timeout=120,
                         cwd=pathlib.Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert "decreasing drop ratios: 0.30, 0.24, 0.18, 0.12, 0.06, 0.00" in out.stdout
    assert "parameters: 1,806,538" in out.stdout and "entropy per layer" in out.stdout


def test_vit_benchmark_prints_a_row_per_mode_with_paired_ratios(capsys):
    import vit
    with _one_thread():
        times = vit.benchmark_step(patch_size=16, batch=2, runs=3)
    printed = capsys.readouterr().out
    assert list(times) == ["none", "none, 2nd copy", "vanilla", "dropkey"]
    assert all(len(ts) == 3 and min(ts) > 0 for ts in times.values())
    for row in ["images/s", "none, 2nd copy", "vanilla", "dropkey", "x none"]:
        assert row in printed
    assert vit.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == 2.0   # median of 2, 3, 1


@pytest.mark.parametrize("mode", dropkey.MODES)
def test_vit_tiny_model_overfits_one_batch_in_every_mode(mode):
    torch.manual_seed(27)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    model = ViT(dim=48, depth=2, heads=2, patch_size=8, mlp_ratio=2.0, attn_drop_mode=mode,
                drop_ratio=0.3, schedule="constant", block_size=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    with _one_thread():
        for step in range(300):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc == 1.0, f"{mode}: training accuracy {acc:.3f} after 300 steps"


@pytest.mark.parametrize("mode", dropkey.DROPPING_MODES)
def test_vit_compiles_whole_and_matches_eager_under_one_keep_mask(mode, monkeypatch):
    """torch.compile(fullgraph=True) traces a training step, no graph break; same outputs and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(28)
    model = ViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2, attn_drop_mode=mode, block_size=2,
                schedule="constant")
    x = torch.randn(3, 3, 16, 16)
    keep = dropkey.sample_keep_mask((3, 2, 17, 17), mode, 0.3, grid=(4, 4), block_size=2, generator=_gen(29))
    original = dropkey.attention
    monkeypatch.setattr(dropkey, "attention", lambda *a, **kw: original(*a, **kw, keep_mask=keep))
    results = []
    for run in [model, torch.compile(model, fullgraph=True, backend="aot_eager")]:
        out = run(x)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    _assert_all_close(*results)
    monkeypatch.undo()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(30)
    compiled(x).sum().backward()  # masks drawn by torch's RNG inside the graph


# ============================================================================ the fast path (dropkey.FLASH)
# Its contract: the numbers of the explicit path under one keep mask.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_under_autocast_equals_the_explicit_path(dtype, monkeypatch):
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.skip("float16 autocast is a GPU setting")
    q, k, v = _qkv(B=2, N=17, seed=64, device=DEVICE)
    keep = dropkey.sample_keep_mask((2, 3, 17, 17), "dropkey", 0.4, device=DEVICE, generator=_gen(65, DEVICE))
    with torch.autocast(DEVICE.type, dtype=dtype):
        outs = [_attend(q.to(dtype), k, v, "dropkey", 0.4, flash, keep_mask=keep) for flash in [True, False]]
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["dropkey", "vanilla", "none"])
def test_fast_path_an_empty_batch_gives_an_empty_output(mode):
    q, k, v = _qkv(B=0, grad=True)
    out = _attend(q, k, v, mode, 0.3)
    assert out.shape == (0, 3, 17, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_fast_path_takes_q_k_v_and_gradients_in_the_vit_layout():
    """vit.py hands over q, k, v as strided views of one projection and gets a strided gradient back."""
    B, N, H, D = 3, 17, 3, 8
    qkv = torch.randn(B, N, 3, H, D, generator=_gen(46), requires_grad=True)
    keep = dropkey.sample_keep_mask((B, H, N, N), "dropkey", 0.4, generator=_gen(47))
    keep[2, 0, 5] = False
    w = torch.randn(B, N, H * D, generator=_gen(48))
    results = []
    for flash in [True, False]:
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # 3 x (B, H, N, D), not contiguous
        out = _attend(q, k, v, "dropkey", 0.4, flash, keep_mask=keep)
        y = out.transpose(1, 2).reshape(B, N, H * D)                  # as vit.py does
        results.append((out, *torch.autograd.grad((y * w).sum(), qkv)))
    _assert_all_close(*results)


def test_fast_path_bfloat16_with_an_all_dropped_row_matches_the_float32_reference():
    q, k, v = _qkv(B=2, N=65, D=16, seed=42, dtype=torch.bfloat16, grad=True)
    keep = dropkey.sample_keep_mask((2, 3, 65, 65), "dropkey", 0.5, generator=_gen(43))
    keep[1, 2, 0] = False
    out = _attend(q, k, v, "dropkey", 0.5, keep_mask=keep)
    ref_out, _ = _reference(q.float(), k.float(), v.float(), keep, "dropkey", 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)   # bfloat16: 8-bit mantissa
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ============================================================================ trainer: train_cifar.py


HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset", "synthetic", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
        "--dim", "32", "--depth", "2", "--heads", "2", "--patch-size", "8", "--warmup-epochs", "0.5"]
TWO_STAGES = ["--epochs", "2", "--finetune-epochs", "1", "--mc-samples", "2"]
# tiny models: two threads on a busy 2-core CPU can be 50x slower
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


class _Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2 wrote the official CIFAR files: protocol 2, every str and
    bytes as a Python 2 str (BINSTRING), numpy's reconstruction under its numpy 1 name."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        obj = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)
    dispatch[bytes] = dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is train_cifar._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _py2_pickle(obj):
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _write_cifar(root, name, n=7, seed=0):
    """A CIFAR folder in the official format with n images per file; returns {file: (data, labels)}."""
    spec = train_cifar.CIFAR[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng, written = np.random.default_rng(seed), {}
    for file in spec["train"] + spec["test"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, spec["classes"], n).tolist()
        batch = {b"batch_label": b"batch " + file.encode(), b"data": data, spec["label_key"]: labels,
                 b"filenames": [b"img_%d.png" % i for i in range(n)]}
        if name == "cifar100":
            batch[b"coarse_labels"] = [label // 5 for label in labels]
        (folder / file).write_bytes(_py2_pickle(batch))
        written[file] = (data, labels)
    return written


def _channel_major(data):
    """Independent decoding of CIFAR rows: pixel (c, i, j) is byte c * 1024 + i * 32 + j."""
    c, i, j = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return torch.from_numpy(data[:, c * 1024 + i * 32 + j])             # (n, 3, 32, 32)


def _cfg(dataset, data_dir):
    return argparse.Namespace(
        dataset=dataset, data_dir=str(data_dir), limit_train=None, limit_test=None, seed=0
    )


def _tarball(tmp_path, name):
    """data/ with only the tarball of a small real-format CIFAR folder: (data_dir, tarball, written)."""
    written = _write_cifar(tmp_path / "staging", name)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tarball = data_dir / os.path.basename(train_cifar.CIFAR[name]["url"])
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(
            tmp_path / "staging" / train_cifar.CIFAR[name]["folder"],
            arcname=train_cifar.CIFAR[name]["folder"],
        )
    return data_dir, tarball, written


def test_trainer_py2_test_pickles_have_the_layout_of_the_official_files():
    raw = _py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]})
    assert raw.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"_codecs" not in raw and b"X\x04\x00\x00\x00data" not in raw   # no Python 3 bytes or str


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_trainer_cifar_loader_reads_the_official_pickle_format(tmp_path, name):
    written = _write_cifar(tmp_path, name)
    spec = train_cifar.CIFAR[name]
    data = train_cifar.load_data(_cfg(name, tmp_path), torch.device("cpu"))
    for split in ("train", "test"):
        images, labels = data[split]
        expect = [written[f] for f in spec[split]]
        assert images.dtype == torch.uint8 and images.shape == (7 * len(expect), 3, 32, 32)
        assert torch.equal(images, torch.cat([_channel_major(d) for d, _ in expect]))
        assert labels.tolist() == sum((l for _, l in expect), [])       # fine labels for CIFAR-100
    torch.testing.assert_close(data["mean"].flatten(), torch.tensor(spec["mean"]), rtol=0, atol=0)


def test_trainer_tarball_with_the_expected_md5_is_extracted_and_loaded(tmp_path, monkeypatch):
    data_dir, tarball, written = _tarball(tmp_path, "cifar10")
    monkeypatch.setitem(train_cifar.CIFAR["cifar10"], "md5", hashlib.md5(tarball.read_bytes()).hexdigest())
    data = train_cifar.load_data(_cfg("cifar10", data_dir), torch.device("cpu"))
    assert torch.equal(data["test"][0], _channel_major(written["test_batch"][0]))
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no temp folder


def test_trainer_wrong_md5_renames_the_tarball_and_extracts_nothing(tmp_path):
    data_dir, tarball, _ = _tarball(tmp_path, "cifar10")                # not the official md5
    with pytest.raises(train_cifar.DataError, match="md5 .* expected c58f30108f718f92721af3b95e74349a"):
        train_cifar.load_data(_cfg("cifar10", data_dir), torch.device("cpu"))
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz.bad"]       # never trusted again


def test_trainer_tarball_without_the_folder_leaves_nothing_half_extracted(tmp_path, monkeypatch):
    data_dir, tarball, _ = _tarball(tmp_path, "cifar100")               # a CIFAR-100 tarball ...
    os.replace(tarball, data_dir / "cifar-10-python.tar.gz")            # ... under the CIFAR-10 name
    md5 = hashlib.md5((data_dir / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(train_cifar.CIFAR["cifar10"], "md5", md5)
    with pytest.raises(train_cifar.DataError, match="could not extract .*cifar-10-batches-py.*; delete it and run"):
        train_cifar.load_data(_cfg("cifar10", data_dir), torch.device("cpu"))
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("member", ["a path out of the folder", "a link out of the folder"])
def test_trainer_tarball_reaching_out_of_its_folder_is_refused_and_writes_nothing(tmp_path, monkeypatch, member):
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    data_dir.mkdir()
    tarball = data_dir / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        if member == "a path out of the folder":
            info = tarfile.TarInfo("cifar-10-batches-py/../../outside")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"owned"))
        else:
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.type, info.linkname = tarfile.SYMTYPE, str(outside)
            tar.addfile(info)
    monkeypatch.setitem(train_cifar.CIFAR["cifar10"], "md5", hashlib.md5(tarball.read_bytes()).hexdigest())
    with pytest.raises(train_cifar.DataError, match="could not extract .*; delete it and run again"):
        train_cifar.load_data(_cfg("cifar10", data_dir), torch.device("cpu"))
    assert not outside.exists() and os.listdir(data_dir) == ["cifar-10-python.tar.gz"]


def test_trainer_failed_download_is_one_clear_error_and_leaves_no_part_file(tmp_path, monkeypatch):
    monkeypatch.setitem(train_cifar.CIFAR["cifar10"], "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(train_cifar.DataError, match="could not download .* or try --dataset synthetic"):
        train_cifar.load_data(_cfg("cifar10", tmp_path / "data"), torch.device("cpu"))
    assert os.listdir(tmp_path / "data") == []


def test_trainer_corrupt_batch_file_exits_with_one_error_line(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])                        # a truncated copy
    run = subprocess.run([sys.executable, "train_cifar.py", "--data-dir", str(tmp_path), "--epochs", "1",
                          "--warmup-epochs", "0", "--out", str(tmp_path / "run")],
                         cwd=HERE, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(
        f"error: {batch} is not a valid CIFAR batch file"
    )


class _Payload:
    """Calls `call` when unpickled: what a hostile file would do."""

    def __init__(self, *call):
        self.call = call

    def __reduce__(self):
        return self.call


def _payloads(target):
    return {
        "builtins.open": (builtins.open, (str(target), "w")),
        "os.system": (os.system, (f"touch {target}",)),
    }


@pytest.mark.parametrize("call", ["builtins.open", "os.system"])
def test_trainer_hostile_batch_file_is_refused_before_it_runs(tmp_path, call):
    target, batch = tmp_path / "pwned", tmp_path / "data_batch_1"
    batch.write_bytes(_py2_pickle({b"data": _Payload(*_payloads(target)[call]), b"labels": []}))
    name = call.split(".")[1]  # pickled as __builtin__.open, posix.system
    refused = rf"{re.escape(str(batch))} is not a valid .*refused \S*\.{name}:"
    with pytest.raises(train_cifar.DataError, match=refused):
        train_cifar.read_batch(str(batch), train_cifar.CIFAR["cifar10"])
    assert not target.exists()
    loaded = pickle.loads(batch.read_bytes(), encoding="latin1")  # the payload is live: a plain load runs it
    if call == "builtins.open":
        loaded["data"].close()
    assert target.exists()


def test_trainer_hostile_checkpoint_is_refused_before_it_runs(tmp_path, capsys):
    target, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    torch.save({"model": _Payload(*_payloads(target)["os.system"])}, run / "checkpoint.pt")
    with pytest.raises(SystemExit, match=f"error: refused to load {run / 'checkpoint.pt'}: weights_only"):
        train_cifar.main(["--resume", str(run)])
    assert not target.exists()
    torch.load(run / "checkpoint.pt", weights_only=False)               # the payload is live
    assert target.exists()


def test_trainer_synthetic_needs_spatial_structure_not_the_mean_colour():
    """Least squares on the mean colour stays at chance (10% + 4 sigma = 12.7% on 2000 test images);
    the same fit on the power spectrum, which sees the texture, is far above it."""
    (x_train, y_train), (x_test, y_test) = train_cifar.synthetic(3000, 0, "train"), train_cifar.synthetic(
        2000, 0, "test"
    )

    def accuracy(feature):
        a, b = feature(x_train), feature(x_test)
        mu, sd = a.mean(0), a.std(0) + 1e-6
        a, b = [torch.cat([(f - mu) / sd, torch.ones(len(f), 1)], 1) for f in (a, b)]
        w = torch.linalg.lstsq(a, F.one_hot(y_train, 10).float()).solution
        return ((b @ w).argmax(1) == y_test).float().mean().item()

    gray = lambda x: x.float().mean(1) - x.float().mean((1, 2, 3)).view(-1, 1, 1)
    assert accuracy(lambda x: x.float().mean((2, 3))) < 0.1 + 4 * math.sqrt(0.09 / 2000)
    assert accuracy(lambda x: torch.fft.rfft2(gray(x)).abs().pow(2).flatten(1)) > 0.25


def test_trainer_synthetic_first_images_do_not_depend_on_n_and_follow_the_seed():
    images, labels = train_cifar.synthetic(1500, seed=3)
    assert torch.equal(train_cifar.synthetic(700, seed=3)[0], images[:700])
    assert not torch.equal(train_cifar.synthetic(700, seed=4)[0], images[:700])
    assert not torch.equal(train_cifar.synthetic(700, seed=3, split="test")[0], images[:700])
    assert images.dtype == torch.uint8 and images.shape == (1500, 3, 32, 32)
    assert set(labels.tolist()) == set(range(10))


def test_trainer_augment_is_a_crop_of_the_padded_image_possibly_flipped():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = train_cifar.augment(images, torch.Generator().manual_seed(0))
    padded = F.pad(images, (4, 4, 4, 4))
    flips = 0
    for b in range(64):
        crops = [padded[b, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[b], c) for c in crops)
        flipped = any(torch.equal(out[b], c.flip(-1)) for c in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert 16 <= flips <= 48  # Binomial(64, 0.5): mean 32, 4 sigma = 16


def test_trainer_lr_schedule_warms_up_decays_to_zero_then_stays_at_the_finetune_lr():
    cfg = argparse.Namespace(lr=1e-3, warmup_epochs=1, epochs=4, finetune_lr=1e-5)
    lrs = [train_cifar.get_lr(step, cfg, steps_per_epoch=10) for step in range(50)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[25] == pytest.approx(0.5e-3) and 0 < lrs[39] < 1e-5 and lrs[40:] == [1e-5] * 10


def test_trainer_weight_decay_only_on_tensors_with_two_or_more_dims():
    model = ViT(dim=32, depth=2, heads=2, patch_size=8)
    cfg = argparse.Namespace(weight_decay=0.05, lr=1e-3)
    decayed, plain = train_cifar.build_optimizer(model, cfg).param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in plain["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}


def test_trainer_cli_run_on_synthetic_writes_every_metric(tmp_path):
    out = tmp_path / "run"
    run = subprocess.run(
        [
            sys.executable,
            "train_cifar.py",
            *TINY,
            *TWO_STAGES,
            "--occlusion",
            "--attention-map",
            "--out",
            str(out),
        ],
        cwd=HERE,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_acc", "test_acc_finetuned", "test_acc_mc"):
        assert 0.0 <= metrics[key] <= 1.0
    entropy = metrics["cls_attention_entropy"]                           # N = 1 + 4 * 4 = 17 keys
    assert len(entropy) == 2 and all(0.0 < e <= math.log(17) + 1e-6 for e in entropy)
    assert list(metrics["occlusion"]) == ["0.0", "0.1", "0.3", "0.5", "0.7", "0.9"]
    assert metrics["images_per_s"] > 0 and metrics["train_time_s"] > 0 and metrics["finished"]
    assert metrics["config"]["dim"] == 32 and metrics["config"]["mode"] == "dropkey"
    assert metrics["torch"] == torch.__version__ and metrics["device"].startswith(train_cifar.resolve_device("auto"))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"]) for r in rows] == [(1, "train"), (2, "train"), (3, "finetune")]
    assert rows[2]["lr"] == 1e-5 and rows[1]["test_acc"] == metrics["test_acc"]
    assert (out / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
    # no .tmp
    assert sorted(os.listdir(out)) == [".lock", "attention.png", "checkpoint.pt", "log.jsonl", "metrics.json"]
    assert sum(line[:5].strip().isdigit() for line in run.stdout.splitlines()) == 3   # one row per epoch


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    with _one_thread():
        train_cifar.main(TINY + TWO_STAGES + ["--out", str(out)])
    return out


def _without_timing(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("train_time_s", "images_per_s", "eval_time_s"):
        del metrics[key]
    del metrics["config"]["out"]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return metrics, [
        {k: v for k, v in r.items() if k not in ("time_s", "images_per_s", "eval_s")} for r in rows
    ]


@pytest.mark.parametrize("stop_at", [1, 2])  # in the second training epoch, in the fine-tune epoch
def test_trainer_resume_ends_bit_identical_to_an_uninterrupted_run(
    uninterrupted_run, tmp_path, monkeypatch, stop_at
):
    out, real = tmp_path / "run", train_cifar.train_one_epoch

    def interrupted(model, optimizer, data, cfg, epoch, *rest):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return real(model, optimizer, data, cfg, epoch, *rest)

    monkeypatch.setattr(train_cifar, "train_one_epoch", interrupted)
    with _one_thread(), pytest.raises(
        SystemExit, match=f"continue with: python train_cifar.py --resume {out}"
    ):
        train_cifar.main(TINY + TWO_STAGES + ["--out", str(out)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == stop_at
    monkeypatch.undo()
    with _one_thread():
        train_cifar.main(["--resume", str(out)])
    assert _without_timing(out) == _without_timing(uninterrupted_run)
    resumed, whole = (
        torch.load(run / "checkpoint.pt", weights_only=True) for run in (out, uninterrupted_run)
    )
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for index, state in whole["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][index][k], v) for k, v in state.items())


def test_trainer_resume_refuses_a_changed_flag(uninterrupted_run, capsys):
    with pytest.raises(SystemExit):
        train_cifar.main(["--resume", str(uninterrupted_run), "--lr", "0.5"])
    assert "drop --lr (saved: 0.001)" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--drop-ratio", "1.5"], ["--mode", "dropout"], ["--epochs", "0"],
                                   ["--dim", "30", "--heads", "4"], ["--epochs", "2", "--warmup-epochs", "5"],
                                   ["--mode", "dropkey_block", "--block-size", "9"], ["--limit-train", "x"]])
def test_trainer_bad_flag_value_is_one_error_line(flags, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train_cifar.main(["--dry-run", *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("train_cifar.py: error: ")
    assert os.listdir(tmp_path) == []


def test_trainer_dry_run_validates_without_data_or_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train_cifar.main(["--dry-run", "--dataset", "cifar100", "--mode", "dropkey_cross", "--block-size", "1"])
    assert capsys.readouterr().out.startswith("dry run: configuration is valid;")
    assert os.listdir(tmp_path) == []                                    # no download, no run folder


def test_trainer_align_exact_reports_test_acc_exact(tmp_path):
    with _one_thread():
        train_cifar.main(TINY + ["--epochs", "1", "--warmup-epochs", "0", "--align", "exact",
                                 "--out", str(tmp_path / "run")])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_acc_exact"] <= 1.0 and "exact" in metrics["eval_time_s"]


def _epoch_syncs(monkeypatch, n, progress):
    """Host syncs made by train_cifar's own lines during one epoch of n images in batches of 8, counted by wrapping
    every Tensor method that returns a Python value; the postfixes the progress bar showed; the epoch's stats."""
    syncs, postfixes = [], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "train_cifar":
                syncs.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    class Bar(list):  # stands for tqdm: iterates, records what set_postfix shows
        def __init__(self, steps, **kwargs):
            super().__init__(steps)

        def set_postfix(self, **shown):
            postfixes.append(shown)
    monkeypatch.setattr(train_cifar, "tqdm", Bar)
    cfg = argparse.Namespace(batch_size=8, lr=1e-3, warmup_epochs=0, epochs=1, finetune_lr=1e-5, weight_decay=0.05,
                             label_smoothing=0.1, out="unused")
    torch.manual_seed(0)
    model = ViT(dim=16, depth=1, heads=2, patch_size=8)
    images, labels = train_cifar.synthetic(n, seed=0)
    data = dict(train=(images, labels), mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))
    with _one_thread():
        stats = train_cifar.train_one_epoch(model, train_cifar.build_optimizer(model, cfg), data, cfg, 0,
                                            torch.Generator().manual_seed(0), progress)
    monkeypatch.undo()
    return len(syncs), postfixes, stats


def test_trainer_epoch_has_no_host_sync_per_step_and_the_bar_reads_every_few_steps(monkeypatch):
    """40 steps: the bar reads the running sums at steps 20 and 40 (PROGRESS_EVERY = 20), one sync each; without
    the bar, 40 steps cost the same syncs as 8 (those of the epoch's end). A sync per step would add 32."""
    assert train_cifar.PROGRESS_EVERY == 20
    quiet_long, _, _ = _epoch_syncs(monkeypatch, 320, progress=False)
    quiet_short, _, _ = _epoch_syncs(monkeypatch, 64, progress=False)
    shown_long, postfixes, stats = _epoch_syncs(monkeypatch, 320, progress=True)
    assert quiet_long == quiet_short <= 4
    assert shown_long - quiet_long == 2 and len(postfixes) == 2
    assert postfixes[-1]["loss"] == f"{stats['train_loss']:.3f}" and postfixes[-1]["acc"] == f"{stats['train_acc']:.3f}"


def test_trainer_compile_trains_through_torch_compile_and_records_it(tmp_path, monkeypatch):
    """A tiny model, one epoch on the CPU with inductor (about 10 s, the C++ compiler included)."""
    torch._dynamo.reset()  # no traces left by other tests' compiled models
    calls, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or real(model, **kwargs))
    out = tmp_path / "run"
    assert _run(SMALL[:-4] + ["--epochs", "1", "--compile", "--out", str(out)]) is None
    checkpoint, log, metrics, _ = _folder(out)
    assert calls == [dict(fullgraph=True)] and metrics["config"]["compile"] and checkpoint["config"]["compile"]
    assert metrics["finished"] and math.isfinite(log[0]["train_loss"]) and 0 <= metrics["test_acc"] <= 1
    assert _run(["--resume", str(out), "--compile"]) is None                  # as saved: accepted


def test_trainer_compile_failure_is_one_line_and_commits_nothing(tmp_path, monkeypatch, capsys):
    """No working C++ compiler (a path that does not exist), and no cached kernels to fall back on."""
    import torch._inductor.config as inductor
    torch._dynamo.reset()
    monkeypatch.setattr(inductor.cpp, "cxx", (None, str(tmp_path / "no-such-c++")))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    out = tmp_path / "run"
    message = _run(SMALL[:-4] + ["--epochs", "1", "--dim", "24", "--compile", "--out", str(out)])
    assert message.startswith("error: --compile: torch.compile failed (") and "C++ compiler" in message
    assert message.endswith("; run without --compile") and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err and sorted(os.listdir(out)) == [".lock"]


# ============================================================================ docs: README

README = pathlib.Path(__file__).resolve().parent / "README.md"
DOCS = [README] + sorted((README.parent / "docs").glob("*.md"))        # every page a reader is sent to
_RECORD = 'python() { printf "%s\\0" "$@"; echo; }; pip() { :; }; jupyter() { :; }\n'
_DOCS_TINY = ["--dataset", "synthetic", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
              "--dim", "32", "--depth", "2", "--heads", "2", "--patch-size", "8", "--warmup-epochs", "0.5"]
# The over-fitting regime of docs/exercises.md and docs/overfitting.md; a test checks both pages use it.
OVERFIT = ("--dataset synthetic --dim 64 --depth 4 --heads 2 --limit-train 500 --limit-test 1000 --label-noise 0.4 "
           "--epochs 100 --warmup-epochs 5 --label-smoothing 0 --weight-decay 0 --occlusion")
_TIMINGS = ("train_time_s", "images_per_s", "eval_time_s")               # rows of --summarize that vary per run


def _fenced(text):
    """The fenced blocks of a Markdown page in order: (language, body, text between it and the previous block)."""
    blocks, last = [], 0
    for match in re.finditer(r"^```(\w*)\n(.*?)^```\n?", text, re.S | re.M):
        blocks.append((match[1], match[2], text[last:match.start()]))
        last = match.end()
    return blocks


def _snippets(path):
    """(code, printed) of every Python block of a page: printed is the ```text block after "prints:", or None."""
    blocks, out = _fenced(path.read_text()), []
    for i, (lang, body, _) in enumerate(blocks):
        if lang == "python":
            after = blocks[i + 1] if i + 1 < len(blocks) else None
            printed = after[1] if after and after[0] == "text" and after[2].strip() == "prints:" else None
            out.append((body, printed))
    return out


def _readme_train_commands(text):
    """The argv of every `python train_cifar.py` in a page's bash blocks, as bash itself expands them.

    The blocks run in order as one bash session, in an empty folder, with `python`, `pip` and `jupyter`
    replaced by functions that run nothing (python prints its arguments): loops, variables and line
    continuations mean what they mean to a reader's shell.
    """
    blocks = [body for lang, body, _ in _fenced(text) if lang == "bash"]
    with tempfile_dir() as empty:
        out = subprocess.run(["bash", "-c", _RECORD + "\n".join(blocks)], cwd=empty, capture_output=True,
                             text=True, timeout=60).stdout
    commands = [line.split("\0")[:-1] for line in out.splitlines()]
    return [argv[1:] for argv in commands if argv[:1] == ["train_cifar.py"]]


@contextlib.contextmanager
def tempfile_dir():
    import tempfile
    with tempfile.TemporaryDirectory() as path:
        yield path


def _slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_readme_is_a_short_guide_that_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 400, "README.md is a short guide: reference belongs in docs/"
    for page in DOCS[1:]:
        assert f"](docs/{page.name})" in text, f"README does not link docs/{page.name}"
    for heading in ("Set up and test", "Modes", "Use it in your model", "Reading order and paper map",
                    "Step through it", "Train", "Theory", "Exercises"):
        assert f"## {heading}\n" in text and f"(#{_slug(heading)})" in text, f"contents lack {heading}"
    assert "dropkey.NOT_ALLOWED_AT" in text and "long_rows.py" in text      # the padding rule, the optional file


def test_docs_every_link_between_pages_resolves():
    """Relative links of README.md and docs/*.md reach a file, and an anchor reaches a heading of it."""
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_readme_states_the_commands_ci_and_a_gpu_run():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    bash = "".join(body for lang, body, _ in _fenced(text) if lang == "bash")
    assert ci == "python -m pytest -q test_dropkey.py" and ci in bash.splitlines()   # CI runs the README's
    assert "DROPKEY_TEST_DEVICE=cuda python -m pytest -q test_dropkey.py" in bash
    assert "DROPKEY_SLOW=1 python -m pytest -q test_dropkey.py -k slow" in text


def test_docs_readme_commands_are_read_as_bash_reads_them():
    text = ('```bash\nX="--epochs 2 --seed 1"  # two words\nfor m in a b; do for s in 1 2; do\n'
            '  python train_cifar.py --mode $m \\\n    --block-size ${s} $X # note\ndone; done\n```\n'
            'Prose `python train_cifar.py --ignored`.\n```bash\npython train_cifar.py --out "$X"\n```\n')
    assert _readme_train_commands(text) == [["--mode", m, "--block-size", s, "--epochs", "2", "--seed", "1"]
                                            for m in "ab" for s in "12"] + [["--out", "--epochs 2 --seed 1"]]


def test_docs_every_readme_train_command_passes_dry_run(tmp_path, monkeypatch, capsys):
    """Each command of README.md and docs/*.md goes through the parser and `--dry-run`, in-process.

    `--out` and `--device cpu` are appended (argparse keeps the last value), so a command passes on a
    CPU-only machine and where its run folder exists. `--resume` and `--summarize` commands need their
    runs, so they only go through the parser.
    """
    commands = [argv for page in DOCS for argv in _readme_train_commands(page.read_text())]
    assert len(_readme_train_commands(README.read_text())) >= 10, "too few README commands found"
    monkeypatch.chdir(tmp_path)                                          # `data/` or `runs/` would land here
    failures = []
    for argv in commands:
        try:
            args = train_cifar.build_parser().parse_args(argv)
            if args.resume is None and not getattr(args, "summarize", None):
                train_cifar.main(argv + ["--dry-run", "--out", str(tmp_path / "run"), "--device", "cpu"])
                if not capsys.readouterr().out.startswith("dry run: configuration is valid"):
                    failures.append(f"{argv}\n  no 'dry run: configuration is valid'")
        except SystemExit as stop:
            if stop.code != 0 or not {"-h", "--help"} & set(argv):       # --help exits 0 by design
                failures.append(f"{argv}\n  {capsys.readouterr().err.strip() or stop}")
    assert not failures, "commands that train_cifar.py rejects:\n" + "\n".join(map(str, failures))
    assert os.listdir(tmp_path) == []                                    # a dry run reads and writes nothing


def test_docs_the_over_fitting_regime_is_one_set_of_flags():
    """docs/exercises.md (bash and Python) and docs/overfitting.md train with this section's OVERFIT."""
    for name in ("exercises.md", "overfitting.md"):
        text = (README.parent / "docs" / name).read_text()
        assert f'OVERFIT="{OVERFIT}"' in text, f"docs/{name}: OVERFIT differs from the tests'"
    python = re.search(r'OVERFIT = \(("[^)]*")\)', (README.parent / "docs" / "exercises.md").read_text(), re.S)
    assert "".join(re.findall(r'"([^"]*)"', python[1])) == OVERFIT


def test_docs_every_python_snippet_runs_alone_twice_and_prints_what_the_text_says(tmp_path, monkeypatch):
    """Every Python block of README.md and docs/*.md runs pasted alone into a fresh `python`, twice.

    Where the text shows "prints:" and a text block, the snippet's output must be exactly that block,
    so a new generator or kernel breaks this test, not the guide. A snippet that reads a run folder
    first fails alone with one line naming the command to run; then it runs on a stand-in. A training
    call gets a tiny model and one epoch appended (its flags override the snippet's).
    """
    snippets = [(page, i, code, printed) for page in DOCS for i, (code, printed) in enumerate(_snippets(page))]
    assert len(snippets) >= 12 and sum(printed is not None for *_, printed in snippets) >= 9
    main, sample, attention, flash = train_cifar.main, dropkey.sample_keep_mask, dropkey.attention, dropkey.FLASH
    shapes, patched, outputs = [], [], {}

    def recording_sample(shape, *args, **kwargs):
        shapes.append(tuple(shape))
        return sample(shape, *args, **kwargs)

    def tiny_main(argv):
        patched.append(dropkey.attention is not attention)               # a snippet's wrapper is in place
        out = argv[argv.index("--out") + 1] if "--out" in argv else str(tmp_path / "run")
        main(argv + _DOCS_TINY + ["--epochs", "1", "--warmup-epochs", "0.5", "--out", out])

    monkeypatch.setattr(dropkey, "sample_keep_mask", recording_sample)
    monkeypatch.setattr(train_cifar, "main", tiny_main)
    failures = []
    try:
        with _one_thread():
            for page, i, code, printed in snippets:
                name = f"{page.name} python block {i + 1}"
                folder = tmp_path / name.replace(" ", "-")
                (folder / "docs").mkdir(parents=True)                       # where a figure is saved
                monkeypatch.chdir(folder)
                logs = re.findall(r'"(runs/[^"{]+/log\.jsonl)"', code)   # a run folder it reads
                if logs:
                    with pytest.raises(SystemExit) as stop:                 # alone: one line naming the command
                        exec(compile(code, name, "exec"), {"__name__": "__main__"})
                    assert "\n" not in str(stop.value) and "python train_cifar.py" in str(stop.value), name
                for log in logs:                                            # then a stand-in for that run
                    rows = [dict(epoch=e, train_acc=e / 10, test_acc=0.5 - abs(e - 5) / 20) for e in range(1, 11)]
                    os.makedirs(os.path.dirname(log), exist_ok=True)
                    pathlib.Path(log).write_text("".join(json.dumps(r) + "\n" for r in rows))
                for run in range(2):
                    stdout = io.StringIO()
                    with contextlib.redirect_stdout(stdout):
                        exec(compile(code, name, "exec"), {"__name__": "__main__"})
                    assert dropkey.attention is attention and dropkey.FLASH is flash, f"{name} left a patch behind"
                    if printed is not None and stdout.getvalue() != printed:
                        failures.append(f"{name} (run {run + 1}) prints\n{stdout.getvalue()}instead of\n{printed}")
                    outputs[name] = stdout.getvalue()
                for png in re.findall(r'savefig\("([^"]+)"', code):        # a figure the docs show
                    assert pathlib.Path(png).read_bytes()[:4] == b"\x89PNG" and os.path.getsize(png) <= 100_000
                    assert os.path.getsize(README.parent / png) <= 100_000
    finally:
        torch.set_printoptions(profile="default")
        dropkey.FLASH = flash
    assert not failures, "\n\n".join(failures)
    out = "".join(outputs.values())
    assert all(f"\n{mode}: keep mask" in out for mode in dropkey.MODES)   # the step-through
    # Exercise 8, "about twice": the std of the mean over queries, column against per query
    per_query, column = (float(x) for x in re.findall(r"of the mean over queries (\S+)", out)[:2])
    assert 1.5 * per_query < column < 3 * per_query
    assert patched and all(patched)                                      # trained with the wrapper, then undone
    assert any(len(s) == 4 and s[2] == 1 for s in shapes)                # column masks (B, H, 1, N) were drawn


def test_docs_paper_map_points_at_the_quoted_code():
    """Each `name` [file.py:A](file.py#LA) of the README quotes text found on line A of that file.

    A range [file.py:A-B] must end where the function does: line B + 1 is blank and the next code
    line starts a new definition or section, so "the lines to read" are a whole function.
    """
    text = README.read_text()
    links = re.findall(r"`([^`]+)`\s+\[(\w+\.py):(\d+)(?:-(\d+))?\]\(\2#L\3(?:-L\4)?\)", text)
    assert len(links) >= 15 and len(links) == len(re.findall(r"\]\(\w+\.py#L", text)), "a link of another form"
    wrong = []
    for quoted, file, a, b in links:
        lines = (README.parent / file).read_text().splitlines()
        line = lines[int(a) - 1] if int(a) <= len(lines) else ""
        if quoted not in line:
            wrong.append(f"{file}:{a} does not hold `{quoted}`: {line.strip()!r}")
        if b:
            rest = [l for l in lines[int(b):] if l.strip()]
            if lines[int(b)].strip() or not re.match(r"(def |class |@|# -)", rest[0] if rest else "def"):
                wrong.append(f"{file}:{a}-{b} does not end where `{quoted}` ends")
    assert not wrong, "paper map out of date:\n" + "\n".join(wrong)


def _quoted_outputs(page):
    """(commands, printed) of each bash block that the page follows with "prints:" or "prints (...):"."""
    blocks, out = _fenced(page.read_text()), []
    for (lang, body, _), (after, printed, said) in zip(blocks, blocks[1:]):
        if lang == "bash" and after == "text" and re.fullmatch(r"prints( \(.*\))?:", said.strip()):
            out.append((body, printed))
    return out


def _compared(text):
    """The lines of an output that a rerun must reproduce: no blank lines, no timing rows of --summarize."""
    return [line for line in text.splitlines() if line.strip() and not any(t in line for t in _TIMINGS)]


def test_docs_quoted_run_outputs_are_those_of_the_run_folders():
    """What docs/ quotes from `--summarize` or a script over runs/ is what they print for the run folders.

    The runs take ~100 s each on one thread (their commands are on the pages); where a command fails
    because its run folders are missing, this test is skipped. Timing rows vary per run; not compared.
    """
    quoted = [(page, body, printed) for page in DOCS for body, printed in _quoted_outputs(page)]
    assert len(quoted) >= 4
    missing = []
    for page, body, printed in quoted:
        done = subprocess.run(["bash", "-c", f'python() {{ "{sys.executable}" "$@"; }}\n{body}'],
                              cwd=README.parent, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            missing.append(f"{page.name}: {body.strip()}\n  {done.stderr.strip().splitlines()[-1:]}")
        else:
            assert _compared(done.stdout) == _compared(printed), f"{page.name}: {body.strip()}"
    if missing:
        pytest.skip("run folders missing for:\n" + "\n".join(missing))


def _seed0(folder, name):
    return json.loads((pathlib.Path(folder) / f"{name}-s0" / "metrics.json").read_text())


def _check_exercises_at_seed_0(folder):
    """The inequalities docs/exercises.md states as the answers of Exercises 3, 5 and 6 at seed 0."""
    m = {name: _seed0(folder, name) for name in ("none", "vanilla", "dropkey", "constant", "increasing", "d06")}
    # Exercise 3: the more a schedule drops, and the earlier, the less noise the model memorises
    fit = {name: m[name]["train_acc_eval"] for name in ("constant", "dropkey", "increasing", "none")}
    assert fit["constant"] < fit["dropkey"] < fit["increasing"] < fit["none"], fit
    # Exercise 5: the first layer's class-token entropy falls with d, against Fig. 4
    first = [m[name]["cls_attention_entropy"][0] for name in ("none", "dropkey", "d06")]
    assert first[0] > first[1] > first[2], first
    # Exercise 6: with half the patches removed, both dropouts keep more accuracy than none
    half = {name: m[name]["occlusion"]["0.5"] for name in ("none", "vanilla", "dropkey")}
    assert half["dropkey"] > half["none"] and half["vanilla"] > half["none"], half


@pytest.mark.skipif(os.environ.get("DROPKEY_SLOW") != "1", reason="slow: trains 6 models of ~100 s; DROPKEY_SLOW=1")
def test_slow_exercises_3_5_6_answers_hold_at_seed_0(tmp_path):
    """Run the seed-0 commands of Exercises 3, 5 and 6 (docs/exercises.md) and check their stated answers."""
    configs = dict(none="--mode none", vanilla="--mode vanilla", dropkey="--mode dropkey",
                   constant="--mode dropkey --schedule constant", increasing="--mode dropkey --schedule increasing",
                   d06="--mode dropkey --drop-ratio 0.6")
    for name, flags in configs.items():
        subprocess.run([sys.executable, str(README.parent / "train_cifar.py"), *flags.split(), "--seed", "0",
                        "--out", str(tmp_path / f"{name}-s0"), *OVERFIT.split()], cwd=tmp_path, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=1800)
    _check_exercises_at_seed_0(tmp_path)


# ============================================================================ notebook: theory.ipynb

def test_theory_notebook_runs_with_every_assert_passing():
    """Run theory.ipynb top to bottom; a failing assert in any cell fails this test.

    The notebook checks Sec. 3.1 (Eq. 1-14) numerically. It takes ~20-30 s on 2 CPU
    cores, kernel start-up included; 120 s per cell is a generous limit for slow CI.
    """
    from pathlib import Path

    import nbclient
    import nbformat

    here = Path(__file__).resolve().parent
    notebook = nbformat.read(here / "theory.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(here)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback


# ============================================================================ over-fitting study: --summarize

def _fake_run(folder, mode, seed, finished=True, **metrics):
    """A run folder with only what --summarize reads: metrics.json with a config, `finished` and metrics."""
    folder.mkdir(parents=True)
    config = dict(mode=mode, epochs=3, seed=seed, out=str(folder))
    (folder / "metrics.json").write_text(json.dumps(dict(metrics, finished=finished, config=config)))
    return str(folder)


def test_summarize_prints_mean_sd_and_seed_paired_differences_exactly(tmp_path, capsys):
    """Numbers worked by hand. dropkey - none per seed: test_acc 0.1, 0.0, 0.2 (mean 0.1, sd 0.1,
    t_975(2) = 4.303, half-width 4.303 * 0.1 / sqrt(3) = 0.2484; the zero counts against: 2 of 3);
    occlusion 0.1, 0.2, 0.3; gap -0.2, -0.1, -0.3.
    """
    folders = [_fake_run(tmp_path / f"none-{s}", "none", s, test_acc=a, train_acc=0.9, occlusion={"0.5": 0.3})
               for s, a in enumerate((0.5, 0.6, 0.7))]
    folders += [
        _fake_run(tmp_path / f"dropkey-{s}", "dropkey", s, test_acc=a, train_acc=0.8, occlusion={"0.5": o})
        for s, a, o in ((0, 0.6, 0.4), (1, 0.6, 0.5), (2, 0.9, 0.6))
    ]
    folders += [_fake_run(tmp_path / "vanilla-5", "vanilla", 5, test_acc=0.5, train_acc=0.5),
                _fake_run(tmp_path / "none-9", "none", 9, finished=False, test_acc=0.0)]
    train_cifar.main(["--summarize", *folders, "--baseline", "mode=none"])
    assert capsys.readouterr().out == f"""\
7 runs in 3 configurations; common to all: epochs=3.
Left out, not finished: {tmp_path / "none-9"}.

| metric | mode=none (n=3) | mode=dropkey (n=3) | mode=vanilla (n=1) |
|---|---|---|---|
| test_acc | 0.6000 ± 0.1000 | 0.7000 ± 0.1732 | 0.5000 |
| train_acc | 0.9000 ± 0.0000 | 0.8000 ± 0.0000 | 0.5000 |
| occlusion[0.5] | 0.3000 ± 0.0000 | 0.5000 ± 0.1000 | — |
| train_acc - test_acc | 0.3000 ± 0.1000 | 0.1000 ± 0.1732 | 0.0000 |

Each configuration minus mode=none, paired by seed: mean difference [95% paired-t interval], seeds whose \
difference has the sign of the mean (a zero counts against).

| metric | mode=dropkey | mode=vanilla |
|---|---|---|
| test_acc | +0.1000 [-0.1484, 0.3484], 2 of 3 | no shared seed |
| train_acc | -0.1000 [-0.1000, -0.1000], 3 of 3 | no shared seed |
| occlusion[0.5] | +0.2000 [-0.0484, 0.4484], 3 of 3 | no shared seed |
| train_acc - test_acc | -0.2000 [-0.4484, 0.0484], 3 of 3 | no shared seed |
"""


def test_summarize_t_quantiles_match_the_table_and_join_the_normal_quantile():
    assert (train_cifar.t_975(1), train_cifar.t_975(4), train_cifar.t_975(30)) == (12.706, 2.776, 2.042)
    assert abs(train_cifar.t_975(31) - 2.0395) < 2e-4 and abs(train_cifar.t_975(120) - 1.9799) < 2e-4
    assert abs(train_cifar.t_975(10 ** 6) - 1.95997) < 1e-4               # -> z_0.975
    ts = [train_cifar.t_975(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(ts, ts[1:]))  # falls steadily, also across df 30 -> 31


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "mode=none"], "--baseline needs --summarize"),
    (["--summarize", "x", "--baseline", "none"], "expected KEY=VALUE"),
    (["--summarize", "missing"], "missing holds no readable metrics.json"),
    (["--summarize", "{a}", "{b}", "--baseline", "mode=vanilla"], "matches 0 configurations, not 1"),
    (["--summarize", "{a}", "{a2}"], "repeats seed 0 of a configuration"),
])
def test_summarize_bad_input_is_one_error_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    runs = dict(
        a=_fake_run(tmp_path / "a", "none", 0, test_acc=0.5),
        b=_fake_run(tmp_path / "b", "dropkey", 0),
        a2=_fake_run(tmp_path / "a2", "none", 0, test_acc=0.6),
    )
    with pytest.raises(SystemExit) as stop:
        train_cifar.main([word.format(**runs) for word in argv])
    # parser error or sys.exit(text)
    err = capsys.readouterr().err if stop.value.code == 2 else stop.value.code
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_label_noise_moves_exactly_that_fraction_of_training_labels_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy = train_cifar.noisy_labels(labels, 0.4, 10, seed=3)
    changed = noisy != labels
    assert changed.sum() == 400 and noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(noisy, train_cifar.noisy_labels(labels, 0.4, 10, seed=3))   # the seed fixes them
    assert not torch.equal(noisy, train_cifar.noisy_labels(labels, 0.4, 10, seed=4))
    shift = (noisy - labels)[changed] % 10  # uniform on 1..9: 400/9 = 44.4 each,
    counts = torch.bincount(shift, minlength=10)                          # binomial sd 6.4; 4 sd = 26
    assert counts[0] == 0 and ((counts[1:] - 400 / 9).abs() < 26).all()


def test_label_noise_run_keeps_clean_test_labels_and_reports_train_acc_eval(tmp_path, capsys):
    """A tiny run end to end: the noisy training labels are the ones trained on, the test split is untouched,
    metrics.json gains train_acc_eval, and --summarize reads the run."""
    cfg = argparse.Namespace(dataset="synthetic", limit_train=256, limit_test=128, label_noise=0.25, seed=0)
    data, clean = train_cifar.load_data(cfg, torch.device("cpu")), train_cifar.load_data(
        argparse.Namespace(**{**vars(cfg), "label_noise": 0.0}), torch.device("cpu"))
    assert (data["train"][1] != clean["train"][1]).sum() == 64 and torch.equal(
        data["test"][1], clean["test"][1]
    )
    with _one_thread():
        train_cifar.main(TINY + ["--epochs", "1", "--label-noise", "0.25", "--out", str(tmp_path / "run")])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["train_acc_eval"] <= 1 and metrics["config"]["label_noise"] == 0.25
    capsys.readouterr()
    train_cifar.main(["--summarize", str(tmp_path / "run")])
    assert "| train_acc_eval - test_acc | " in capsys.readouterr().out


# ============================================================================ trainer: the run folder
# Crash consistency, divergence, checksum, one writer, one-line faults, download, resume (train_cifar.py).
# Crashes and faults are injected by wrapping the file-commit calls (os.replace, os.fsync) or with mocks.

SMALL = [
    "--dataset",
    "synthetic",
    "--limit-train",
    "64",
    "--limit-test",
    "32",
    "--batch-size",
    "32",
    "--dim",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--patch-size",
    "8",
    "--warmup-epochs",
    "0",
    "--progress",
    "off",
    "--epochs",
    "2",
    "--finetune-epochs",
    "1",
]  # 2 steps per epoch, 3 epochs, 9 commits


class _Killed(BaseException):
    """Stands for kill -9: no handler of the trainer catches it, so no cleanup code of its runs."""


def _strict_json(text):
    def refuse(token):
        raise ValueError(f"{token} is not strict JSON")
    return json.loads(text, parse_constant=refuse)


def _folder(out):
    """The run folder as a reader sees it: checkpoint epoch, log rows, metrics (strict JSON), file names."""
    checkpoint = (
        torch.load(out / "checkpoint.pt", weights_only=True) if (out / "checkpoint.pt").exists() else None
    )
    log = [_strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()] \
        if (out / "log.jsonl").exists() else []
    metrics = _strict_json((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
    return checkpoint, log, metrics, sorted(os.listdir(out))


def _fail_at(monkeypatch, name, k, error):
    """Make the k-th call of os.<name> (counted from now) raise `error` instead of running."""
    real, calls = getattr(os, name), []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) == k:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(os, name, wrapped)
    return calls


def _run(argv):
    """main(argv) in-process with one thread; the SystemExit message (None on success)."""
    with _one_thread():
        try:
            train_cifar.main(argv)
        except SystemExit as stop:
            return stop.code
    return None


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    assert _run(SMALL + ["--out", str(out)]) is None
    return out


def _assert_same_final_folder(out, reference):
    assert _without_timing(out) == _without_timing(reference)
    resumed, whole = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (out, reference))
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for index, state in whole["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][index][k], v) for k, v in state.items())
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pt", "log.jsonl", "metrics.json"]   # no .tmp


@pytest.mark.parametrize("fault", ["kill", "ctrl-c"])
# each of the 9 commits (3 epochs x 3 files), killed just before it
@pytest.mark.parametrize("k", range(1, 10))
def test_run_folder_killed_at_any_commit_is_consistent_and_resumes_to_the_uninterrupted_folder(
        small_run, tmp_path, monkeypatch, k, fault):
    out = tmp_path / "run"
    calls = _fail_at(monkeypatch, "replace", k, _Killed() if fault == "kill" else KeyboardInterrupt())
    with pytest.raises(_Killed) if fault == "kill" else contextlib.nullcontext():
        message = _run(SMALL + ["--out", str(out)])
    monkeypatch.undo()
    assert len(calls) == k
    checkpoint, log, metrics, _ = _folder(out)
    epoch = checkpoint["epoch"] if checkpoint else 0
    assert epoch == (k + 1) // 3                                         # the checkpoint is the commit
    assert epoch - 1 <= len(log) <= epoch                                # log and metrics: never ahead of it,
    assert (metrics["epochs_done"] if metrics else 0) in (len(log), len(log) - 1)   # at most one epoch behind
    assert not (metrics and metrics["finished"]) or epoch == 3  # finished: true only when all is final
    if fault == "ctrl-c":                                                # the hint only where it can work
        assert message == "interrupted" + (
            f"; continue with: python train_cifar.py --resume {out}" if epoch else ""
        )
    if epoch == 0:                                                       # nothing committed: start again
        assert _run(SMALL + ["--out", str(out)]) is None
    else:
        assert _run(["--resume", str(out)]) is None
    _assert_same_final_folder(out, small_run)
    assert _run(["--resume", str(out)]) is None                          # a finished run: nothing to do


def test_run_folder_resume_repairs_the_results_of_a_finished_checkpoint(small_run, tmp_path, capsys):
    out = tmp_path / "run"
    _run(SMALL + ["--out", str(out)])
    (out / "metrics.json").write_text(
        (small_run / "metrics.json").read_text().replace('"finished": true', '"finished": false')
    )
    (out / "log.jsonl").write_text("".join((small_run / "log.jsonl").read_text().splitlines(True)[:2]))
    (out / "metrics.json.tmp").write_text("{")
    (out / "checkpoint.pt.tmp").write_bytes(b"PK")                         # stray: no epoch writes it again
    assert _run(["--resume", str(out)]) is None
    assert "has finished all 3 epochs; log.jsonl and metrics.json are complete" in capsys.readouterr().out
    _assert_same_final_folder(out, small_run)


@pytest.mark.parametrize("target", ["loss", "weight"])
def test_run_folder_divergence_stops_with_one_line_and_keeps_the_last_finite_checkpoint(
    tmp_path, monkeypatch, target
):
    """An lr of inf at run step 2 (epoch 2's first) makes every weight non-finite: for `loss` epoch 2's second
    step sees a nan loss; for `weight` it is the epoch's last update, and the weight check finds it."""
    out, real = tmp_path / "run", train_cifar.get_lr
    bad_step = 2 if target == "loss" else 3
    monkeypatch.setattr(
        train_cifar, "get_lr", lambda step, *a: math.inf if step == bad_step else real(step, *a)
    )
    message = _run(SMALL + ["--out", str(out)])
    what = "the loss is nan" if target == "loss" else "its update made a weight non-finite"
    assert message == (
        f"error: training diverged in epoch 2, step 2 of 2: {what}; {out} keeps the checkpoint "
        f"of epoch 1, the last finite one; try a smaller --lr (this run: 0.001)"
    )
    checkpoint, log, metrics, names = _folder(out)  # strict JSON parsers accept every file
    assert (
        checkpoint["epoch"] == 1 and len(log) == 1 and metrics["epochs_done"] == 1 and not metrics["finished"]
    )
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert names == [".lock", "checkpoint.pt", "log.jsonl", "metrics.json"]


def test_run_folder_diverging_cli_run_exits_non_zero_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "train_cifar.py", *SMALL[:-4], "--dim", "32", "--depth", "2",
                          "--limit-train", "256", "--batch-size", "64", "--epochs", "1", "--lr", "1000",
                          "--out", str(tmp_path / "run")], cwd=HERE, env=ONE_THREAD, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert re.match(r"error: training diverged in epoch 1, step \d of 4: .*no checkpoint was written; "
                    r"try a smaller --lr \(this run: 1000\)", run.stderr)
    assert os.listdir(tmp_path / "run") == [".lock"]


def test_run_folder_json_files_are_strict_with_non_finite_values(tmp_path, monkeypatch):
    real = train_cifar.evaluate
    monkeypatch.setattr(train_cifar, "evaluate", lambda *a, **k: (math.inf, real(*a, **k)[1]))
    assert _run(SMALL + ["--out", str(tmp_path / "run")]) is None
    _, log, metrics, _ = _folder(tmp_path / "run")                     # parse_constant refuses NaN, Infinity
    assert metrics["test_loss"] is None and [r["test_loss"] for r in log] == [None] * 3


def _rewrite(path, change):
    """Load a checkpoint, change it, save it again without updating its checksum."""
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("damage", ["one weight", "64 flipped bytes", "no config", "a foreign file"])
def test_run_folder_damaged_checkpoint_is_refused_with_one_line(small_run, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    path = out / "checkpoint.pt"
    if damage == "one weight":
        _rewrite(path, lambda c: c["model"]["head.bias"].__setitem__(0, 0.5))
        expected = f"error: {path} does not match its checksum"
    elif damage == "64 flipped bytes":  # in the tensor data, the bulk of the file
        raw = bytearray(path.read_bytes())
        for i in np.random.default_rng(0).choice(
            np.arange(len(raw) // 4, 3 * len(raw) // 4), 64, replace=False
        ):
            raw[i] ^= 0xFF
        path.write_bytes(bytes(raw))
        expected = f"error: {path} does not match its checksum"
    elif damage == "no config":
        _rewrite(path, lambda c: c.pop("config"))
        expected = f"error: {path} is not a checkpoint of this train_cifar.py \\(no config\\)"
    else:
        torch.save({"weights": torch.zeros(3)}, path)
        expected = f"error: {path} is not a checkpoint of this train_cifar.py \\(no model, optimizer"
    message = _run(["--resume", str(out)])
    assert re.match(expected, message) and "\n" not in message
    assert _folder(out)[1] == _folder(small_run)[1]                      # nothing was rewritten


def test_run_folder_has_one_writer_and_a_stale_lock_does_not_block(small_run, tmp_path, monkeypatch):
    import fcntl
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    before = (out / "checkpoint.pt").read_bytes()
    with open(out / ".lock", "a") as other:  # another process's lock, as flock sees it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = (f"error: {out} is in use by another train_cifar.py process; "
                   f"wait for it to end, or choose another --out")
        assert _run(["--resume", str(out)]) == message                   # resume of a live run
        assert _run(SMALL + ["--out", str(out)]) == message              # a second writer
        assert (out / "checkpoint.pt").read_bytes() == before
    assert _run(["--resume", str(out)]) is None  # released: the file alone blocks nothing


def test_run_folder_full_disk_is_one_line_removes_its_partial_file_and_resume_finishes(
    small_run, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    # epoch 2's checkpoint
    _fail_at(monkeypatch, "fsync", 4, OSError(errno.ENOSPC, "No space left on device"))
    message = _run(SMALL + ["--out", str(out)])
    assert message == (
        f"error: could not write {out / 'checkpoint.pt'} (No space left on device); the run folder "
        f"keeps its last complete epoch: free some space or make it writable, then continue with --resume"
    )
    checkpoint, log, metrics, names = _folder(out)
    assert checkpoint["epoch"] == 1 and len(log) == 1 and metrics["epochs_done"] == 1
    assert names == [".lock", "checkpoint.pt", "log.jsonl", "metrics.json"]     # no .tmp filling the disk
    monkeypatch.undo()
    assert _run(["--resume", str(out)]) is None
    _assert_same_final_folder(out, small_run)


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("case", ["--out is a file", "--out is read-only", "--data-dir is a file"])
def test_run_folder_unwritable_paths_are_one_line_before_any_data_is_read(
    tmp_path, monkeypatch, capsys, case, dry_run
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    (tmp_path / "readonly").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: "readonly" not in str(p) and real_access(p, mode, **k)
    )
    monkeypatch.setattr(
        train_cifar, "load_data", lambda *a: pytest.fail("read data before checking the paths")
    )
    flag, path, problem = {
        "--out is a file": ("--out", "file/run", "file is a file, not a folder"),
        "--out is read-only": ("--out", "readonly/run", "cannot write in readonly"),
        "--data-dir is a file": ("--data-dir", "file", "file is a file, not a folder"),
    }[case]
    argv = ["--dataset", "cifar10", flag, path] + (["--out", "run"] if flag == "--data-dir" else [])
    with pytest.raises(SystemExit) as stop:
        train_cifar.main(argv + (["--dry-run"] if dry_run else []))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"train_cifar.py: error: {flag} {path}: {problem}")
    assert sorted(os.listdir(tmp_path)) == ["file", "readonly"] and os.listdir(tmp_path / "readonly") == []


def test_run_folder_batch_files_without_images_are_one_line(tmp_path):
    _write_cifar(tmp_path, "cifar10", n=0)
    with pytest.raises(train_cifar.DataError, match="data_batch_1 is not a valid .*N > 0.*; delete .* and run again"):
        train_cifar.load_data(_cfg("cifar10", tmp_path), torch.device("cpu"))


def test_run_folder_resume_refuses_an_explicit_flag_equal_to_its_default(small_run, capsys):
    assert _run(["--resume", str(small_run), "--epochs", "100"]) == 2  # 100 is the default, 2 the saved value
    assert "drop --epochs (saved: 2)" in capsys.readouterr().err
    # as saved: accepted
    assert _run(["--resume", str(small_run), "--epochs", "2", "--progress", "off"]) is None


def test_run_folder_resume_refuses_another_out_folder(small_run, tmp_path, capsys):
    before = sorted(p.name for p in small_run.iterdir())
    assert _run(["--resume", str(small_run), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "drop --out" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in small_run.iterdir()) == before
    assert _run(["--resume", str(small_run), "--out", str(small_run), "--progress", "off"]) is None  # its own


def test_run_folder_checkpoint_saves_the_resolved_device(small_run):
    checkpoint = torch.load(small_run / "checkpoint.pt", weights_only=True)
    auto = train_cifar.resolve_device("auto")
    assert checkpoint["config"]["device"] == auto and "device" not in SMALL    # --device auto, resolved


def test_run_folder_resume_on_another_device_restores_what_it_can_and_says_so(small_run, tmp_path, capsys):
    """A checkpoint written on CUDA (its config and RNG state made so here) continues on the CPU."""
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.pop("sha256")
    checkpoint.update(epoch=2, step=4, history=checkpoint["history"][:2])
    checkpoint["config"]["device"] = "cuda"
    checkpoint["rng"]["data"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed, offset
    checkpoint["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(dict(checkpoint, sha256=train_cifar.checksum(checkpoint)), path)
    if not torch.cuda.is_available():
        assert _run(["--resume", str(out)]) == 2                         # saved on cuda: not here
        assert "--device cuda, but this torch cannot use it" in capsys.readouterr().err
    assert _run(["--resume", str(out), "--device", "cpu"]) is None
    printed = capsys.readouterr().out
    assert (
        "resuming a cuda run on cpu: weights, optimizer, step, history and the CPU random state are restored"
        in printed
    )
    resumed = torch.load(path, weights_only=True)
    assert resumed["epoch"] == 3 and resumed["config"]["device"] == "cpu"
    assert _folder(out)[1][:2] == _folder(small_run)[1][:2]             # the restored history


def test_run_folder_dry_run_catches_float64_on_mps(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        train_cifar.main(["--dry-run", "--device", "mps", "--align", "exact"])
    assert "--align exact computes in float64, which MPS does not support" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves `blob`; honours "Range: bytes=N-" if `ranges`; sends `chunk` bytes every `pause` seconds."""
    blob, ranges, chunk, pause, seen = bytes(range(256)) * 400, True, 1 << 14, 0.0, []

    def do_GET(self):
        type(self).seen.append(self.headers.get("Range"))
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match[1]) if match and self.ranges else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.blob) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.blob) - 1}/{len(self.blob)}")
        self.end_headers()
        with contextlib.suppress(ConnectionError):
            for i in range(start, len(self.blob), self.chunk):
                self.wfile.write(self.blob[i:i + self.chunk])
                self.wfile.flush()
                time.sleep(self.pause)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(**settings):
    handler = type("Handler", (_Server,), dict(settings, seen=[]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("ranges", [True, False])
def test_run_folder_download_continues_a_part_file_where_the_server_allows(tmp_path, capsys, ranges):
    path = tmp_path / "cifar-10-python.tar.gz"
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(_Server.blob[:40000])
    with _serving(ranges=ranges) as (url, handler):
        train_cifar.download(url, str(path))
    assert path.read_bytes() == _Server.blob and os.listdir(tmp_path) == [path.name]
    assert handler.seen == ["bytes=40000-"]                              # asked; a 200 answer starts over
    err = capsys.readouterr().err
    assert "continuing after 40000 bytes" in err and "100%" in err and "B/s" in err  # the bar: bytes and rate


def test_run_folder_download_has_an_overall_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(train_cifar, "DOWNLOAD_DEADLINE_S", 0.5)
    path = tmp_path / "cifar-10-python.tar.gz"
    start = time.monotonic()
    with _serving(chunk=100, pause=0.05) as (url, _):                  # 2 kB/s: 51 s for the whole blob
        with pytest.raises(
            train_cifar.DataError, match=r"could not download .*not complete after 0.5 s\); run again"
        ):
            train_cifar.download(url, str(path))
    assert time.monotonic() - start < 5
    # kept to continue
    assert 0 < (tmp_path / "cifar-10-python.tar.gz.part").stat().st_size < len(_Server.blob)


def test_run_folder_other_file_system_faults_are_one_line_before_any_data_is_read(tmp_path, monkeypatch):
    out = tmp_path / "run"                                               # e.g. a mount that turned read-only

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(os, "makedirs", read_only)
    monkeypatch.setattr(
        train_cifar, "load_data", lambda *a: pytest.fail("read data before creating the folder")
    )
    assert _run(SMALL + ["--out", str(out)]) == (f"error: [Errno 30] Read-only file system: '{out}'; "
                                                 f"check that path, its permissions and the free space")


# ======================================================================= per-key rates, c_j, alignment edges
# key_drop_rates against a count of covering seeds written here and against the
# sampler; smoothing_coefficients against exact sums over binomial counts;
# expected_weights: re-normalisation, bad input, underflowed weights, majorisation.

def _covering_seeds(mode, n, s):
    """m[i, j]: how many valid seed positions drop key (i, j) of an n x n grid, by visiting every seed."""
    m = torch.zeros(n, n, dtype=torch.float64)
    for a, b in itertools.product(range(n - s + 1), repeat=2):
        hit = torch.zeros(n, n, dtype=torch.bool)
        if mode == "dropkey_block":
            hit[a:a + s, b:b + s] = True                              # the s x s window of seed (a, b)
        else:
            hit[a:a + s, :] = True                                    # s full rows ...
            hit[:, b:b + s] = True                                    # ... and s full columns
        m += hit
    return m


@pytest.mark.parametrize("mode,s", [("dropkey_block", 3), ("dropkey_block", 5), ("dropkey_cross", 1),
                                    ("dropkey_cross", 3), ("dropkey", 3)])
def test_key_drop_rates_match_covering_seeds_and_the_sampler(mode, s):
    """Per key, the sampled rate over n = 16 * 4 * 65 independent rows lies within 5 sigma + 2e-4.

    sigma = sqrt(r (1 - r) / n); 2e-4 bounds the sampler's rounding of gamma to 1/65536 (times <= 25 seeds).
    """
    d, n = 0.3, 16 * 4 * 65
    rates = dropkey.key_drop_rates(mode, d, (8, 8), s)                # (8, 8)
    if mode == "dropkey":
        assert torch.equal(rates, torch.full((8, 8), d, dtype=torch.float64))
    else:
        gamma = dropkey.seed_rate(mode, d, (8, 8), s)
        torch.testing.assert_close(rates, 1 - (1 - gamma) ** _covering_seeds(mode, 8, s), atol=1e-12, rtol=0)
        assert rates.mean() < d                                       # overlaps: the mean is below d
    keep = dropkey.sample_keep_mask((16, 4, 65, 65), mode, d, grid=(8, 8), block_size=s,
                                    generator=torch.Generator().manual_seed(160))
    sampled = (~keep[..., 1:]).double().mean((0, 1, 2)).view(8, 8)  # (8, 8)
    sigma = (rates * (1 - rates) / n).sqrt()
    assert ((sampled - rates).abs() <= 5 * sigma + 2e-4).all(), ((sampled - rates).abs() / sigma).max()


def test_key_drop_rates_of_block_3_range_from_corner_to_centre():
    rates = dropkey.key_drop_rates("dropkey_block", 0.3, (8, 8), 3)
    assert round(rates[0, 0].item(), 3) == 0.059 and round(rates[3, 3].item(), 3) == 0.423
    assert round(rates.mean().item(), 3) == 0.256
    assert torch.equal(dropkey.key_drop_rates("none", 0.3, (8, 8), 3), torch.zeros(8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size"):
        dropkey.key_drop_rates("dropkey_block", 0.3, (8, 8), 9)


def _c_by_binomial_sums(groups, d, j):
    """c_j of a row of equal-weight groups [(p, count), ...], key j in group j, exactly.

    c_j = E[k_j / (k_j p_j + sum_i k_i p_i)] + d^M: the other keys enter only through how
    many of each group are kept (binomial), so a sum of positive terms (math.fsum) gives it
    to float64 rounding for any p_j, also where Monte-Carlo could never see the masks that matter.
    """
    others = [(p, c - (i == j)) for i, (p, c) in enumerate(groups)]
    terms = []
    for kept in itertools.product(*[range(c + 1) for _, c in others]):
        prob = math.prod(math.comb(c, k) * (1 - d) ** k * d ** (c - k) for (_, c), k in zip(others, kept))
        terms.append(prob * (1 - d) / (groups[j][0] + sum(p * k for (p, _), k in zip(others, kept))))
    return math.fsum(terms) + d ** sum(c for p, c in groups if p > 0)


@pytest.mark.parametrize("d", [0.1, 0.3, 0.9])
@pytest.mark.parametrize("tiny", [1e-3, 1e-12, 1e-30, 1e-100])
def test_smoothing_coefficients_are_accurate_down_to_tiny_p(tiny, d):
    """Relative error <= 1e-5 (the documented bound; ~1e-7 measured) for a row (0.5, 64 x a, tiny)."""
    a = (0.5 - tiny) / 64
    groups = [(0.5, 1), (a, 64), (tiny, 1)]
    row = torch.tensor([0.5] + [a] * 64 + [tiny], dtype=torch.float64)
    c = dropkey.smoothing_coefficients(row, d)
    for j, index in [(0, 0), (1, 1), (2, 65)]:
        exact = _c_by_binomial_sums(groups, d, j)
        assert abs(c[index].item() / exact - 1) <= 1e-5, (j, c[index].item(), exact)
    assert c[0] < c[1] < c[65]                                        # Eq. 4


def test_smoothing_coefficients_edges_and_dtype():
    p = torch.tensor([[0.7, 0.3, 0.0]], dtype=torch.float32)
    c = dropkey.smoothing_coefficients(p, 0.5)
    assert c.dtype == torch.float32 and c[0, 2] == math.inf          # p_j = 0: the limit p_j -> 0
    exact = _enumerated_expectation(p[:, :2].double(), 0.5) / p[:, :2].double()
    torch.testing.assert_close(c[:, :2].double(), exact, atol=0, rtol=1e-6)
    assert torch.equal(dropkey.smoothing_coefficients(p, 0.0), torch.ones_like(p))
    with pytest.raises(ValueError, match="floating-point"):
        dropkey.smoothing_coefficients(torch.tensor([1, 2]), 0.3)


def test_expected_weights_renormalises_every_term_and_refuses_non_float_input():
    p = _softmax_rows(4, 9, 2.0, seed=161, dtype=torch.float64)
    doubled = dropkey.expected_weights(2 * p, 0.5)                    # rows summing to 2
    torch.testing.assert_close(doubled, dropkey.expected_weights(p, 0.5), atol=1e-12, rtol=0)
    torch.testing.assert_close(doubled.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(doubled, _enumerated_expectation(p, 0.5), atol=1e-6, rtol=0)
    for bad, message in [
        (torch.tensor([[3, 1]]), "floating-point"),
        (torch.tensor([[0.5, -0.1]]), "non-negative"),
        (torch.zeros(1, 3), "positive sum"),
    ]:
        with pytest.raises(ValueError, match=message):
            dropkey.expected_weights(bad, 0.3)
    with pytest.raises(ValueError, match="either"):
        dropkey.expected_weights(p, 0.3, logits=p.log())


@pytest.mark.parametrize("dtype,gap", [(torch.float16, 20.0), (torch.float32, 110.0)])
def test_expected_weights_given_logits_follow_dropkey_where_weights_underflow(dtype, gap):
    """Logits (0, -gap, ..., -gap), N = 65: the small weights underflow to 0 in dtype.

    DropKey's masked softmax (Eq. 14) gives key 0 weight 1 when it is kept and 0
    when it is dropped, so E[w_0] = 1 - d = 0.700; weights that underflowed
    follow DropAttention's rule instead (1.000). Monte-Carlo over n = 20000
    masks within 4 sigma, sigma = sqrt(0.21 / n).
    """
    d, n = 0.3, 20_000
    logits = torch.full((1, 65), -gap, dtype=dtype)
    logits[0, 0] = 0.0
    weights = logits.softmax(-1)
    assert weights[0, 1] == 0                                         # underflowed
    assert abs(dropkey.expected_weights(weights, d)[0, 0].item() - 1.0) < 1e-5  # the rule of Eq. 1
    exact = dropkey.expected_weights(logits=logits, drop_ratio=d)
    assert exact.dtype == dtype and abs(exact[0, 0].item() - 0.7) < 2e-3
    torch.testing.assert_close(exact.float().sum(), torch.tensor(1.0), atol=2e-3, rtol=0)
    keep = dropkey.fall_back(dropkey.sample_keep_mask((n, 1, 1, 65), "dropkey", d,
                                                      generator=torch.Generator().manual_seed(162)))
    sampled = torch.where(keep, logits, float("-inf")).softmax(-1)     # Eq. 12-14 in dtype, (n, 1, 1, 65)
    assert abs(sampled[..., 0].float().mean().item() - 0.7) < 4 * math.sqrt(0.21 / n)


def test_expected_weights_is_majorised_by_p():
    """E[w] is smoother than p in the sense of majorisation: sorted, every partial sum of E[w]
    is <= that of p (up to the quadrature's 1e-6), with the same total; strictly below for k = 1."""
    for N, scale, d in itertools.product([12, 65], [0.5, 3.0, 10.0], [0.1, 0.5, 0.9]):
        p = _softmax_rows(20, N, scale, seed=163 + N, dtype=torch.float64)
        e = dropkey.expected_weights(p, d)
        top_p = p.sort(-1, descending=True).values.cumsum(-1)
        top_e = e.sort(-1, descending=True).values.cumsum(-1)
        assert (top_e <= top_p + 1e-6).all(), (N, scale, d, (top_e - top_p).max())
        assert (top_e[:, 0] < top_p[:, 0]).all()


# ============================================================================ long rows (long_rows.py)
# The optional file that takes DropKey when Nq * Nk >= dropkey.LONG_ROWS: a counter mask (SplitMix64 of
# seed, row and key) made again tile by tile, SDPA's CPU flash kernel per tile, FlexAttention on CUDA.
# Its contract: under one keep mask the numbers of the explicit path (dropkey.FLASH = False); without
# one, the numbers of the explicit path under counter_keep_mask of the call's seed. Tests set
# LONG_ROWS small to take the path at N = 37, and TILE_ELEMENTS small so that a call runs several tiles.

try:
    import long_rows
except ImportError:                                                    # dropkey.py works without it
    long_rows = None
needs_long_rows = pytest.mark.skipif(long_rows is None, reason="long_rows.py is not present")
MASK64 = 2**64 - 1


def _splitmix64(state, n):
    """Output n of SplitMix64 started at `state`, written again with Python integers modulo 2^64."""
    z = (state + n * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@contextlib.contextmanager
def _long(monkeypatch, tile=6 * 5 * 37):
    """The long-row path at any length (LONG_ROWS = 1), in tiles of `tile` mask elements, with FLASH on."""
    monkeypatch.setattr(dropkey, "LONG_ROWS", 1)
    monkeypatch.setattr(long_rows, "TILE_ELEMENTS", tile)               # 5 query rows x 6 heads x 37 keys
    with _flash(True):
        yield


def _spy(monkeypatch):
    """Record what long_rows.attention returned on each call: a tensor (it ran) or None (it declined)."""
    calls, attention = [], long_rows.attention
    monkeypatch.setattr(long_rows, "attention", lambda *a, **kw: calls.append(attention(*a, **kw)) or calls[-1])
    return calls


LONG_MASKS = {"none": {}, "causal": dict(is_causal=True), "padding": dict(attn_mask=_padding([37, 3], 37)),
              "padding and causal": dict(attn_mask=_padding([37, 9], 37), is_causal=True),
              "bias": dict(attn_mask=torch.randn(2, 3, 37, 37, generator=_gen(90)).masked_fill(
                  torch.arange(37) < 4, -math.inf))}
GRID_37 = dict(grid=(6, 6), prefix_tokens=1, block_size=2)


@needs_long_rows
def test_long_rows_mix64_is_splitmix64_in_place_and_not():
    assert _splitmix64(1234567, 1) == 6457827717110365317              # SplitMix64's published first outputs
    assert _splitmix64(1234567, 2) == 3203168211198807973
    states = [int(s) for s in np.random.default_rng(0).integers(0, 2**63, 40)] + [0, 2**63 - 1]
    x = torch.tensor([(s + 0x9E3779B97F4A7C15 + 2**63) % 2**64 - 2**63 for s in states])
    expected = [_splitmix64(s, 1) for s in states]
    for got in [long_rows.mix64(x.clone()), long_rows.mix64(x.clone(), torch.empty_like(x))]:
        assert [v & MASK64 for v in got.tolist()] == expected


@needs_long_rows
def test_long_rows_counter_mask_is_the_documented_function_of_seed_row_and_key():
    """Seed key, row keys, words, 16-bit pieces + 32768 below round(d 2^16): the layout in long_rows.py."""
    seed, shape, d = 987654321, (2, 3, 5, 9), 0.3
    keep = long_rows.counter_keep_mask(seed, shape, "dropkey", d)
    key = _splitmix64(seed, 1)                                         # stream 1
    for r in range(2 * 3 * 5):
        row = _splitmix64(key, r + 1)
        for c in range(9):
            piece = (_splitmix64(row, c // 4 + 1) >> (16 * (c % 4))) & 0xFFFF
            u = piece - 65536 * (piece >= 32768) + 32768               # as int16, offset to 0 .. 65535
            assert keep.view(-1, 9)[r, c].item() == (u >= round(d * 65536))
    keys = long_rows.row_keys(seed, 3, torch.arange(4))
    assert long_rows.counter_drops(keys, 9, 65536).all() and not long_rows.counter_drops(keys, 9, 0).any()


@needs_long_rows
def test_long_rows_counter_mask_rate_per_position_and_independence():
    """4 sigma of the binomial for rates; for 512 positions x 200 seeds a chi-square statistic within
    5 of its standard deviations (sqrt(2 * 512)) of its mean 512."""
    d = 0.3
    counts = sum((~long_rows.counter_keep_mask(s, (1, 2, 16, 16), "dropkey", d)).double() for s in range(200))
    chi2 = ((counts - 200 * d) ** 2 / (200 * d * (1 - d))).sum().item()
    assert abs(chi2 - 512) < 5 * math.sqrt(2 * 512)
    drop = ~long_rows.counter_keep_mask(7, (4, 4, 256, 256), "dropkey", d)   # 1M draws
    assert abs(drop.double().mean().item() - d) < _four_sigma(d, drop.numel())
    following = ~long_rows.counter_keep_mask(8, (4, 4, 256, 256), "dropkey", d)
    pairs = {"keys in one word": (drop[..., 0:-1:4], drop[..., 1::4]),
             "keys across words": (drop[..., 3:-1:4], drop[..., 4::4]),
             "queries": (drop[..., :-1, :], drop[..., 1:, :]), "heads": (drop[:, :-1], drop[:, 1:]),
             "batch": (drop[:-1], drop[1:]), "consecutive seeds": (drop, following)}
    for name, (a, b) in pairs.items():                                 # both dropped: d^2 when independent
        assert abs((a & b).double().mean().item() - d * d) < _four_sigma(d * d, a.numel()), name


@needs_long_rows
@pytest.mark.parametrize("d", [1e-7, 2**-17, 0.3, 1 - 1e-7])
def test_long_rows_any_drop_ratio_drops_at_its_rate_to_2_to_the_minus_16_never_everything(d, monkeypatch):
    """Realised rate within 4 sigma of d rounded to a multiple of 2^-16, at least 2^-16 (at most 1 - 2^-16),
    over 2M draws of the counter mask; the tiled path (several tiles) drops exactly that mask."""
    rate = min(max(round(d * 65536), 1), 65535) / 65536
    drop = ~long_rows.counter_keep_mask(11, (8, 1, 512, 512), "dropkey", d)
    assert abs(drop.double().mean().item() - rate) < _four_sigma(rate, drop.numel())
    q, k, v = _qkv(B=1, H=1, N=512, D=8, seed=12)
    keep = long_rows.counter_keep_mask(long_rows.draw_seed(_gen(13)), (1, 1, 512, 512), "dropkey", d)
    assert keep.any() and (~keep).any()
    with _long(monkeypatch, tile=512 * 100):
        out = dropkey.attention(q, k, v, drop_ratio=d, generator=_gen(13))
    _assert_all_close([out], [_attend(q, k, v, "dropkey", d, False, keep_mask=keep)])


@needs_long_rows
@pytest.mark.parametrize("masks", list(LONG_MASKS))
@pytest.mark.parametrize("mode", dropkey.DROPKEY_MODES)
def test_long_rows_a_training_call_used_the_counter_mask_of_its_first_generator_draw(mode, masks, monkeypatch):
    """Re-seed, draw_seed, counter_keep_mask: the explicit path under that mask gives the call's outputs."""
    q, k, v = _qkv(B=2, N=37, seed=91, grad=True)
    calls = _spy(monkeypatch)
    with _long(monkeypatch):
        out = dropkey.attention(q, k, v, drop_ratio=0.5, mode=mode, generator=_gen(92), **LONG_MASKS[masks],
                                **GRID_37)
    assert calls and calls[0] is not None                             # long_rows ran
    keep = long_rows.counter_keep_mask(long_rows.draw_seed(_gen(92)), (2, 3, 37, 37), mode, 0.5, **GRID_37)
    expected = _attend(q, k, v, mode, 0.5, False, keep_mask=keep, **LONG_MASKS[masks], **GRID_37)
    _assert_all_close(_out_and_grads(out, (q, k, v)), _out_and_grads(expected, (q, k, v)))


@needs_long_rows
@pytest.mark.parametrize("masks", list(LONG_MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_rows_equal_the_explicit_path_under_a_given_mask_with_a_fallen_back_row_and_leave_it(
        dtype, masks, monkeypatch):
    q, k, v = _qkv(B=2, N=37, seed=95, dtype=dtype, grad=True)
    keep = dropkey.sample_keep_mask((2, 3, 37, 37), "dropkey", 0.5, generator=_gen(96))
    keep[1, 2, 20] = False                                             # every key of this row dropped
    given = keep.clone()
    kw = dict(LONG_MASKS[masks], keep_mask=keep)
    if masks == "bias":
        kw["attn_mask"] = kw["attn_mask"].to(dtype)
    expected = _out_and_grads(_attend(q, k, v, "dropkey", 0.5, False, **kw), (q, k, v))
    calls = _spy(monkeypatch)
    with _long(monkeypatch):
        _assert_all_close(_out_and_grads(dropkey.attention(q, k, v, drop_ratio=0.5, **kw), (q, k, v)), expected)
    assert calls[0] is not None and torch.equal(keep, given)           # it ran and did not write the mask


@needs_long_rows
@pytest.mark.parametrize("case", ["broadcast keep", "value width 5", "3-D", "broadcast heads"])
def test_long_rows_never_modify_the_keep_mask_and_take_any_layout(case, monkeypatch):
    g = _gen(101)
    shapes = {"3-D": [(2, 37, 8)] * 3, "broadcast heads": [(2, 3, 37, 8), (2, 1, 37, 8), (2, 1, 37, 8)],
              "value width 5": [(2, 3, 37, 8), (2, 3, 37, 8), (2, 3, 37, 5)]}.get(case, [(2, 3, 37, 8)] * 3)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes)
    lead = (1, 1) if case == "broadcast keep" else torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    keep = dropkey.sample_keep_mask((*lead, 37, 37), "dropkey", 0.5, generator=_gen(102))
    keep[..., 6, :] = False                                            # a fallen-back row
    given = keep.clone()
    expected = _out_and_grads(_attend(q, k, v, "dropkey", 0.5, False, keep_mask=keep, is_causal=True), (q, k, v))
    with _long(monkeypatch):
        out = dropkey.attention(q, k, v, drop_ratio=0.5, keep_mask=keep, is_causal=True)
        _assert_all_close(_out_and_grads(out, (q, k, v)), expected)
    assert torch.equal(keep, given)


@needs_long_rows
@pytest.mark.parametrize("padding", [torch.finfo(torch.float32).min, -1e9, -1e4])
@pytest.mark.parametrize("d", [0.3, 0.9])
def test_long_rows_float_padding_gets_zero_weight_and_gradient_at_any_drop_ratio(padding, d, monkeypatch):
    """Keys 30.. padded by a float mask: out equals attention over keys ..29 alone (the same mask, the
    all-dropped row falling back to real keys only), and the padded keys get exactly zero gradient."""
    q, k, v = _qkv(B=2, N=37, seed=103, grad=True)
    bias = torch.zeros(1, 37).masked_fill(torch.arange(37) >= 30, padding)  # (1, Nk): SDPA takes 2-D masks
    keep = dropkey.sample_keep_mask((2, 3, 37, 37), "dropkey", d, generator=_gen(104))
    keep[0, 1, 3, :30] = False                                         # only padded keys kept: falls back
    with _long(monkeypatch):
        out = dropkey.attention(q, k, v, attn_mask=bias, drop_ratio=d, keep_mask=keep)
        sampled = dropkey.attention(q, k, v, attn_mask=bias, drop_ratio=d, generator=_gen(105))
    short = [t[:, :, :30].detach().requires_grad_() for t in (k, v)]
    expected = _attend(q, *short, "dropkey", d, False, keep_mask=keep[..., :30])
    _assert_all_close([out], [expected])
    dk, dv = torch.autograd.grad((out.square().sum() + sampled.square().sum()), (k, v))
    assert (dk[:, :, 30:] == 0).all() and (dv[:, :, 30:] == 0).all()


@needs_long_rows
@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap"])
def test_long_rows_decline_under_func_transforms(transform, monkeypatch):
    """grad and vmap(randomness="different") through dropkey.attention, which then takes its whole-mask
    path; jvp checks the decline alone (its output from the explicit path)."""
    q, k, v = _qkv(B=2, N=37, seed=106)
    calls = _spy(monkeypatch)

    def f(q, k, v):
        if transform != "jvp":
            return dropkey.attention(q, k, v, drop_ratio=0.3)
        calls.append(long_rows.attention(q, k, v, None, 0.3, False, 8**-0.5, mode="dropkey"))
        return _attend(q, k, v, "dropkey", 0.3, False)
    with _long(monkeypatch):
        if transform == "grad":
            result = torch.func.grad(lambda q: f(q, k, v).square().sum())(q)
        elif transform == "jvp":
            result = torch.func.jvp(lambda q: f(q, k, v), (q,), (torch.ones_like(q),))[1]
        else:
            result = torch.func.vmap(f, randomness="different")(q, k, v)
        assert calls and all(c is None for c in calls)                 # declined
        assert result.shape == q.shape and torch.isfinite(result).all()
        dropkey.attention(q, k, v, drop_ratio=0.3)
    assert calls[-1] is not None                                       # and runs outside the transforms


@needs_long_rows
def test_long_rows_are_taken_from_long_rows_on_and_keep_nothing_of_size_nq_by_nk_for_backward(monkeypatch):
    calls = _spy(monkeypatch)
    for N in [1023, 1024]:                                            # Nq * Nk = 2^20 = LONG_ROWS
        q, k, v = _qkv(B=1, H=1, N=N, D=8, seed=107)
        dropkey.attention(q, k, v, drop_ratio=0.3)
    assert len(calls) == 1 and calls[0] is not None
    q, k, v = _qkv(B=1, H=2, N=513, D=16, seed=108, grad=True)
    monkeypatch.setattr(dropkey, "LONG_ROWS", 1)

    def saved_bytes(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(storages.values())
    none = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v))
    drop = saved_bytes(lambda: dropkey.attention(q, k, v, drop_ratio=0.3))
    assert drop <= none + 2 * 513 * 4                                  # at most one float per row more than SDPA


@needs_long_rows
def test_long_rows_bfloat16_matches_the_float32_reference(monkeypatch):
    q, k, v = _qkv(B=2, N=37, D=16, seed=109, dtype=torch.bfloat16, grad=True)
    keep = dropkey.sample_keep_mask((2, 3, 37, 37), "dropkey", 0.5, generator=_gen(110))
    keep[1, 0, 4] = False
    with _long(monkeypatch):
        out = dropkey.attention(q, k, v, drop_ratio=0.5, keep_mask=keep)
    ref_out, _ = _reference(q.float(), k.float(), v.float(), keep, "dropkey", 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)   # bfloat16: 8-bit mantissa


def _flex():
    try:
        from torch.nn.attention import flex_attention
        return flex_attention
    except ImportError:
        pytest.skip("this torch has no torch.nn.attention.flex_attention")


@needs_long_rows
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "padding and causal"])
def test_long_rows_flex_mask_mod_reproduces_the_counter_mask_bit_for_bit(masks):
    flex = _flex()
    seed = long_rows.draw_seed(_gen(98, DEVICE), DEVICE)
    allowed = _padding([37, 3], 37).to(DEVICE).expand(2, 3, 37, 37) if "padding" in masks else None
    fallback = torch.zeros(2, 3, 37, dtype=torch.bool, device=DEVICE)
    fallback[1, 2, 5] = True
    mask_mod = long_rows._flex_mask_mod(seed, (2, 3), 37, 0.4, allowed, "causal" in masks, fallback)
    got = flex.create_mask(mask_mod, 2, 3, 37, 37, device=DEVICE)
    expected = long_rows.counter_keep_mask(seed, (2, 3, 37, 37), "dropkey", 0.4)
    expected[1, 2, 5] = True                                           # a fallen-back row keeps its allowed keys
    if allowed is not None:
        expected &= allowed
    if "causal" in masks:
        expected &= torch.ones(37, 37, dtype=torch.bool, device=DEVICE).tril()
    assert torch.equal(got, expected)


@needs_long_rows
@pytest.mark.filterwarnings("ignore")                                 # flex on the CPU warns that it is unfused
@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
def test_long_rows_flex_attention_equals_the_explicit_path_under_the_counter_mask(masks, monkeypatch):
    """At d = 0.9 some rows keep no key and fall back. On the CPU the forward without gradients (flex's
    eager path); with DROPKEY_TEST_DEVICE=cuda a training call through `dropkey.attention`."""
    _flex()
    q, k, v = _qkv(B=2, N=37, D=16, seed=99, grad=DEVICE.type == "cuda", device=DEVICE)  # flex: E >= 16
    kw = {"none": {}, "causal": dict(is_causal=True), "padding": dict(attn_mask=_padding([37, 3], 37).to(DEVICE))}[masks]
    seed = long_rows.draw_seed(_gen(100, DEVICE), DEVICE)
    keep = long_rows.counter_keep_mask(seed, (2, 3, 37, 37), "dropkey", 0.9)
    allowed, _ = dropkey.allowed_keys(kw.get("attn_mask"), kw.get("is_causal", False), 37, 37, DEVICE)
    assert not (keep if allowed is None else keep & allowed).any(-1).all()  # a row falls back
    expected = _attend(q, k, v, "dropkey", 0.9, False, keep_mask=keep, **kw)
    if DEVICE.type == "cuda":
        calls = _spy(monkeypatch)
        with _long(monkeypatch):
            out = dropkey.attention(q, k, v, drop_ratio=0.9, generator=_gen(100, DEVICE), **kw)
        assert calls[0] is not None
        _assert_all_close(_out_and_grads(out, (q, k, v)), _out_and_grads(expected, (q, k, v)), tol=1e-4)
        return
    with torch.no_grad():
        out = long_rows._flex_attention(q, k, v, seed, 0.9, kw.get("attn_mask"), kw.get("is_causal", False), None)
    _assert_all_close([out], [expected])


@needs_long_rows
def test_long_rows_sweep_prints_its_rows_and_flex_needs_cuda(capsys):
    with _one_thread():
        long_rows._main(["--shapes", "1,2,33,8", "--runs", "1"])
    printed = capsys.readouterr().out
    for row in ["SDPA, no dropout", "dropkey", "paper Algorithm 1", "faster than Algorithm 1", "peak MB"]:
        assert row in printed
    if torch.cuda.is_available():
        long_rows._main(["--flex", "--shapes", "1,2,256,16", "--runs", "1"])
        assert "SDPA, dropout_p=0.3" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as exit_:
        long_rows._main(["--flex"])
    assert exit_.value.code != 0 and "--flex needs a CUDA GPU" in capsys.readouterr().err
