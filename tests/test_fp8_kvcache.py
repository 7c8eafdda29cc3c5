"""FP8 KV caches (issue 16): ``tileattn.quant``'s write rule against a rounding written from its definition, the bytes
``attention_with_kvcache`` stores for new tokens, attention over the stored cache against the float64 oracle over its
dequantized values, the argument checks, ``PagedKVCache`` and flash-attn 3's descales; on the PyTorch backends and
the Triton decode kernel.

The Triton kernel runs on the CPU through Triton's interpreter, which reads fp8 exactly but narrows to fp8 wrongly
(BLUEPRINT.md): there its output is checked against the oracle over what it stored, and its stored bytes against
``quant.quantize`` only for values the interpreter narrows exactly (fp8 codes at power-of-two scales, saturation,
NaN, zeros); every byte it writes is checked on the GPU."""

import types

import pytest
import torch

import tileattn
import tileattn.flash_attn_compat as fa
from tileattn import api, dispatch, quant
from tileattn.cache import PagedKVCache, write_kv
from tileattn.reference import gather_cache, tiled_attention
from tileattn.testing import assert_matches_oracle

from conftest import DEVICE, KERNEL_DTYPES

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]
# "head" is [Hkv], "batch_head" [B, Hkv] (flash-attn 3's descale): both per KV head, told apart by rank
GRANULARITIES = ["tensor", "head", "batch_head", "token"]
BACKENDS = ["torch", "naive"]


# ---- the write rule, from its definition ---------------------------------------------------------------------

def round_by_definition(quotient, fmt):
    """``quotient`` (fp32) stored in ``fmt`` as the rule defines it, found by search over the format's 256 codes:
    NaN stays NaN, finite values saturate to the largest finite code and go to the nearest code, a tie to the code
    whose last mantissa bit is 0. Returns the stored values in fp32."""
    codes = torch.arange(256, dtype=torch.int32)
    values = codes.to(torch.uint8).view(fmt).float()
    finite = torch.isfinite(values)
    largest = values[finite].max().item()
    target = quotient.clamp(-largest, largest).double()
    distance = (target[:, None] - values.double()[None]).abs().masked_fill(~finite[None], float("inf"))
    nearest = distance == distance.min(dim=1, keepdim=True).values
    nearest_even = nearest & (codes % 2 == 0)[None]
    pick = torch.where(nearest_even.any(1), nearest_even.float().argmax(1), nearest.float().argmax(1))
    return torch.where(torch.isnan(quotient), float("nan"), values[pick])


def ties_and_edges(fmt):
    """Exact midpoints between neighbouring finite codes (ties), the codes themselves, and values past the largest
    finite one, in fp32."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt).float()
    finite = values[torch.isfinite(values)].unique()
    largest = finite.max().item()
    return torch.cat([(finite[1:] + finite[:-1]) / 2, finite,
                      torch.tensor([largest * 1.01, largest * 1.2, largest * 7, -largest * 3])])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_quantize_rounds_to_nearest_even_and_saturates(fmt):
    # ties: a power-of-two scale keeps x / scale exactly on the midpoint
    power = 2.0 ** torch.randint(-4, 5, ()).item()
    edges = ties_and_edges(fmt)
    stored = quant.quantize((edges * power)[None, None, None], torch.tensor(power), fmt).float().flatten()
    torch.testing.assert_close(stored, round_by_definition(edges, fmt), rtol=0, atol=0)
    # random magnitudes over the whole range (subnormals and overflow included), a random scale, NaN and Inf
    exponents = torch.empty(2, 3, 8, 64).uniform_(-30, 25)
    x = torch.randn(2, 3, 8, 64) * 2.0 ** exponents
    x.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38, -3e38])  # fp16: 3e38 is inf
    scale = torch.rand(()) + 0.1
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        given = x.to(dtype)
        stored = quant.quantize(given, scale, fmt)
        assert stored.dtype == fmt and stored.shape == given.shape
        quotient = given.float() / scale
        expected = torch.where(torch.isfinite(given.float()), round_by_definition(quotient.flatten(), fmt).view_as(x),
                               float("nan"))
        torch.testing.assert_close(stored.float(), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_token_scales_follow_the_amax_rule(fmt):
    """A token's scale is the largest finite magnitude / the format's max: zeros give 1.0 and store zeros, NaN/Inf
    elements neither set the scale nor survive (stored NaN), a magnitude whose scale would be subnormal gives 1.0."""
    x = torch.randn(2, 3, 5, 16) * torch.rand(2, 3, 5, 1) * 100
    x[0, 0, 0] = 0.0
    x[0, 0, 1, 3] = float("nan")
    x[0, 1, 2, 7] = float("inf")
    x[1, 2, 4] = torch.randn(16) * 1e-40  # fp32 subnormals
    scales = quant.token_scales(x, fmt)
    assert scales.shape == (2, 3, 5) and scales.dtype == torch.float32 and torch.isfinite(scales).all()
    largest = torch.finfo(fmt).max
    for index in torch.cartesian_prod(*(torch.arange(n) for n in scales.shape)).tolist():
        finite = [abs(v) for v in x[tuple(index)].tolist() if abs(v) != float("inf") and v == v]
        expected = torch.tensor(max(finite), dtype=torch.float32) / largest
        if expected < torch.finfo(torch.float32).tiny:
            expected = torch.tensor(1.0)
        assert scales[tuple(index)] == expected, index
    stored = quant.quantize(x, scales, fmt).float()
    assert (stored[0, 0, 0] == 0).all() and scales[0, 0, 0] == 1.0 and scales[1, 2, 4] == 1.0
    assert torch.equal(torch.isnan(stored), ~torch.isfinite(x))
    assert (stored[torch.isfinite(x)].abs() <= largest).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
def test_quantize_kv_cache_round_trips_within_the_format(fmt, granularity):
    """A bf16 cache quantized by ``quantize_kv_cache`` dequantizes to within half a unit of the format's precision
    at each value (plus half its subnormal step at the scale): the amax scales saturate nothing."""
    cache = (torch.randn(3, 2, 40, 32) * torch.rand(3, 2, 40, 1) * 10).to(torch.bfloat16)
    stored, scale = quant.quantize_kv_cache(cache, fmt, granularity)
    assert stored.dtype == fmt and stored.shape == cache.shape and scale.dtype == torch.float32
    assert scale.shape == {"tensor": (), "head": (2,), "token": (3, 2, 40)}[granularity]
    assert quant.scale_granularity(scale, stored, paged=False) == granularity
    finfo = torch.finfo(fmt)
    broadcast = scale if scale.dim() == 0 else scale[:, None, None] if scale.dim() == 1 else scale[..., None]
    bound = cache.float().abs() * finfo.eps / 2 + broadcast * finfo.smallest_normal * finfo.eps / 2
    error = (quant.dequantize(stored, scale) - cache.float()).abs()
    assert (error <= bound * (1 + 1e-6)).all(), f"max error / bound {(error / bound).max().item():.3g}"


def test_calibrate_scales():
    sample = torch.randn(2, 3, 50, 16) * torch.tensor([1.0, 5.0, 20.0])[None, :, None, None]
    sample[0, 0, 0, 0] = float("nan")  # not finite: does not set a scale
    for fmt in FORMATS:
        finite = torch.where(torch.isfinite(sample), sample.abs(), 0)
        assert quant.calibrate_scales(sample, fmt, "tensor") == finite.max() / torch.finfo(fmt).max
        torch.testing.assert_close(quant.calibrate_scales(sample, fmt, "head"),
                                   finite.amax(dim=(0, 2, 3)) / torch.finfo(fmt).max, rtol=0, atol=0)
    with pytest.raises(ValueError, match="computed on write"):
        quant.calibrate_scales(sample, granularity="token")
    with pytest.raises(ValueError, match="dtype must be"):
        quant.quantize_kv_cache(sample, torch.float16)
    with pytest.raises(ValueError, match="granularity must be"):
        quant.quantize_kv_cache(sample, granularity="page")


# ---- attention over fp8 caches ---------------------------------------------------------------------------------

def random_scale(granularity, batch, kv_heads, rows, slots):
    """Random positive fp32 scales; per-token ones laid out token-major like the cache storage (a strided view)."""
    if granularity == "token":
        return (torch.rand(rows, slots, kv_heads, device=DEVICE) + 0.5).transpose(1, 2)
    shape = {"tensor": (), "head": (kv_heads,), "batch_head": (batch, kv_heads)}[granularity]
    return torch.rand(shape, device=DEVICE) + 0.5


def make_fp8_cache(b, hkv, d, *, capacity, fmts, granularities, page_size):
    """fp8 k/v caches of random stored values with random scales: contiguous ``[B, Hkv, S_max, D]`` or paged
    (shuffled block table), storage ``[rows, slots, Hkv, D]`` seen through ``transpose(1, 2)`` as in
    test_kvcache. Returns ``(k_cache, v_cache, k_scale, v_scale, block_table)``."""
    if page_size is None:
        rows, slots, table = b, capacity, None
    else:
        pages_per_seq = -(-capacity // page_size)
        rows, slots = b * pages_per_seq + 3, page_size
        table = torch.randperm(rows, device=DEVICE)[: b * pages_per_seq].view(b, pages_per_seq).to(torch.int32)
    caches = [torch.randn(rows, slots, hkv, d, device=DEVICE).to(fmt).transpose(1, 2) for fmt in fmts]
    scales = [random_scale(g, b, hkv, rows, slots) for g in granularities]
    return *caches, *scales, table


def dequantized(cache, scale, granularity, b, length, table):
    """Sequence ``b``'s first ``length`` tokens ``[Hkv, length, D]`` as the values they stand for, written out per
    granularity (independently of the library's own dequantization)."""
    tokens = gather_cache(cache, b, length, table).float()
    if granularity == "token":
        rows = scale[b] if table is None else torch.cat([scale[page] for page in table[b].tolist()], dim=1)
        return tokens * rows[:, :length, None]
    if granularity == "batch_head":
        return tokens * scale[b][:, None, None]
    if granularity == "head":
        return tokens * scale[:, None, None]
    return tokens * scale


def write_scale(granularity, scale, new, b, fmt):
    """The scale that sequence ``b``'s new tokens ``new[b:b + 1]`` are quantized with."""
    if granularity == "token":
        return quant.token_scales(new[b:b + 1], fmt)
    return scale[b:b + 1] if granularity == "batch_head" else scale


def check_stored_new_tokens(cache, before, scale, scale_before, granularity, new, lengths, table, fmt,
                            new_bytes=True):
    """The new tokens' bytes are ``quantize`` of them by the rule (per-token scales stored at their positions; the
    bytes only with ``new_bytes``, the scales always); older tokens and their scales are untouched."""
    sq = new.shape[2]
    for b, length in enumerate(lengths):
        stored = gather_cache(cache, b, length + sq, table)
        expected = quant.quantize(new[b:b + 1], write_scale(granularity, scale, new, b, fmt), fmt)[0]
        if new_bytes:
            assert torch.equal(stored[:, length:].view(torch.uint8), expected.view(torch.uint8)), f"sequence {b}"
        assert torch.equal(stored[:, :length].view(torch.uint8),
                           gather_cache(before, b, length, table).view(torch.uint8))
        if granularity == "token":
            scales = gather_cache(scale[..., None], b, length + sq, table)[..., 0]
            assert torch.equal(scales[:, length:], quant.token_scales(new[b:b + 1], fmt)[0])
            assert torch.equal(scales[:, :length], gather_cache(scale_before[..., None], b, length, table)[..., 0])


def check_against_dequantized_oracle(out, lse, q, caches, scales, granularities, lengths, table, **options):
    slopes = options.get("alibi_slopes")
    for b, length in enumerate(lengths):
        k, v = (dequantized(c, s, g, b, length, table)[None] for c, s, g in zip(caches, scales, granularities))
        if slopes is not None and slopes.dim() == 2:  # per sequence
            options["alibi_slopes"] = slopes[b:b + 1]
        assert_matches_oracle(out[b:b + 1], q[b:b + 1], k, v, lse=None if lse is None else lse[b:b + 1], **options)


def poison_allocator(shape, dtype):
    """Free a NaN-filled block the size of a call's output just before the call, so that its ``torch.empty`` output
    starts as NaN wherever the allocator hands the block back (CUDA's caching allocator does; on the CPU it is best
    effort): an element the kernel leaves unwritten then shows as NaN."""
    poison = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    del poison


def interpreter_stores_exactly(backend):
    """Whether a call on ``backend`` stores new tokens bit-exactly by the rule for any values: not the Triton kernel
    in the interpreter (whose fp8 narrowing is wrong), the GPU's and the PyTorch backends' always."""
    return backend != "triton" or DEVICE == "cuda"


def run_fp8_step(backend, fmts, granularities, page_size, append, group, sq, lengths, *, dtype=torch.float16,
                 num_splits=0, **options):
    """One ``attention_with_kvcache`` call over fresh fp8 caches, checked: stored bytes (with ``append``; for the
    Triton kernel in the interpreter its per-token scales only) and the result against the oracle over the
    dequantized stored cache. Returns the call's ``(out, lse)``."""
    b, hkv, d = len(lengths), 2, 32
    k_cache, v_cache, k_scale, v_scale, table = make_fp8_cache(b, hkv, d, capacity=80, fmts=fmts,
                                                               granularities=granularities, page_size=page_size)
    before = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    q = torch.randn(b, sq, hkv * group, d, device=DEVICE).to(dtype).transpose(1, 2)
    k_new, v_new = (torch.randn(b, hkv, sq, d, device=DEVICE) * 2 for _ in range(2))
    v_new[0, 0, -1, :4] *= 1e3  # saturates e4m3 at a per-tensor or per-head scale near 1 (a value: logits stay small)
    k_new, v_new = k_new.to(dtype), v_new.to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    poison_allocator((*q.shape[:3], d), dtype)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table,
                                               k_new=k_new if append else None, v_new=v_new if append else None,
                                               k_scale=k_scale, v_scale=v_scale, return_lse=True, backend=backend,
                                               num_splits=num_splits, **options)
    if append:
        for cache, old, scale, old_scale, g, new, fmt in zip((k_cache, v_cache), before[:2], (k_scale, v_scale),
                                                             before[2:], granularities, (k_new, v_new), fmts):
            check_stored_new_tokens(cache, old, scale, old_scale, g, new, lengths, table, fmt,
                                    new_bytes=interpreter_stores_exactly(backend))
    else:
        assert all(torch.equal(t.view(torch.uint8) if t.dtype in FORMATS else t, o.view(torch.uint8) if
                               o.dtype in FORMATS else o) for t, o in zip((k_cache, v_cache, k_scale, v_scale), before))
    total = [n + (sq if append else 0) for n in lengths]
    # The naive backend computes in q's precision, its lse included (fp16 here): the oracle's lse bound is for the
    # fp32 lse of the others; its output is checked all the same.
    check_against_dequantized_oracle(out, lse if backend != "naive" else None, q, (k_cache, v_cache),
                                     (k_scale, v_scale), granularities, total, table, **{"causal": True, **options})
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("sq", [1, 3])
def test_fp8_cache_matches_oracle_over_what_it_stores(backend, fmt, granularity, page_size, append, group, sq):
    """Decode (Sq 1) and chunked prefill / speculative verification (Sq 3), with and without new tokens written."""
    lengths = [0, 9, 70] if sq == 1 else [5, 17, 70]
    run_fp8_step(backend, (fmt, fmt), (granularity, granularity), page_size, append, group, sq, lengths)


@pytest.mark.parametrize("page_size", [None, 16])
def test_k_and_v_may_differ_in_format_and_granularity(page_size):
    run_fp8_step("torch", (torch.float8_e4m3fn, torch.float8_e5m2), ("token", "batch_head"), page_size, True, 4, 3,
                 [3, 40])
    run_fp8_step("torch", (torch.float8_e5m2, torch.float8_e4m3fn), ("tensor", "token"), page_size, True, 2, 1,
                 [0, 33])


@pytest.mark.parametrize("backend, granularity", [("torch", g) for g in GRANULARITIES]
                         + [("triton", "head"), ("triton", "token")])
@pytest.mark.parametrize("options", [dict(window=(20, None)), dict(softcap=3.0), dict(causal=False),
                                     dict(window=(6, 2), causal=False), "sinks", "alibi"], ids=str)
def test_fp8_options(backend, granularity, options):
    """Windows, softcap, non-causal, sinks and ALiBi (per head on the PyTorch path, per batch and head on the
    kernel's, over two key splits) over fp8 caches."""
    hq = 8
    if options == "sinks":
        options = dict(sinks=torch.randn(hq, device=DEVICE))
    elif options == "alibi":
        options = dict(alibi_slopes=torch.rand(*((2, hq) if backend == "triton" else (hq,)), device=DEVICE))
    splits = dict(num_splits=2) if backend == "triton" else {}
    run_fp8_step(backend, (torch.float8_e4m3fn,) * 2, (granularity,) * 2, 16, True, hq // 2, 3, [30, 64], **splits,
                 **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_with_other_query_dtypes(dtype, backend):
    run_fp8_step(backend, (torch.float8_e4m3fn, torch.float8_e5m2), ("token", "head"), 16, True, 4, 3, [11, 50],
                 dtype=dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nan_and_inf_new_tokens_are_stored_as_nan(fmt, granularity):
    """A NaN key element makes every row that sees it NaN; an Inf value element makes NaN that output column of the
    rows that see it; an all-zero token stores zeros (with per-token scales: scale 1.0); the rest stays exact."""
    lengths = [12, 20, 7]
    k_cache, v_cache, k_scale, v_scale, table = make_fp8_cache(3, 2, 32, capacity=40, fmts=(fmt, fmt),
                                                               granularities=(granularity,) * 2, page_size=None)
    q = torch.randn(3, 4, 1, 32, device=DEVICE, dtype=torch.float16)
    k_new, v_new = (torch.randn(3, 2, 1, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
    k_new[0, 1, 0, 5] = float("nan")
    v_new[1, 0, 0, 3] = float("inf")
    k_new[2], v_new[2] = 0.0, 0.0
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    before = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               k_scale=k_scale, v_scale=v_scale, return_lse=True, backend="torch")
    for cache, old, scale, old_scale, new in ((k_cache, before[0], k_scale, before[2], k_new),
                                              (v_cache, before[1], v_scale, before[3], v_new)):
        check_stored_new_tokens(cache, old, scale, old_scale, granularity, new, lengths, None, fmt)
    assert torch.isnan(k_cache[0, 1, 12, 5].float()) and torch.isnan(v_cache[1, 0, 20, 3].float())
    assert (k_cache[2, :, 7].float() == 0).all() and (v_cache[2, :, 7].float() == 0).all()
    assert torch.isfinite(k_scale).all() and torch.isfinite(v_scale).all()
    if granularity == "token":
        assert (k_scale[2, :, 7] == 1.0).all() and (v_scale[2, :, 7] == 1.0).all()
    assert torch.isnan(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()  # heads 2, 3 read KV head 1
    assert torch.isnan(out[1, :2, :, 3]).all() and torch.isfinite(out[1, 2:]).all()
    assert torch.isfinite(out[1, :2, :, :3]).all() and torch.isfinite(out[2]).all()
    finite = [(2, slice(None)), (1, slice(2, None)), (0, slice(0, 2))]
    for b, heads in finite:
        k, v = (dequantized(c, s, granularity, b, lengths[b] + 1, None)[None]
                for c, s in ((k_cache, k_scale), (v_cache, v_scale)))
        group_heads = range(*heads.indices(4))
        kv_heads = sorted({h // 2 for h in group_heads})
        assert_matches_oracle(out[b:b + 1, heads], q[b:b + 1, heads], k[:, kv_heads], v[:, kv_heads], causal=True,
                              lse=lse[b:b + 1, heads])


def test_queries_get_gradients_over_an_fp8_cache():
    """q's gradient is that of attention over the dequantized cache; quantization rounds, so the written tokens pass
    none back."""
    k_cache, v_cache, k_scale, v_scale, _ = make_fp8_cache(2, 2, 16, capacity=30, fmts=(torch.float8_e4m3fn,) * 2,
                                                           granularities=("token",) * 2, page_size=None)
    q = torch.randn(2, 4, 2, 16, device=DEVICE, requires_grad=True)
    k_new, v_new = (torch.randn(2, 2, 2, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    seqlens = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)
    out = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, k_scale=k_scale,
                                          v_scale=v_scale)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grad_q = q.grad
    for b, length in enumerate([7, 22]):
        k, v = (dequantized(c, s, "token", b, length, None)[None] for c, s in ((k_cache, k_scale), (v_cache, v_scale)))
        qb = q[b:b + 1].detach().requires_grad_()
        (expected,) = torch.autograd.grad(tiled_attention(qb, k, v, causal=True), qb, grad_out[b:b + 1])
        torch.testing.assert_close(grad_q[b:b + 1], expected)
    assert k_new.grad is None and v_new.grad is None


# ---- the Triton decode kernel over fp8 caches -------------------------------------------------------------------

# (group, sq, append, num_splits): GQA decode writing its token; chunked prefill / speculative verification (Sq 3)
# merged over 3 key splits; attending without new tokens over 2 splits (the empty cache's rows then see no key).
TRITON_STEPS = [(4, 1, True, 0), (1, 3, True, 3), (4, 2, False, 2)]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("group, sq, append, num_splits", TRITON_STEPS)
def test_triton_fp8_cache_matches_oracle_over_what_it_stores(fmt, granularity, page_size, group, sq, append,
                                                              num_splits):
    """Lengths 0 (an empty cache), 17 and 70 (ragged last blocks); the new tokens' bytes are checked on the GPU."""
    run_fp8_step("triton", (fmt, fmt), (granularity, granularity), page_size, append, group, sq, [0, 17, 70],
                 num_splits=num_splits)


@pytest.mark.parametrize("page_size", [None, 16, 32])  # 32: whole key blocks of the interpreter's tile per page
def test_triton_k_and_v_may_differ_in_format_and_granularity(page_size):
    run_fp8_step("triton", (torch.float8_e4m3fn, torch.float8_e5m2), ("token", "batch_head"), page_size, True, 4, 3,
                 [3, 40])
    run_fp8_step("triton", (torch.float8_e5m2, torch.float8_e4m3fn), ("tensor", "token"), page_size, True, 2, 1,
                 [0, 33], num_splits=2)


@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float16], ids=str)  # bf16 on the GPU
def test_triton_fp8_cache_with_other_query_dtypes(dtype):
    run_fp8_step("triton", (torch.float8_e4m3fn, torch.float8_e5m2), ("token", "head"), 16, True, 4, 3, [11, 50],
                 dtype=dtype)


@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32], ids=str)
def test_triton_per_token_v_scales_past_fp16s_range(dtype):
    """The kernel takes ``P @ V`` over an fp8 V in fp16, the weights times their per-token scales included; where a
    key tile's scales could take those past fp16's range (here scales near 1000, times the e4m3 headroom 256) it
    takes that tile in bf16. Tiles of both kinds in one call, fp16 and bf16 q: the oracle's result, finite."""
    fmt, lengths = torch.float8_e4m3fn, [70, 45]
    k_cache, v_cache, k_scale, v_scale, _ = make_fp8_cache(2, 2, 32, capacity=80, fmts=(fmt, fmt),
                                                           granularities=("token", "token"), page_size=None)
    v_scale[:, :, :40] *= 1000
    q = torch.randn(2, 1, 8, 32, device=DEVICE).to(dtype).transpose(1, 2)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_scale=k_scale, v_scale=v_scale,
                                               return_lse=True, backend="triton")
    assert out.isfinite().all()
    check_against_dequantized_oracle(out, lse, q, (k_cache, v_cache), (k_scale, v_scale), ("token", "token"),
                                     lengths, None, causal=True)


# Power-of-two scales (exponent ranges) at which fp8 codes stay exact in fp16 and moderate enough for fp16 products
# with q (the naive baseline's): e5m2's codes span 2^-16 .. 2^15, more than fp16 holds, so its smallest are left out.
EXACT_SCALE_EXPONENTS = {torch.float8_e4m3fn: (-5, -3), torch.float8_e5m2: (-11, -9)}
SMALLEST_EXACT_CODE = {torch.float8_e4m3fn: 0.0, torch.float8_e5m2: 2.0 ** -11}


def exact_scales(shape, fmt):
    low, high = EXACT_SCALE_EXPONENTS[fmt]
    return 2.0 ** torch.randint(low, high + 1, shape, device=DEVICE).float()


def exactly_stored_tokens(shape, fmt, scale=None):
    """New tokens ``[B, Hkv, Sq, D]`` (fp32, exact in fp16) whose quotients by their scale the interpreter narrows
    exactly: random finite codes of ``fmt`` (normal and, in e4m3fn, subnormal) times the scale. With a fixed
    ``scale`` (:func:`exact_scales` broadcast as ``[B or 1, Hkv or 1, 1, 1]``) every sequence but the first also gets
    a few values beyond the largest code, which saturate; without, for per-token scales (computed on write), each
    token gets one element of magnitude ``FP8_MAX * 2^e``, its amax, so that its scale is ``2^e``."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt).float()
    codes = codes[torch.isfinite(codes) & ((codes.abs() >= SMALLEST_EXACT_CODE[fmt]) | (codes == 0))]
    values = codes[torch.randint(len(codes), shape)].to(DEVICE)
    largest = quant.FP8_MAX[fmt]
    signs = torch.randint(2, (*shape[:3], 1), device=DEVICE).float() * 2 - 1
    if scale is None:
        values[..., :1] = largest * signs
        return values * exact_scales((*shape[:3], 1), fmt)
    values[1:, :, :, :3] = 1.5 * largest * signs[1:]
    return values * scale


def fixed_scale_over_tokens(scale, granularity, kv_heads):
    """A tensor, per-head or per-sequence-and-head scale as ``[B or 1, Hkv or 1, 1, 1]``."""
    return scale.view({"tensor": (1, 1), "head": (1, kv_heads), "batch_head": tuple(scale.shape)}[granularity]
                      + (1, 1))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("page_size", [None, 16])
def test_triton_stores_new_tokens_by_the_rule(fmt, granularity, page_size):
    """The kernel's write path, byte for byte against ``quant.quantize`` also in the interpreter (values it narrows
    exactly, see :func:`exactly_stored_tokens`): saturation, NaN and infinities stored as NaN (and so NaN rows), an
    all-zero token (zeros; per-token scale 1.0), per-token scales stored at the tokens' positions; a head dim the
    write's column chunks do not divide."""
    b, hkv, sq, d, lengths = 3, 2, 2, 40, [5, 21, 0]
    k_cache, v_cache, k_scale, v_scale, table = make_fp8_cache(b, hkv, d, capacity=48, fmts=(fmt, fmt),
                                                               granularities=(granularity,) * 2, page_size=page_size)
    if granularity == "token":
        k_new, v_new = (exactly_stored_tokens((b, hkv, sq, d), fmt) for _ in range(2))
    else:  # powers of two: the quotients stay codes
        k_scale, v_scale = (exact_scales(s.shape, fmt) for s in (k_scale, v_scale))
        k_new, v_new = (exactly_stored_tokens((b, hkv, sq, d), fmt, fixed_scale_over_tokens(s, granularity, hkv))
                        for s in (k_scale, v_scale))
    assert torch.equal(k_new.half().float(), k_new) and torch.equal(v_new.half().float(), v_new)
    k_new[2, 0, 0], v_new[2, 0, 0] = 0.0, 0.0  # KV head 0 of sequence 2: an all-zero token
    k_new[2, 1, 0, 5], k_new[2, 1, 1, 7], v_new[2, 1, 1, 3] = float("nan"), float("inf"), float("-inf")
    k_new, v_new = k_new.half(), v_new.half()
    q = torch.randn(b, 2 * hkv, sq, d, device=DEVICE, dtype=torch.float16)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    before = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    options = dict(causal=True, scale=0.05)  # logits of a few units over keys up to ~100
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, k_new=k_new,
                                               v_new=v_new, k_scale=k_scale, v_scale=v_scale, return_lse=True,
                                               backend="triton", **options)
    for cache, old, scale, old_scale, new in ((k_cache, before[0], k_scale, before[2], k_new),
                                              (v_cache, before[1], v_scale, before[3], v_new)):
        check_stored_new_tokens(cache, old, scale, old_scale, granularity, new, lengths, table, fmt)
    if granularity == "token":
        assert (gather_cache(k_scale[..., None], 2, 2, table)[0, 0] == 1.0).all()  # the all-zero token's
    if DEVICE == "cuda":  # the interpreter widens fp8 NaN codes to finite values (e4m3fn's to 480)
        assert torch.isnan(out[2, 2:]).all()  # query heads 2, 3 read KV head 1, whose first new key is NaN
    total = [n + sq for n in lengths]
    check_against_dequantized_oracle(out[:2], lse[:2], q[:2], (k_cache, v_cache), (k_scale, v_scale),
                                     (granularity,) * 2, total[:2], table, **options)
    k, v = (dequantized(c, s, granularity, 2, total[2], table)[None, :1]
            for c, s in ((k_cache, k_scale), (v_cache, v_scale)))
    assert_matches_oracle(out[2:, :2], q[2:, :2], k, v, lse=lse[2:, :2], **options)


def tokens_over_the_whole_range(shape, fmt, dtype, scale):
    """New tokens of every kind of magnitude: random ones from far below the smallest subnormal code to beyond the
    largest, exact ties between neighbouring codes and codes themselves at the (power-of-two) scale, fp32
    subnormals (in bf16 and fp32), zeros, NaN and infinities; ``dtype`` values."""
    x = torch.randn(shape) * 2.0 ** torch.empty(shape).uniform_(-24, 20)
    edges = ties_and_edges(fmt)
    picks = torch.rand(shape) < 0.3
    x[picks] = (edges[torch.randint(len(edges), (int(picks.sum()),))]
                * torch.where(torch.rand(int(picks.sum())) < 0.5, -1.0, 1.0))
    x = x.to(DEVICE) * scale
    if dtype != torch.float16:
        x.view(-1)[:4] = torch.tensor([1e-39, -3e-40, 1e-45, 0.0])
    x.view(-1)[4:8] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("page_size", [None, 64])
def test_triton_quantizes_every_value_as_quant_does(fmt, granularity, dtype, page_size):
    """On the GPU the kernel's bytes are ``quant.quantize``'s for any value: rounding to nearest even at exact ties,
    saturation, subnormal codes, underflow to zero, NaN and infinities; per-token scales (amax rule) likewise."""
    b, hkv, sq, d, lengths = 2, 2, 3, 128, [70, 1]
    k_cache, v_cache, k_scale, v_scale, table = make_fp8_cache(b, hkv, d, capacity=192, fmts=(fmt, fmt),
                                                               granularities=(granularity,) * 2, page_size=page_size)
    if granularity != "token":
        k_scale, v_scale = (2.0 ** torch.randint(-3, 3, s.shape, device=DEVICE).float() for s in (k_scale, v_scale))
    power = 2.0 ** torch.randint(-3, 3, ()).item()  # ties stay ties at a power-of-two scale
    k_new, v_new = (tokens_over_the_whole_range((b, hkv, sq, d), fmt, dtype, power) for _ in range(2))
    q = torch.randn(b, 4 * hkv, sq, d, device=DEVICE, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    before = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, k_new=k_new, v_new=v_new,
                                    k_scale=k_scale, v_scale=v_scale, backend="triton")
    for cache, old, scale, old_scale, new in ((k_cache, before[0], k_scale, before[2], k_new),
                                              (v_cache, before[1], v_scale, before[3], v_new)):
        check_stored_new_tokens(cache, old, scale, old_scale, granularity, new, lengths, table, fmt)


def test_auto_and_triton_take_fp8_caches():
    """``auto`` runs fp8 caches on the Triton kernel on CUDA (the tiled path on the CPU, as any KV-cache call), and
    ``backend="triton"`` takes them everywhere it runs, ALiBi and sinks included; the two agree."""
    args = make_fp8_cache(2, 2, 16, capacity=30, fmts=(torch.float8_e4m3fn,) * 2, granularities=("head",) * 2,
                          page_size=16)
    q, k_new, v_new = (torch.randn(2, h, 1, 16, device=DEVICE, dtype=torch.float16) for h in (4, 2, 2))
    seqlens = torch.tensor([3, 17], dtype=torch.int32, device=DEVICE)

    def step(backend, **extra):
        k_cache, v_cache, k_scale, v_scale, table = (t.clone() for t in args)
        out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, k_new=k_new,
                                                   v_new=v_new, k_scale=k_scale, v_scale=v_scale, return_lse=True,
                                                   backend=backend, **extra)
        check_against_dequantized_oracle(out, lse, q, (k_cache, v_cache), (k_scale, v_scale), ("head",) * 2,
                                         [4, 18], table, causal=True, **extra)
        return out, lse, k_cache, v_cache

    assert dispatch.triton_call_unsupported_reason(q, args[1], args[0]) is None
    assert dispatch.choose_backend(q, args[1], "auto", k=args[0]) == ("triton" if DEVICE == "cuda" else "torch")
    for extra in ({}, dict(alibi_slopes=torch.rand(4, device=DEVICE)), dict(sinks=torch.randn(4, device=DEVICE))):
        auto, triton = step("auto", **extra), step("triton", **extra)
        if DEVICE == "cuda":  # the same kernel
            for got, expected in zip(auto, triton):
                assert torch.equal(got.view(torch.uint8) if got.dtype in FORMATS else got,
                                   expected.view(torch.uint8) if expected.dtype in FORMATS else expected)


def test_triton_refuses_e4m3_caches_where_the_gpu_cannot_convert_them(monkeypatch):
    """Triton converts float8_e4m3fn only from compute capability 8.9 (Ada, Hopper) on: an Ampere GPU runs such
    caches on the tiled path under ``auto``, and ``backend="triton"`` says why; float8_e5m2 runs everywhere."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    cuda_q = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16)  # only its device is read
    e4m3, e5m2 = (torch.empty(1, 1, 1, 1, dtype=fmt) for fmt in FORMATS)
    reason = dispatch.quantized_cache_reason(cuda_q, e5m2, e4m3)
    assert "float8_e4m3fn KV caches need compute capability 8.9" in reason and "8.0" in reason
    assert dispatch.quantized_cache_reason(cuda_q, e5m2, e5m2) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dispatch.quantized_cache_reason(cuda_q, e4m3, e5m2) is None


@pytest.mark.parametrize("granularity", ["batch_head", "token"])
def test_fp8_decode_step_compiles(granularity):
    """Under ``torch.compile(fullgraph=True)`` the new tokens are written by PyTorch indexing (``write_kv``, the
    rule exactly) and the decode op reads the fp8 cache with its scales: the oracle over what it stored, and on the
    GPU the same bytes and result as the eager kernel."""
    caches = make_fp8_cache(2, 2, 32, capacity=64, fmts=(torch.float8_e4m3fn,) * 2,
                            granularities=(granularity,) * 2, page_size=16)
    table = caches[4]
    q = torch.randn(2, 4, 1, 32, device=DEVICE, dtype=torch.float16)
    k_new, v_new = (torch.randn(2, 2, 1, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor([10, 40], dtype=torch.int32, device=DEVICE)

    def step(q, k_new, v_new, k_cache, v_cache, k_scale, v_scale):
        return tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, k_new=k_new,
                                               v_new=v_new, k_scale=k_scale, v_scale=v_scale, return_lse=True,
                                               backend="triton")

    eager = [t.clone() for t in caches[:4]]
    expected = step(q, k_new, v_new, *eager)
    before = [t.clone() for t in caches[:4]]
    torch._dynamo.reset()
    out, lse = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")(
        q, k_new, v_new, *caches[:4])
    k_cache, v_cache, k_scale, v_scale = caches[:4]
    for cache, old, scale, old_scale, new in ((k_cache, before[0], k_scale, before[2], k_new),
                                              (v_cache, before[1], v_scale, before[3], v_new)):
        check_stored_new_tokens(cache, old, scale, old_scale, granularity, new, [10, 40], table, torch.float8_e4m3fn)
    check_against_dequantized_oracle(out, lse, q, (k_cache, v_cache), (k_scale, v_scale), (granularity,) * 2,
                                     [11, 41], table, causal=True)
    if DEVICE == "cuda":
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches[:2], eager[:2]))
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)


@pytest.mark.gpu
def test_fp8_decode_step_cuda_graph_replay():
    """A decode step over a per-token fp8 cache that writes its new token, captured in a CUDA graph: each replay
    writes and attends as an eager call does."""
    from tileattn.testing import capture_graph

    b, hkv, d = 4, 8, 128
    k_cache, v_cache, k_scale, v_scale, _ = make_fp8_cache(b, hkv, d, capacity=1024, fmts=(torch.float8_e4m3fn,) * 2,
                                                           granularities=("token",) * 2, page_size=None)
    seqlens = torch.tensor([100, 500, 900, 1000], dtype=torch.int32, device="cuda")
    q = torch.randn(b, 32, 1, d, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    caches = (k_cache, v_cache, k_scale, v_scale)

    def step(k_cache, v_cache, k_scale, v_scale):
        return tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               k_scale=k_scale, v_scale=v_scale)

    graph, out = capture_graph(lambda: step(*caches))
    for t in (q, k_new, v_new):
        t.copy_(torch.randn_like(t))  # new inputs, same buffers
    eager = [t.clone() for t in caches]
    graph.replay()
    torch.testing.assert_close(out, step(*eager), rtol=0, atol=0)
    assert all(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
               for a, b in zip(caches, eager))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_validation_names_the_argument(backend):
    """Bad scales are refused up front with the argument named, on the kernel's path as on the PyTorch one."""
    k_cache, v_cache, k_scale, v_scale, table = make_fp8_cache(2, 2, 16, capacity=32, fmts=(torch.float8_e4m3fn,) * 2,
                                                               granularities=("token",) * 2, page_size=16)
    q, k_new, v_new = (torch.randn(2, h, 1, 16, device=DEVICE, dtype=torch.float16) for h in (4, 2, 2))
    seqlens = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)

    def call(**changes):
        arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, block_table=table,
                         k_new=k_new, v_new=v_new, k_scale=k_scale, v_scale=v_scale, backend=backend)
        arguments.update(changes)
        return tileattn.attention_with_kvcache(**arguments)

    with pytest.raises(ValueError, match="need k_scale and v_scale.*v_scale missing"):
        call(v_scale=None)
    with pytest.raises(ValueError, match="k_scale and v_scale missing"):
        call(k_scale=None, v_scale=None)
    bf16 = dict(k_cache=torch.randn(11, 2, 16, 16, device=DEVICE, dtype=torch.float16),
                v_cache=torch.randn(11, 2, 16, 16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="k_scale and v_scale: scales are for fp8 KV caches only"):
        call(**bf16)
    with pytest.raises(ValueError, match="^v_scale: scales are for fp8 KV caches only"):
        call(**bf16, k_scale=None)
    with pytest.raises(TypeError, match="v_cache must be float8_e4m3fn or float8_e5m2 as well"):
        call(v_cache=bf16["v_cache"])
    with pytest.raises(TypeError, match="q must be float16, bfloat16 or float32 over an fp8 KV cache"):
        call(q=q.double(), k_new=k_new.double(), v_new=v_new.double())
    with pytest.raises(TypeError, match="k_new must be torch.float16"):
        call(k_new=k_new.float())
    with pytest.raises(TypeError, match="k_scale must be float32"):
        call(k_scale=k_scale.double())
    with pytest.raises(TypeError, match="v_scale must be a torch.Tensor"):
        call(v_scale=1.0)
    with pytest.raises(ValueError, match="k_scale must be on the cache's device"):
        call(k_scale=torch.empty(k_scale.shape, device="meta"))
    pages = k_cache.shape[0]
    with pytest.raises(ValueError, match=rf"v_scale must be 0-d .*\[2\] or \[2, 2\].*\[{pages}, 2, 16\] = \[num_pages"):
        call(v_scale=torch.ones(2, 2, 32, device=DEVICE))  # a contiguous cache's per-token shape, for a paged one
    with pytest.raises(ValueError, match=r"k_scale must be 0-d"):
        call(k_scale=torch.ones(pages, 2, device=DEVICE))  # [num_pages, Hkv] is no granularity: [B, Hkv] is
    broadcast = torch.ones(pages, 2, 1, device=DEVICE).expand(pages, 2, 16)
    with pytest.raises(ValueError, match=r"k_scale must be writable.*k_new.*stride 0"):
        call(k_scale=broadcast)
    call(k_scale=broadcast, k_new=None, v_new=None)  # only read: fine
    with pytest.raises(ValueError, match=r"v_scale must not require grad.*v_new"):
        call(v_scale=v_scale.clone().requires_grad_())
    call()


def test_a_cached_fp8_signature_lets_no_bad_scale_through():
    """Validated calls are cached by signature: scales are part of it, so a call that differs only in its scales (or
    drops them, or adds them to another cache) is checked again."""
    api._prepared.clear()
    k_cache, v_cache, k_scale, v_scale, table = make_fp8_cache(1, 2, 16, capacity=16, fmts=(torch.float8_e5m2,) * 2,
                                                               granularities=("token",) * 2, page_size=None)
    q, k_new, v_new = (torch.randn(1, h, 1, 16, device=DEVICE, dtype=torch.float16) for h in (2, 2, 2))
    seqlens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    bf16 = torch.randn(1, 2, 16, 16, device=DEVICE, dtype=torch.float16)

    def call(k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale):
        return tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               k_scale=k_scale, v_scale=v_scale)

    for _ in range(2):
        call()
        tileattn.attention_with_kvcache(q, bf16, bf16, seqlens, k_new=k_new, v_new=v_new)
    with pytest.raises(ValueError, match="need k_scale and v_scale"):
        call(k_scale=None, v_scale=None)
    with pytest.raises(ValueError, match="scales are for fp8 KV caches only"):
        call(k_cache=bf16, v_cache=bf16)
    with pytest.raises(ValueError, match="writable"):
        call(k_scale=k_scale[..., :1].expand(k_scale.shape))
    with pytest.raises(ValueError, match="must not require grad"):
        call(v_scale=v_scale.clone().requires_grad_())
    with pytest.raises(TypeError, match="float32"):
        call(v_scale=v_scale.double())
    api._prepared.clear()


# ---- PagedKVCache and flash-attn 3's descales --------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_paged_fp8_cache_serving_loop(granularity, fmt, backend):
    """Prompts appended (quantized on write), then decode and chunked-prefill steps through
    ``PagedKVCache.attention`` (the kernel writing each step's tokens), each against the oracle over what the pools
    store."""
    fixed = {} if granularity == "token" else dict(
        k_scale=quant.calibrate_scales(torch.randn(1, 2, 64, 32) * 3, fmt, granularity),
        v_scale=quant.calibrate_scales(torch.randn(1, 2, 64, 32), fmt, granularity))
    cache = PagedKVCache(num_pages=12, page_size=8, kv_heads=2, head_dim=32, max_seqs=3, max_pages_per_seq=5,
                         dtype=fmt, device=DEVICE, scale_granularity=granularity, **fixed)
    seqs = [cache.add_sequence() for _ in range(2)]
    for seq, n in zip(seqs, (13, 4)):
        k, v = (torch.randn(2, n, 32, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        cache.append(seq, k, v)
        stored = gather_cache(cache.k_pool.transpose(1, 2), 0, n, cache.block_table[seq:seq + 1])
        scale = cache.kernel_args([seq])["k_scale"]
        expected = quant.quantize(k[None], quant.token_scales(k[None], fmt) if granularity == "token" else scale,
                                  fmt)[0]
        assert torch.equal(stored.view(torch.uint8), expected.view(torch.uint8))
    for sq in (1, 3, 1):
        q = torch.randn(2, 4, sq, 32, device=DEVICE, dtype=torch.float16)
        k_new, v_new = (torch.randn(2, 2, sq, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
        out, lse = cache.attention(seqs, q, k_new=k_new, v_new=v_new, return_lse=True, backend=backend)
        args = cache.kernel_args(seqs)
        lengths = args["cache_seqlens"].tolist()
        check_against_dequantized_oracle(out, lse, q, (args["k_cache"], args["v_cache"]),
                                         (args["k_scale"], args["v_scale"]), (granularity,) * 2, lengths,
                                         args["block_table"], causal=True)
    with pytest.raises(ValueError, match="k_scale is needed with scale_granularity"):
        PagedKVCache(4, 8, 2, 32, max_seqs=1, max_pages_per_seq=2, dtype=fmt, scale_granularity="tensor")
    with pytest.raises(ValueError, match="computed as tokens are written"):
        PagedKVCache(4, 8, 2, 32, max_seqs=1, max_pages_per_seq=2, dtype=fmt, k_scale=1.0, v_scale=1.0)
    with pytest.raises(ValueError, match="are for fp8 pools"):
        PagedKVCache(4, 8, 2, 32, max_seqs=1, max_pages_per_seq=2, scale_granularity="token")
    with pytest.raises(TypeError, match="k must be torch.float16 or torch.bfloat16 or torch.float32"):
        cache.append(seqs[0], torch.zeros(2, 1, 32, device=DEVICE).to(fmt), torch.zeros(2, 1, 32, device=DEVICE))


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("new", [2, 5])  # as many new keys as queries (the fused path), or more
def test_flash_attn_with_kvcache_descales(paged, new):
    """flash-attn 3's ``k_descale``/``v_descale`` ``[B, Hkv]`` over fp8 caches ``[B, S, Hkv, D]`` (or pages): the
    same tokens stored and the same result as ``attention_with_kvcache`` with them as scales."""
    b, hkv, d, cached = 2, 2, 32, [9, 20]
    fmt = torch.float8_e4m3fn
    shape = (8, 16, hkv, d) if paged else (b, 32, hkv, d)
    table = torch.tensor([[3, 0], [5, 6]], dtype=torch.int32, device=DEVICE) if paged else None
    k_cache, v_cache = (torch.randn(shape, device=DEVICE).to(fmt) for _ in range(2))
    k_descale, v_descale = (torch.rand(b, hkv, device=DEVICE) + 0.5 for _ in range(2))
    q = torch.randn(b, 2, 4, d, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(b, new, hkv, d, device=DEVICE, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor(cached, dtype=torch.int32, device=DEVICE)
    mine = [t.clone() for t in (k_cache, v_cache)]
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                         causal=True, return_softmax_lse=True, k_descale=k_descale,
                                         v_descale=v_descale)
    heads_first = [t.transpose(1, 2) for t in (*mine, k, v)]
    written = torch.tensor(cached, dtype=torch.int32, device=DEVICE) + new - 2  # keys before the queries' own
    write_kv(heads_first[0], heads_first[1], heads_first[2][:, :, :new - 2], heads_first[3][:, :, :new - 2], seqlens,
             table, k_scale=k_descale, v_scale=v_descale)
    expected, expected_lse = tileattn.attention_with_kvcache(
        q.transpose(1, 2), heads_first[0], heads_first[1], written, block_table=table,
        k_new=heads_first[2][:, :, new - 2:], v_new=heads_first[3][:, :, new - 2:], k_scale=k_descale,
        v_scale=v_descale, causal=True, return_lse=True)
    assert torch.equal(k_cache.view(torch.uint8), mine[0].view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), mine[1].view(torch.uint8))
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
    with pytest.raises(ValueError, match="need k_descale and v_descale"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
    with pytest.raises(ValueError, match=r"v_descale must be \[B, Hkv\] as in flash-attn 3"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, k_descale=k_descale,
                                   v_descale=torch.ones(shape[:3], device=DEVICE))
    with pytest.raises(ValueError, match="k_descale: scales are for fp8 KV caches only"):
        fa.flash_attn_with_kvcache(q, k, k, cache_seqlens=0, k_descale=k_descale)
    # new keys in another dtype than q's: refused before anything is written (by either path's check)
    with pytest.raises(TypeError, match="k and v must have q's dtype" if new != 2 else "k_new must be torch.float16"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k.float(), v.float(), cache_seqlens=seqlens,
                                   block_table=table, k_descale=k_descale, v_descale=v_descale)
    assert torch.equal(k_cache.view(torch.uint8), mine[0].view(torch.uint8))


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_a_needle_among_128k_keys_is_retrieved_as_with_bf16(granularity):
    """One key aligned with the query among 2^17 random ones (its weight about 0.85 after the softmax): over the fp8
    cache, split across programs, the output is the needle's value as over the bf16 cache (accumulation stays
    fp32 across key blocks and splits, where a low-precision running sum would bury the needle)."""
    length, d, group = 1 << 17, 128, 4
    generator = torch.Generator(device=DEVICE).manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, generator=generator)

    direction = torch.nn.functional.normalize(randn(d), dim=0)
    q = (direction * d ** 0.5).expand(1, group, 1, d).to(torch.bfloat16)  # scores u . k: N(0, 1), the needle 14
    k, v = randn(1, 1, length, d), randn(1, 1, length, d)
    needle = int(torch.randint(length, (1,), device=DEVICE, generator=generator))
    k[0, 0, needle] = 14 * direction
    v[0, 0, needle] = 4 * torch.nn.functional.normalize(randn(d), dim=0) * d ** 0.5
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    seqlens = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    (k8, k_scale), (v8, v_scale) = (quant.quantize_kv_cache(t, torch.float8_e4m3fn, granularity) for t in (k, v))
    bf16 = tileattn.attention_with_kvcache(q, k, v, seqlens, num_splits=16)
    fp8 = tileattn.attention_with_kvcache(q, k8, v8, seqlens, k_scale=k_scale, v_scale=v_scale, num_splits=16)
    target = v[0, 0, needle].float()
    for out in (bf16, fp8):
        cosine = torch.nn.functional.cosine_similarity(out[0, :, 0].float(), target[None], dim=-1)
        assert (cosine > 0.95).all(), cosine
    assert ((fp8.float() - bf16.float()).norm() / bf16.float().norm()).item() < 0.05
