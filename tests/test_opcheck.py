"""PyTorch's own checks of our custom ops (``torch.library.opcheck``: schema, fake tensors, AOT dispatch with dynamic
shapes, and the autograd registration of the prefill op, whose backward is the FlashAttention backward), and
``torch.compile(fullgraph=True, dynamic=True)`` compiling once over a range of sequence lengths instead of once per
length."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import tileattn
import tileattn.ops  # noqa: F401  (registers torch.ops.tileattn.*)
from tileattn.testing import capture_graph, random_qkv

from conftest import DEVICE

# The interpreter gets bf16 wrong (BLUEPRINT.md); opcheck compares values across its runs, so keep to what runs.
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16, torch.float32]
ops = torch.ops.tileattn


def biases(kind, b, hq):
    slopes = {"alibi": torch.rand(hq, device=DEVICE), "alibi_batch": torch.rand(b, hq, device=DEVICE)}.get(kind)
    sinks = torch.randn(hq, device=DEVICE) if kind == "sinks" else None
    return slopes, sinks


PREFILL_CASES = {  # name: (mask kind, window, softcap, biases, return_lse)
    "plain": (None, (-1, -1), 0.0, None, False),
    "causal_lse": (None, (-1, 0), 0.0, None, True),
    "bool_mask": ("bool", (-1, -1), 0.0, None, True),
    "additive_padding": ("additive_keys", (-1, -1), 0.0, None, False),
    "window_softcap": (None, (5, 3), 20.0, None, True),
    "alibi": (None, (-1, 0), 0.0, "alibi_batch", True),
    "sinks": (None, (-1, -1), 0.0, "sinks", True),
}


def make_mask(kind, b, hq, sq, sk, dtype):
    if kind == "bool":
        return torch.rand(b, hq, sq, sk, device=DEVICE) > 0.3
    if kind == "additive_keys":  # a padding mask as a broadcast [B, 1, 1, Sk] view
        return torch.randn(b, 1, 1, sk, device=DEVICE).to(dtype).expand(b, hq, sq, sk)
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_op(case, dtype):
    mask_kind, window, softcap, bias_kind, return_lse = PREFILL_CASES[case]
    q, k, v = random_qkv(2, 4, 2, 40, 48, 32, dtype=dtype, device=DEVICE)
    slopes, sinks = biases(bias_kind, 2, 4)
    mask = make_mask(mask_kind, 2, 4, 40, 48, dtype)
    torch.library.opcheck(ops.prefill.default, (q, k, v, mask, 0.17, *window, softcap, return_lse, slopes, sinks))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "causal_lse", "alibi", "sinks"])
def test_prefill_varlen_op(case, dtype):
    _, window, softcap, bias_kind, return_lse = PREFILL_CASES[case]
    cu_q = torch.tensor([0, 5, 21, 30], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 21, 40], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(n, h, 32, device=DEVICE).to(dtype) for n, h in ((30, 4), (40, 2), (40, 2)))
    slopes, sinks = biases(bias_kind, 3, 4)
    torch.library.opcheck(ops.prefill_varlen.default,
                          (q, k, v, cu_q, cu_k, 16, 19, 0.17, *window, softcap, return_lse, slopes, sinks))


DECODE_CASES = {  # name: (paged, mask, window, biases, num_splits)
    "contiguous": (False, False, (-1, 0), None, 0),
    "paged": (True, False, (-1, 0), None, 0),
    "padding_mask": (False, True, (-1, -1), None, 0),
    "window_one_split": (False, False, (7, 0), None, 1),
    "alibi_sinks_splits": (False, False, (-1, 0), "alibi", 3),
    "sinks_paged": (True, False, (-1, 0), "sinks", 0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_op(case, dtype):
    paged, masked, window, bias_kind, num_splits = DECODE_CASES[case]
    b, hq, hkv, d = 2, 8, 2, 32
    q = torch.randn(b, hq, 2, d, device=DEVICE).to(dtype)
    seqlens = torch.tensor([13, 40], dtype=torch.int32, device=DEVICE)
    if paged:  # 8 pages of 8 slots, 5 per sequence
        k_cache, v_cache = (torch.randn(10, hkv, 8, d, device=DEVICE).to(dtype) for _ in range(2))
        table = torch.tensor([[3, 0, 7, 1, 9], [2, 4, 5, 6, 8]], dtype=torch.int32, device=DEVICE)
        capacity = 40
    else:
        k_cache, v_cache = (torch.randn(b, hkv, 48, d, device=DEVICE).to(dtype) for _ in range(2))
        table, capacity = None, 48
    mask = (torch.rand(b, 1, 1, capacity, device=DEVICE) > 0.2).expand(b, hq, 2, capacity) if masked else None
    slopes, sinks = biases(bias_kind, b, hq)
    if bias_kind == "alibi":
        sinks = torch.randn(hq, device=DEVICE)
    torch.library.opcheck(ops.decode.default, (q, k_cache, v_cache, seqlens, table, mask, 0, 0.17, *window, 0.0, True,
                                              num_splits, slopes, sinks))


def test_prefill_compiles_once_over_sequence_lengths():
    """dynamic=True: one graph for every length of the prefill-shaped class, values equal to eager's."""
    counter = CompileCounter()
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def f(q, k, v):
        return tileattn.attention(q, k, v, causal=True, backend="triton")

    for s in (70, 97, 128, 131):
        q, k, v = random_qkv(1, 4, 2, s, s, 32, dtype=torch.float16, device=DEVICE)
        torch.testing.assert_close(f(q, k, v), tileattn.attention(q, k, v, causal=True, backend="triton"))
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 4 lengths"


def test_decode_compiles_once_over_cache_lengths_and_capacities():
    """A decode step over caches of growing capacity (a serving engine's buckets) and changing lengths: one graph."""
    counter = CompileCounter()
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def step(q, k_cache, v_cache, seqlens):
        return tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, backend="triton")

    for capacity, lengths in ((64, [5, 60]), (96, [70, 33]), (160, [159, 1])):
        q = torch.randn(2, 8, 1, 32, device=DEVICE).half()
        k_cache, v_cache = (torch.randn(2, 2, capacity, 32, device=DEVICE).half() for _ in range(2))
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        expected = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, backend="triton")
        torch.testing.assert_close(step(q, k_cache, v_cache, seqlens), expected)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 capacities"


def test_varlen_compiles_once_over_batches_of_lengths():
    counter = CompileCounter()
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def f(q, k, v, cu, longest):
        return tileattn.attention_varlen(q, k, v, cu, cu, longest, longest, causal=True, backend="triton")

    for lengths in ((7, 23, 1), (30, 2, 9), (16, 16, 40)):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        total = int(cu[-1])
        q, k, v = (torch.randn(total, h, 32, device=DEVICE).half() for h in (4, 2, 2))
        expected = tileattn.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                             backend="triton")
        torch.testing.assert_close(f(q, k, v, cu, max(lengths)), expected)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 batches"


@pytest.mark.gpu
def test_decode_with_append_replays_in_a_cuda_graph_for_changing_lengths():
    """One captured decode step (the new token written by the same launch) replayed for other lengths and inputs
    written into the same buffers: each replay appends at the current lengths and attends like an eager call."""
    b, hq, hkv, d, capacity = 3, 16, 4, 64, 256
    k_cache, v_cache = (torch.randn(b, hkv, capacity, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q, k_new, v_new = random_qkv(b, hq, hkv, 1, 1, d, dtype=torch.bfloat16, device="cuda")
    seqlens = torch.tensor([3, 100, 200], dtype=torch.int32, device="cuda")

    def step():
        return tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               check_bounds=False)

    graph, out = capture_graph(step)
    for lengths in ([4, 101, 201], [0, 7, 254], [60, 60, 60]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        for t in (q, k_new, v_new):
            t.copy_(torch.randn_like(t))
        eager_k, eager_v = k_cache.clone(), v_cache.clone()
        expected = tileattn.attention_with_kvcache(q, eager_k, eager_v, seqlens, k_new=k_new, v_new=v_new)
        graph.replay()
        torch.testing.assert_close(out, expected)
        assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["causal_lse", "bool_mask", "window_softcap", "alibi_sinks"])
def test_prefill_op_with_gradients(case, dtype):
    """The prefill op's autograd (the FlashAttention backward; the sinks get a gradient) and the backward op itself
    pass opcheck."""
    biased = case == "alibi_sinks"
    mask_kind, window, softcap, _, _ = PREFILL_CASES["causal_lse" if biased else case]
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 4, 2, 40, 48, 32, dtype=dtype, device=DEVICE))
    mask = make_mask(mask_kind, 2, 4, 40, 48, dtype)
    slopes = torch.rand(2, 4, device=DEVICE) if biased else None
    sinks = torch.randn(4, device=DEVICE, dtype=dtype, requires_grad=True) if biased else None
    torch.library.opcheck(ops.prefill.default, (q, k, v, mask, 0.17, *window, softcap, True, slopes, sinks))
    out, lse = ops.prefill(q, k, v, mask, 0.17, *window, softcap, True, slopes, sinks)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(ops.prefill_backward.default, (grad_out, grad_lse, *(t.detach() for t in (q, k, v, out)),
                                                         lse.detach(), mask, 0.17, *window, softcap, slopes,
                                                         None if sinks is None else sinks.detach()))
