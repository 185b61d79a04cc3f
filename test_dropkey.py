"""Tests for dropkey.py, vit.py, train_cifar.py and theory.ipynb.

Statistical tests use fixed seeds and state their tolerance: a realised rate
over n Bernoulli(d) draws must lie within 4 sigma = 4 sqrt(d (1 - d) / n).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import dropkey
from vit import ViT

# ============================================================================ core: dropkey.py, vit.py

def _qkv(B=4, H=3, N=17, D=8, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def _reference(q, k, v, keep, mode, d):
    """Independent reference: Eq. 2 softmax, then zero dropped weights and re-normalise (Eq. 1) or rescale."""
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    keep = keep | ~keep.any(-1, keepdim=True)         # the all-dropped rule, written again
    w = p * keep
    w = w / (1 - d) if mode == "vanilla" else w / w.sum(-1, keepdim=True)
    return w @ v, w


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
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
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
    ref_out, ref_w = _reference(q, k, v, keep, "dropkey", 0.4)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    outs = {}
    for mode in ["dropkey", "dropattention"]:
        for fused in [True, False]:
            out = dropkey.attention(q, k, v, mode, 0.4, keep_mask=keep, fused=fused)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)
            outs[mode, fused] = out
    assert (outs["dropkey", False] - outs["dropattention", False]).abs().max() <= 1e-6
    _, w = dropkey.attention(q, k, v, "dropkey", 0.4, keep_mask=keep, return_weights=True)
    torch.testing.assert_close(w[0, 0, 3], torch.softmax(q[0, 0, 3] @ k[0, 0].T / math.sqrt(8), -1))


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
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
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
    q, k, v = _qkv(B=1, H=1, N=4, seed=23)
    d, T = 0.5, 4000
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)[0, 0].double()   # (4, 4)
    expected = torch.zeros_like(p)
    for bits in range(16):                                           # all 2^4 keep masks
        keep = torch.tensor([(bits >> j) & 1 for j in range(4)], dtype=torch.bool)
        prob = (1 - d) ** keep.sum() * d ** (~keep).sum()
        w = p * keep if keep.any() else p                           # the all-dropped rule
        expected += prob * w / w.sum(-1, keepdim=True)
    _, w = dropkey.attention(q, k, v, "dropkey", d, training=False, mc_samples=T, return_weights=True,
                             generator=torch.Generator().manual_seed(24))
    w = w[0, 0].double()
    sigma = torch.sqrt(expected * (1 - expected) / T)                # each w_j lies in [0, 1]: var <= E(1 - E)
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


@pytest.mark.parametrize("mode", dropkey.MODES)
def test_tiny_vit_overfits_one_batch_in_every_mode(mode):
    torch.manual_seed(27)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    model = ViT(dim=48, depth=2, heads=2, patch_size=8, mlp_ratio=2.0, attn_drop_mode=mode,
                drop_ratio=0.3, schedule="constant", block_size=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
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

# ============================================================================ trainer: train_cifar.py

# ============================================================================ notebook: theory.ipynb
