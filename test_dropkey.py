"""Tests for dropkey.py, vit.py, train_cifar.py and theory.ipynb.

Statistical tests use fixed seeds and state their tolerance: a realised rate
over n Bernoulli(d) draws must lie within 4 sigma = 4 sqrt(d (1 - d) / n).
"""
import argparse
import builtins
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import pickle
import re
import shlex
import struct
import subprocess
import sys
import tarfile

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


# ============================================================================ core: dropkey.py, vit.py

def _qkv(B=4, H=3, N=17, D=8, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def _softmax_weights(q, k):
    """Plain attention weights p = softmax(q k^T / sqrt(D)) (Eq. 2), written again in the test."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


def _reference(q, k, v, keep, mode, d):
    """Independent reference: Eq. 2 softmax, then zero dropped weights and re-normalise (Eq. 1) or rescale."""
    p = _softmax_weights(q, k)
    keep = keep | ~keep.any(-1, keepdim=True)         # the all-dropped rule, written again
    w = p * keep
    w = w / (1 - d) if mode == "vanilla" else w / w.sum(-1, keepdim=True)
    return w @ v, w


def _out_and_grads(out, inputs):
    """out and the gradients of sum(out^2) with respect to `inputs`: what the equivalence tests compare."""
    return (out, *torch.autograd.grad(out.square().sum(), inputs))


def _assert_all_close(results, expected, tol=1e-5):
    for a, b in zip(results, expected, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)

def _four_sigma(d, n):
    return 4 * math.sqrt(d * (1 - d) / n)


STRUCTURED = dict(grid=(4, 4), prefix_tokens=1, block_size=2)  # N = 17


@pytest.mark.parametrize("d", [0.1, 0.3, 0.5])
def test_dropkey_realised_drop_rate_within_4_sigma(d):
    q, k, v = _qkv(B=16, H=4, N=65, seed=1)
    _, w = dropkey.attention(q, k, v, "dropkey", d, return_weights=True,
                             generator=torch.Generator().manual_seed(2))
    n = w.numel()                                     # 270k Bernoulli(d) draws
    assert abs((w == 0).float().mean().item() - d) < _four_sigma(d, n)


@pytest.mark.parametrize("d", [0.1, 0.3])
def test_bernoulli_mask_rate_at_large_sample_size(d):
    n = 20_000_000                                    # 4 sigma ~ 5e-4 at d = 0.1: a 63-bit or 1/256 grid fails
    m = dropkey.bernoulli_mask((n,), d, generator=torch.Generator().manual_seed(3))
    assert abs(m.float().mean().item() - d) < _four_sigma(d, n)


def test_bernoulli_mask_words_are_independent():
    n = 4_000_000                                     # neighbours share a 64-bit word: their joint rate is d^2
    m = dropkey.bernoulli_mask((n // 2, 2), 0.5, generator=torch.Generator().manual_seed(4))
    both = (m[:, 0] & m[:, 1]).float().mean().item()
    assert abs(both - 0.25) < _four_sigma(0.25, n // 2)


@pytest.mark.parametrize("mode", ["dropattention", "dropkey", "dropkey_block", "dropkey_cross"])
@pytest.mark.parametrize("fused", [True, False])
def test_rows_sum_to_one(mode, fused):
    q, k, v = _qkv(seed=5)
    _, w = dropkey.attention(q, k, v, mode, 0.5, return_weights=True, fused=fused, **STRUCTURED)
    assert (w == 0).any()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6, rtol=0)


def test_vanilla_scales_kept_weights_by_one_over_one_minus_d():
    q, k, v = _qkv(seed=6)
    d = 0.3
    keep = dropkey.sample_keep_mask((4, 3, 17, 17), "vanilla", d, generator=torch.Generator().manual_seed(7))
    _, w = dropkey.attention(q, k, v, "vanilla", d, keep_mask=keep, return_weights=True)
    p = _softmax_weights(q, k)
    torch.testing.assert_close(w[keep], p[keep] / (1 - d), atol=1e-6, rtol=1e-6)
    assert (w[~keep] == 0).all()
    assert (w.sum(-1) - 1).abs().max() > 0.05        # rows no longer sum to 1


@pytest.mark.parametrize("mode", dropkey.MODES)
def test_eval_mode_equals_plain_attention(mode):
    q, k, v = _qkv(seed=8)
    plain = dropkey.attention(q, k, v, "none", 0.0)
    out = dropkey.attention(q, k, v, mode, 0.5, training=False, **STRUCTURED)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("N", [17, 257])             # 257 > 128: the fused SDPA path on CPU
def test_dropkey_equals_dropattention_and_reference_under_one_mask(N):
    q, k, v = _qkv(B=2, N=N, seed=9, grad=True)
    keep = dropkey.sample_keep_mask((2, 3, N, N), "dropkey", 0.4, generator=torch.Generator().manual_seed(10))
    keep[0, 0, 3] = False                             # one fully dropped row: falls back to p
    expected = _out_and_grads(_reference(q, k, v, keep, "dropkey", 0.4)[0], (q, k, v))
    outs = {}
    for mode in ["dropkey", "dropattention"]:
        for fused in [True, False]:
            out = dropkey.attention(q, k, v, mode, 0.4, keep_mask=keep, fused=fused)
            _assert_all_close(_out_and_grads(out, (q, k, v)), expected)
            outs[mode, fused] = out
    assert (outs["dropkey", False] - outs["dropattention", False]).abs().max() <= 1e-6
    _, w = dropkey.attention(q, k, v, "dropkey", 0.4, keep_mask=keep, return_weights=True)
    torch.testing.assert_close(w[0, 0, 3], torch.softmax(q[0, 0, 3] @ k[0, 0].T / math.sqrt(8), -1))


@pytest.mark.parametrize("mode, fused", [("dropkey", True), ("dropattention", True), ("vanilla", None),
                                         ("dropkey", False), ("none", False)])
def test_batch_slices_of_mask_chunk_elements_equal_reference(mode, fused, monkeypatch):
    """Fused and explicit paths take the batch in slices of <= MASK_CHUNK mask elements; an all-dropped row sits in a later one."""
    monkeypatch.setattr(dropkey, "MASK_CHUNK", 2 * 3 * 17 * 17)       # slices of 2 of the 5 batch rows
    q, k, v = _qkv(B=5, N=17, seed=40, grad=True)
    keep = dropkey.sample_keep_mask((5, 3, 17, 17), "dropkey", 0.4, generator=torch.Generator().manual_seed(41))
    keep[3, 1, 6] = False                             # in the second slice
    if mode == "none":
        keep = torch.ones_like(keep)
    ref_out, ref_weights = _reference(q, k, v, keep, mode, 0.4)
    expected = _out_and_grads(ref_out, (q, k, v))
    out = dropkey.attention(q, k, v, mode, 0.4, keep_mask=None if mode == "none" else keep, fused=fused)
    _assert_all_close(_out_and_grads(out, (q, k, v)), expected)
    _, weights = dropkey.attention(q, k, v, mode, 0.4, keep_mask=None if mode == "none" else keep,
                                   fused=fused, return_weights=True)  # always the explicit path, in slices
    _assert_all_close([weights], [ref_weights])


@pytest.mark.parametrize("mode, fused", [("dropkey", True), ("vanilla", None), ("none", False)])
def test_an_empty_batch_gives_an_empty_output(mode, fused):
    q, k, v = _qkv(B=0, grad=True)
    out = dropkey.attention(q, k, v, mode, 0.3, fused=fused)
    assert out.shape == (0, 3, 17, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_fused_path_takes_q_k_v_and_gradients_in_the_vit_layout():
    """vit.py hands over q, k, v as strided views of one projection and gets a strided gradient back."""
    B, N, H, D = 3, 17, 3, 8
    qkv = torch.randn(B, N, 3, H, D, generator=torch.Generator().manual_seed(46), requires_grad=True)
    keep = dropkey.sample_keep_mask((B, H, N, N), "dropkey", 0.4, generator=torch.Generator().manual_seed(47))
    keep[2, 0, 5] = False
    w = torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(48))
    results = []
    for fused in [True, False]:
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # 3 x (B, H, N, D), not contiguous
        out = dropkey.attention(q, k, v, "dropkey", 0.4, keep_mask=keep, fused=fused)
        y = out.transpose(1, 2).reshape(B, N, H * D)                  # as vit.py does
        results.append((out, *torch.autograd.grad((y * w).sum(), qkv)))
    _assert_all_close(*results)


def test_fused_bfloat16_with_an_all_dropped_row_matches_the_float32_reference():
    q, k, v = _qkv(B=2, N=65, D=16, seed=42, dtype=torch.bfloat16, grad=True)
    keep = dropkey.sample_keep_mask((2, 3, 65, 65), "dropkey", 0.5, generator=torch.Generator().manual_seed(43))
    keep[1, 2, 0] = False
    out = dropkey.attention(q, k, v, "dropkey", 0.5, keep_mask=keep, fused=True)
    ref_out, _ = _reference(q.float(), k.float(), v.float(), keep, "dropkey", 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)   # bfloat16: 8-bit mantissa
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_additive_mask_is_plus_zero_or_minus_inf(dtype):
    keep = torch.tensor([[True, False, True], [False, False, True]])
    m = dropkey.additive_mask(keep, dtype)
    assert m.dtype == dtype and m.shape == keep.shape
    assert (m[keep] == 0).all() and not torch.signbit(m[keep]).any()
    assert torch.isneginf(m[~keep]).all()


def test_bernoulli_mask_follows_the_torch_seed_and_not_the_chunk_size(monkeypatch):
    shape = (3, 1000)
    torch.manual_seed(44)
    a = dropkey.bernoulli_mask(shape, 0.3)
    torch.manual_seed(44)
    b = dropkey.bernoulli_mask(shape, 0.3)
    monkeypatch.setattr(dropkey, "MASK_CHUNK", 12)     # 250 chunks of 3 words each
    c = dropkey.bernoulli_mask(shape, 0.3, generator=torch.Generator().manual_seed(45))
    monkeypatch.undo()
    d = dropkey.bernoulli_mask(shape, 0.3, generator=torch.Generator().manual_seed(45))
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, c)


def test_benchmark_runs_and_prints_every_row(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dropkey.py", "--shapes", "2,2,17,8", "--runs", "1",
                                      "--vit-patches", "16", "--vit-batch", "2", "--vit-runs", "1"])
    with _one_thread():
        dropkey._main()
    printed = capsys.readouterr().out
    for row in [*dropkey.MODES[1:], "none (fused SDPA)", "none (explicit)", "paper Algorithm 1",
                "faster than the paper's Algorithm 1", "images/s", "none, 2nd copy", "exact expectation"]:
        assert row in printed


def test_masks_differ_across_queries_heads_and_batch():
    keep = dropkey.sample_keep_mask((2, 2, 65, 65), "dropkey", 0.5, generator=torch.Generator().manual_seed(11))
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0], keep[1])
    # and per query in the structured modes: rows of one head differ
    block = dropkey.sample_keep_mask((1, 1, 65, 65), "dropkey_block", 0.5, grid=(8, 8), block_size=2,
                                     generator=torch.Generator().manual_seed(12))
    assert len({tuple(row.tolist()) for row in block[0, 0]}) > 32


def _grid_drop(keep, grid):
    return (~keep[..., 1:]).reshape(*keep.shape[:-1], *grid).float()   # (..., n_h, n_w), 1 = dropped


@pytest.mark.parametrize("s", [1, 2, 3])
def test_block_mask_is_a_union_of_s_by_s_windows(s):
    keep = dropkey.sample_keep_mask((2, 2, 65, 65), "dropkey_block", 0.3, grid=(8, 8), block_size=s,
                                    generator=torch.Generator().manual_seed(13))
    drop = _grid_drop(keep, (8, 8)).reshape(-1, 1, 8, 8)
    full_windows = -F.max_pool2d(-drop, s, stride=1)                  # 1 where a whole s x s window is dropped
    covered = F.max_pool2d(F.pad(full_windows, (s - 1,) * 4), s, stride=1)
    assert drop.sum() > 0 and torch.equal(covered, drop)


@pytest.mark.parametrize("s", [1, 2])
def test_cross_mask_is_a_union_of_full_rows_and_columns(s):
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


@pytest.mark.parametrize("mode,s", [("dropkey_block", 3), ("dropkey_block", 5), ("dropkey_cross", 1), ("dropkey_cross", 3)])
def test_structured_drop_rate_matches_its_exact_expectation_and_is_near_d(mode, s):
    d = 0.3
    keep = dropkey.sample_keep_mask((32, 4, 65, 65), mode, d, grid=(8, 8), block_size=s,
                                    generator=torch.Generator().manual_seed(15))
    frac = (~keep[..., 1:]).float().mean(-1).flatten()                # per-row drop fraction; rows independent
    expected = _exact_structured_rate(mode, d, 8, s)
    assert abs(frac.mean().item() - expected) < 4 * frac.std().item() / math.sqrt(frac.numel())
    # overlaps make the paper's rate formula approximate (Sec. 3.2): realised rate within 0.1 of d
    assert abs(expected - d) < 0.1


@pytest.mark.parametrize("mode", ["dropkey_block", "dropkey_cross"])
def test_structured_modes_drop_the_class_token_key_independently_at_rate_d(mode):
    keep = dropkey.sample_keep_mask((64, 4, 65, 65), mode, 0.3, grid=(8, 8), block_size=3,
                                    generator=torch.Generator().manual_seed(16))
    cls = ~keep[..., 0]                                               # (B, H, N)
    assert abs(cls.float().mean().item() - 0.3) < _four_sigma(0.3, cls.numel())
    grid_any = (~keep[..., 1:]).any(-1)
    # independent of the grid: P(cls dropped | some grid key dropped) is still d
    assert abs(cls[grid_any].float().mean().item() - 0.3) < _four_sigma(0.3, int(grid_any.sum()))


@pytest.mark.parametrize("mode", dropkey.DROPPING_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_drop_ratio_gives_no_nan(mode, dtype):
    q, k, v = _qkv(B=8, N=5, seed=17, dtype=dtype)
    opts = dict(grid=(2, 2), prefix_tokens=1, block_size=1)
    for fused in [True, False]:
        out, w = dropkey.attention(q, k, v, mode, 0.999, return_weights=True, fused=fused, **opts)
        assert torch.isfinite(out).all() and torch.isfinite(w).all()
        assert out.dtype == dtype
        assert torch.isfinite(dropkey.attention(q, k, v, mode, 0.999, fused=fused, **opts)).all()


@pytest.mark.parametrize("mode", ["vanilla", "dropattention", "dropkey"])
def test_fully_dropped_row_falls_back_to_undropped_weights(mode):
    q, k, v = _qkv(seed=18)
    keep = torch.zeros(4, 3, 17, 17, dtype=torch.bool)               # every key dropped
    _, w = dropkey.attention(q, k, v, mode, 0.5, keep_mask=keep, return_weights=True)
    p = _softmax_weights(q, k)
    torch.testing.assert_close(w, p / 0.5 if mode == "vanilla" else p)


@pytest.mark.parametrize("mode", dropkey.MODES)
def test_gradients_flow_to_q_k_v(mode):
    q, k, v = _qkv(seed=19, grad=True)
    dropkey.attention(q, k, v, mode, 0.3, **STRUCTURED).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_keep_mask_broadcasts_and_generator_reproduces():
    q, k, v = _qkv(seed=20)
    keep = dropkey.sample_keep_mask((1, 1, 17, 17), "dropkey", 0.5, generator=torch.Generator().manual_seed(21))
    _, w = dropkey.attention(q, k, v, "dropkey", 0.5, keep_mask=keep, return_weights=True)
    assert torch.equal(w == 0, (~dropkey.fall_back(keep)).expand(4, 3, 17, 17))
    a = dropkey.attention(q, k, v, "dropkey", 0.5, generator=torch.Generator().manual_seed(22))
    b = dropkey.attention(q, k, v, "dropkey", 0.5, generator=torch.Generator().manual_seed(22))
    assert torch.equal(a, b)


def test_monte_carlo_alignment_matches_enumerated_expectation():
    """At eval, mc_samples=T averages the re-normalised weights: E[w_j] = c_j p_j (Eq. 3)."""
    q, k, v = (t[:1].expand(500, 1, 4, 8) for t in _qkv(B=1, H=1, N=4, seed=23))  # 500 copies of one row set
    d, T = 0.5, 8                                                    # 500 x 8 = 4000 masks per weight
    p = _softmax_weights(q, k)[0, 0].double()   # (4, 4)
    expected = _enumerated_expectation(p, d)                         # all 2^4 keep masks, (4, 4)
    _, w = dropkey.attention(q, k, v, "dropkey", d, training=False, mc_samples=T, return_weights=True,
                             generator=torch.Generator().manual_seed(24))
    w = w[:, 0].double().mean(0)                                     # average of 4000 sampled weights
    sigma = torch.sqrt(expected * (1 - expected) / 4000)                # each w_j lies in [0, 1]: var <= E(1 - E)
    assert ((w - expected).abs() <= 4 * sigma + 1e-6).all()
    assert (w - p).abs().max() > 0.01                                # and it is not plain attention


def test_layer_drop_ratios_schedules():
    assert dropkey.layer_drop_ratios(0.3, 4, "constant") == [0.3] * 4
    dec = dropkey.layer_drop_ratios(0.3, 4, "decreasing")
    torch.testing.assert_close(torch.tensor(dec), torch.tensor([0.3, 0.2, 0.1, 0.0]))
    assert dropkey.layer_drop_ratios(0.3, 4, "increasing") == dec[::-1]
    assert dropkey.layer_drop_ratios(0.3, 1, "decreasing") == [0.3]


@pytest.mark.parametrize("call,message", [
    (lambda q: dropkey.attention(q, q, q, "dropout", 0.1), "unknown mode"),
    (lambda q: dropkey.attention(q, q, q, "dropkey", 1.0), "drop_ratio"),
    (lambda q: dropkey.attention(q, q, q, "dropkey", -0.1), "drop_ratio"),
    (lambda q: dropkey.attention(q, q, q, "dropkey_block", 0.1), "grid"),
    (lambda q: dropkey.attention(q, q, q, "dropkey_cross", 0.1, grid=(3, 3)), "does not match"),
    (lambda q: dropkey.attention(q, q, q, "dropkey_block", 0.1, grid=(4, 4), block_size=0), "block_size"),
    (lambda q: dropkey.attention(q, q, q, "dropkey_block", 0.1, grid=(4, 4), block_size=5), "block_size"),
    (lambda q: dropkey.attention(q, q, q[..., :4], "dropkey", 0.1), "one shape"),
    (lambda q: dropkey.attention(q, q, q, "dropkey", 0.1, mc_samples=-1), "mc_samples"),
    (lambda q: dropkey.layer_drop_ratios(0.1, 3, "cosine"), "unknown schedule"),
    (lambda q: ViT(image_size=30, patch_size=4), "divisible"),
    (lambda q: ViT(dim=100, heads=3), "divisible"),
])
def test_bad_input_is_a_one_line_value_error(call, message):
    q = torch.randn(2, 3, 17, 8)
    with pytest.raises(ValueError, match=message) as info:
        call(q)
    assert "\n" not in str(info.value)


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


def test_vit_drop_patches_keeps_a_different_subset_per_image():
    from vit import remove_patches
    torch.manual_seed(25)
    x = torch.arange(16.0).reshape(1, 16, 1).expand(8, 16, 1)        # token i carries the value i
    kept = remove_patches(x, 0.75)[..., 0]                          # (8, 4)
    assert kept.shape == (8, 4)
    assert len({tuple(r.tolist()) for r in kept}) > 1                # subsets differ per image
    assert (kept.diff(dim=1) > 0).all()                              # original order kept


def test_vit_monte_carlo_eval_changes_output_and_is_off_by_default():
    torch.manual_seed(26)
    model = ViT(dim=32, depth=2, heads=2, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    plain = model(x)
    assert torch.equal(model(x), plain)                              # eval is deterministic
    model.mc_samples = 20
    assert not torch.allclose(model(x), plain, atol=1e-6)


def test_cls_attention_entropy_of_uniform_and_one_hot_rows():
    from vit import cls_attention_entropy
    w = torch.zeros(2, 3, 5, 5)
    w[0, :, 0] = 1 / 5                                               # uniform class-token row: log 5
    w[1, :, 0, 2] = 1.0                                              # one-hot: 0
    torch.testing.assert_close(cls_attention_entropy(w), torch.tensor([math.log(5), 0.0]))


def test_python_vit_py_prints_schedules_and_entropy():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "vit.py"], capture_output=True, text=True, timeout=120,
                         cwd=__import__("pathlib").Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert "decreasing drop ratios: 0.30, 0.24, 0.18, 0.12, 0.06, 0.00" in out.stdout
    assert "parameters: 1,806,538" in out.stdout and "entropy per layer" in out.stdout


def test_readme_step_through_snippet_runs(capsys):
    import pathlib
    readme = (pathlib.Path(__file__).parent / "README.md").read_text()
    code = readme.split("<!-- step-through -->\n```python\n", 1)[1].split("```", 1)[0]
    try:
        exec(compile(code, "README step-through", "exec"), {})
    finally:
        torch.set_printoptions(profile="default")                     # the snippet sets a precision
    printed = capsys.readouterr().out
    assert all(f"\n{mode}: keep mask" in printed for mode in dropkey.MODES)
    assert printed.count("row sums") == len(dropkey.MODES)


@pytest.mark.parametrize("mode", dropkey.MODES)
def test_tiny_vit_overfits_one_batch_in_every_mode(mode):
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


# ============================================================================ exact expectation
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
    torch.testing.assert_close(dropkey.expected_weights(p, 0.0), p.detach(), atol=1e-7, rtol=0)  # re-normalised p
    got = dropkey.expected_weights(p, 0.3)                          # eval only: runs under no_grad
    assert got.shape == p.shape and got.dtype == p.dtype and not got.requires_grad
    torch.testing.assert_close(got.reshape(6, 9), dropkey.expected_weights(p.detach().reshape(6, 9), 0.3))
    torch.testing.assert_close(dropkey.expected_weights(p, 1e-7), p.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["dropkey", "dropattention"])
def test_attention_align_exact_is_expected_weights_at_v(mode):
    """Eval with align='exact': out = E[w] @ v with E[w] by enumeration, weights returned, no autograd."""
    q, k, v = _qkv(B=2, H=2, N=6, D=4, seed=7, grad=True)
    d = 0.4
    out, w = dropkey.attention(q, k, v, mode, d, training=False, align="exact", return_weights=True)
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    want_w = _enumerated_expectation(p.detach(), d)
    torch.testing.assert_close(w.double(), want_w, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, (want_w.float() @ v).detach(), atol=1e-5, rtol=1e-5)
    assert not out.requires_grad
    plain = dropkey.attention(q, k, v, mode, d, training=False)
    assert (out - plain).abs().max() > 1e-3                          # not plain attention
    assert torch.equal(dropkey.attention(q, k, v, mode, 0.0, training=False, align="exact"),
                       dropkey.attention(q, k, v, mode, 0.0, training=False))   # d = 0: nothing to align


def test_attention_align_exact_vanilla_is_p_up_to_its_all_dropped_row():
    """Vanilla: E[w_j] = p_j (1 - d) / (1 - d) + d^N p_j / (1 - d); plain attention at N = 65."""
    q, k, v = _qkv(B=2, H=2, N=3, D=4, seed=8)
    d = 0.8
    _, w = dropkey.attention(q, k, v, "vanilla", d, training=False, align="exact", return_weights=True)
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1).double()
    want = torch.zeros_like(p)
    for bits in range(8):                                            # the 2^3 masks, vanilla's rule
        keep = torch.tensor([(bits >> j) & 1 for j in range(3)], dtype=torch.bool)
        prob = (1 - d) ** keep.sum().item() * d ** (3 - keep.sum().item())
        want += prob * (p * keep if keep.any() else p) / (1 - d)
    torch.testing.assert_close(w.double(), want, atol=1e-6, rtol=1e-6)
    q, k, v = _qkv(N=65, seed=9)
    torch.testing.assert_close(dropkey.attention(q, k, v, "vanilla", 0.3, training=False, align="exact"),
                               dropkey.attention(q, k, v, "vanilla", 0.3, training=False, fused=False))


@pytest.mark.parametrize("mode", dropkey.STRUCTURED_MODES)
def test_align_exact_is_an_error_for_structured_modes(mode):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not independent.*mc_samples"):
        dropkey.attention(q, k, v, mode, 0.3, training=False, align="exact", **STRUCTURED)
    model = ViT(image_size=16, patch_size=4, dim=8, depth=1, heads=2, attn_drop_mode=mode, block_size=2).eval()
    model.align = "exact"
    with pytest.raises(ValueError, match="not independent"):
        model(torch.randn(1, 3, 16, 16))


def test_align_argument_checks_and_training_ignores_it():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="align must be"):
        dropkey.attention(q, k, v, "dropkey", 0.3, training=False, align="mc")
    with pytest.raises(ValueError, match="not both"):
        dropkey.attention(q, k, v, "dropkey", 0.3, training=False, align="exact", mc_samples=4)
    keep = dropkey.sample_keep_mask((4, 3, 17, 17), "dropkey", 0.3, generator=torch.Generator().manual_seed(10))
    assert torch.equal(dropkey.attention(q, k, v, "dropkey", 0.3, keep_mask=keep, align="exact"),
                       dropkey.attention(q, k, v, "dropkey", 0.3, keep_mask=keep))


def test_vit_align_exact_uses_expected_weights_in_every_layer():
    """model.align = 'exact' at eval equals the forward written by hand with enumerated E[w] (N = 5)."""
    torch.manual_seed(11)
    model = ViT(image_size=8, patch_size=4, dim=8, depth=2, heads=2, drop_ratio=0.5, schedule="constant").eval()
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

# ============================================================================ trainer: train_cifar.py


HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset", "synthetic", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
        "--dim", "32", "--depth", "2", "--heads", "2", "--patch-size", "8", "--warmup-epochs", "0.5"]
TWO_STAGES = ["--epochs", "2", "--finetune-epochs", "1", "--mc-samples", "2"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: two threads on a busy 2-core CPU can be 50x slower


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
    return argparse.Namespace(dataset=dataset, data_dir=str(data_dir), limit_train=None, limit_test=None, seed=0)


def _tarball(tmp_path, name):
    """data/ holding only the tarball of a small real-format CIFAR folder; returns (data_dir, tarball, written)."""
    written = _write_cifar(tmp_path / "staging", name)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tarball = data_dir / os.path.basename(train_cifar.CIFAR[name]["url"])
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "staging" / train_cifar.CIFAR[name]["folder"], arcname=train_cifar.CIFAR[name]["folder"])
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
    assert data["classes"] == spec["classes"]
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
    with pytest.raises(train_cifar.DataError, match="has no cifar-10-batches-py/ inside"):
        train_cifar.load_data(_cfg("cifar10", data_dir), torch.device("cpu"))
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]


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
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: {batch} is not a valid CIFAR batch file")


class _Payload:
    """Calls `call` when unpickled: what a hostile file would do."""

    def __init__(self, *call):
        self.call = call

    def __reduce__(self):
        return self.call


def _payloads(target):
    return {"builtins.open": (builtins.open, (str(target), "w")), "os.system": (os.system, (f"touch {target}",))}


@pytest.mark.parametrize("call", ["builtins.open", "os.system"])
def test_trainer_hostile_batch_file_is_refused_before_it_runs(tmp_path, call):
    target, batch = tmp_path / "pwned", tmp_path / "data_batch_1"
    batch.write_bytes(_py2_pickle({b"data": _Payload(*_payloads(target)[call]), b"labels": []}))
    name = call.split(".")[1]                                            # pickled as __builtin__.open, posix.system
    refused = rf"{re.escape(str(batch))} is not a valid .*refused \S*\.{name}:"
    with pytest.raises(train_cifar.DataError, match=refused):
        train_cifar.read_batch(str(batch), train_cifar.CIFAR["cifar10"])
    assert not target.exists()
    loaded = pickle.loads(batch.read_bytes(), encoding="latin1")        # the payload is live: a plain load runs it
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
    (x_train, y_train), (x_test, y_test) = train_cifar.synthetic(3000, 0, "train"), train_cifar.synthetic(2000, 0, "test")

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
    assert 16 <= flips <= 48                                             # Binomial(64, 0.5): mean 32, 4 sigma = 16


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
    run = subprocess.run([sys.executable, "train_cifar.py", *TINY, *TWO_STAGES, "--occlusion", "--attention-map",
                          "--out", str(out)], cwd=HERE, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_acc", "test_acc_finetuned", "test_acc_mc"):
        assert 0.0 <= metrics[key] <= 1.0
    entropy = metrics["cls_attention_entropy"]                           # N = 1 + 4 * 4 = 17 keys
    assert len(entropy) == 2 and all(0.0 < e <= math.log(17) + 1e-6 for e in entropy)
    assert list(metrics["occlusion"]) == ["0.0", "0.1", "0.3", "0.5", "0.7", "0.9"]
    assert metrics["images_per_s"] > 0 and metrics["train_time_s"] > 0 and metrics["finished"]
    assert metrics["config"]["dim"] == 32 and metrics["config"]["mode"] == "dropkey"
    assert metrics["torch"] == torch.__version__ and metrics["device"] == "cpu"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"]) for r in rows] == [(1, "train"), (2, "train"), (3, "finetune")]
    assert rows[2]["lr"] == 1e-5 and rows[1]["test_acc"] == metrics["test_acc"]
    assert (out / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
    assert sorted(os.listdir(out)) == ["attention.png", "checkpoint.pt", "log.jsonl", "metrics.json"]  # no .tmp
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
    return metrics, [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s", "eval_s")} for r in rows]


@pytest.mark.parametrize("stop_at", [1, 2])  # in the second training epoch, in the fine-tune epoch
def test_trainer_resume_ends_bit_identical_to_an_uninterrupted_run(uninterrupted_run, tmp_path, monkeypatch, stop_at):
    out, real = tmp_path / "run", train_cifar.train_one_epoch

    def interrupted(model, optimizer, data, cfg, epoch, *rest):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return real(model, optimizer, data, cfg, epoch, *rest)

    monkeypatch.setattr(train_cifar, "train_one_epoch", interrupted)
    with _one_thread(), pytest.raises(SystemExit, match=f"continue with: python train_cifar.py --resume {out}"):
        train_cifar.main(TINY + TWO_STAGES + ["--out", str(out)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == stop_at
    monkeypatch.undo()
    with _one_thread():
        train_cifar.main(["--resume", str(out)])
    assert _without_timing(out) == _without_timing(uninterrupted_run)
    resumed, whole = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (out, uninterrupted_run))
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


# ============================================================================ course companion: README

README = pathlib.Path(__file__).resolve().parent / "README.md"
SHELL_STOPS = {";", "&&", "||", "|", "&", ">", ">>", "<"}  # a command ends at the first of these


def _readme_train_commands(text):
    """Every `python train_cifar.py` command of a README as (source line, argv), shell variables expanded.

    Reads fenced code blocks, in order, then inline code spans, as one shell
    session: backslash continuations are joined, `NAME="..."` sets a variable,
    `for NAME in a b; do` gives NAME each of its values, and a command that
    uses $NAME is expanded once per value (every combination for several).
    An unknown variable is left as $NAME, for the caller to reject.
    """
    commands, shell = [], {}                                             # shell: name -> list of values
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    inline = re.findall(r"`(python train_cifar\.py[^`]*)`", prose)
    for block in fenced + inline:
        for line in block.replace("\\\n", " ").splitlines():
            assignment = re.match(r"\s*(?:export\s+)?(\w+)=(.*)", line)
            if assignment:
                shell[assignment[1]] = [" ".join(shlex.split(assignment[2], comments=True))]
            for name, values in re.findall(r"\bfor (\w+) in ([^;]+);\s*do\b", line):
                shell[name] = values.split()
            for rest in re.findall(r"python train_cifar\.py(.*)", line):
                used = sorted(set(re.findall(r"\$\{?(\w+)\}?", rest)))
                for values in itertools.product(*(shell.get(name, ["$" + name]) for name in used)):
                    env = dict(zip(used, values))
                    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m[1]], rest)
                    lexer = shlex.shlex(expanded, posix=True, punctuation_chars=";&|<>")
                    lexer.whitespace_split, lexer.commenters = True, "#"
                    commands.append((line.strip(), list(itertools.takewhile(lambda w: w not in SHELL_STOPS, lexer))))
    return commands


def test_readme_command_extraction_expands_variables_loops_and_continuations():
    text = ('```bash\nX="--epochs 2 --seed 1"  # two words\nfor m in a b; do for s in 1 2; do\n'
            '  python train_cifar.py --mode $m \\\n    --block-size ${s} $X # note\ndone; done\n```\n'
            'See `python train_cifar.py --help`; `python train_cifar.py --out $Y && ls`.\n')
    argvs = [argv for _, argv in _readme_train_commands(text)]
    assert argvs == [["--mode", m, "--block-size", s, "--epochs", "2", "--seed", "1"]
                     for m in "ab" for s in "12"] + [["--help"], ["--out", "$Y"]]


def test_every_readme_train_command_passes_dry_run(tmp_path, monkeypatch, capsys):
    """Each README command goes through the parser and `--dry-run` (flags, model, alignment), in-process.

    `--out` and `--device cpu` are appended (argparse keeps the last value), so
    a command passes on a CPU-only machine and where its run folder exists.
    A `--resume` command needs its run, so it only goes through the parser.
    """
    commands = _readme_train_commands(README.read_text())
    assert len({line for line, _ in commands}) >= 10, "too few README commands found: is the extractor broken?"
    monkeypatch.chdir(tmp_path)                                          # `data/` or `runs/` would land here
    failures = []
    for line, argv in commands:
        if any("$" in word for word in argv):
            failures.append(f"{line}\n  a shell variable the README never sets: {argv}")
            continue
        try:
            args = train_cifar.build_parser().parse_args(argv)
            if args.resume is None:
                train_cifar.main(argv + ["--dry-run", "--out", str(tmp_path / "run"), "--device", "cpu"])
                if not capsys.readouterr().out.startswith("dry run: configuration is valid"):
                    failures.append(f"{line}\n  no 'dry run: configuration is valid'")
        except SystemExit as stop:
            if stop.code != 0 or not {"-h", "--help"} & set(argv):       # --help exits 0 by design
                failures.append(f"{line}\n  {capsys.readouterr().err.strip() or stop}")
    assert not failures, "README commands that train_cifar.py rejects:\n" + "\n".join(failures)
    assert os.listdir(tmp_path) == []                                    # a dry run reads and writes nothing


def test_readme_exercise_snippets_run_and_print_what_the_readme_says(tmp_path, monkeypatch, capsys):
    """Every `<!-- exercise-snippet -->` Python block of the README runs; key printed values are checked.

    The training snippet's train_cifar.main gets TINY and one epoch appended,
    which override its own flags: a few seconds instead of a minute.
    """
    snippets = re.findall(r"<!-- exercise-snippet -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert len(snippets) >= 6
    attention, main, sample = dropkey.attention, train_cifar.main, dropkey.sample_keep_mask
    monkeypatch.setattr(dropkey, "attention", attention)                 # restored even if a snippet fails
    shapes, patched = [], []

    def recording_sample(shape, *args, **kwargs):
        shapes.append(tuple(shape))
        return sample(shape, *args, **kwargs)

    def tiny_main(argv):
        patched.append(dropkey.attention is not attention)               # the snippet's wrapper is in place
        main(argv + TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])

    monkeypatch.setattr(dropkey, "sample_keep_mask", recording_sample)
    monkeypatch.setattr(train_cifar, "main", tiny_main)
    with _one_thread():
        for i, code in enumerate(snippets):
            exec(compile(code, f"README exercise snippet {i + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "dropkey == dropattention: True" in out                      # Exercise 1
    for how in ("enumeration", "expected_weights"):                     # Exercise 2, the values worked by hand
        c = re.search(rf"c by {how}: +tensor\(\[([^\]]*)\]", out)[1]          # printed precision may vary
        assert [round(float(x), 3) for x in c.split(",")] == [0.776, 1.118, 1.991], how
    per_query, column = (float(x) for x in re.findall(r"of the mean over queries (\S+)", out))
    assert column > 1.5 * per_query      # Exercise 8, "about twice": 2.2 measured; stds of 5000 masks are good to ~1 %
    assert patched == [True] and dropkey.attention is attention          # trained with the wrapper, then undone
    assert any(len(s) == 4 and s[2] == 1 for s in shapes)                # column masks (B, H, 1, N) were drawn
    assert (tmp_path / "run" / "metrics.json").exists()


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


# ============================================================================ per-key rates, c_j, exact alignment's edges
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
    for bad, message in [(torch.tensor([[3, 1]]), "floating-point"), (torch.tensor([[0.5, -0.1]]), "non-negative"),
                         (torch.zeros(1, 3), "positive sum")]:
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
