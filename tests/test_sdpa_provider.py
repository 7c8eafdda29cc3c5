"""tileattn as PyTorch's SDPA flash-attention implementation (tileattn.integrations.sdpa_provider).

CPU (CI): the registration and its toggling, the behaviour on a torch without the registry, and the aten op
implementations themselves, registered for the CPU dispatch key and run through the dispatcher under Triton's
interpreter (the same functions that activation registers for CUDA). GPU: SDPA under the flash backend and
varlen_attn after activation, against the float64 oracle, with profiler traces naming the kernels that ran.
"""

import os
import subprocess
import sys

import pytest
import torch

import tileattn
from tileattn import dispatch
from tileattn.integrations import sdpa_provider as sp
from tileattn.testing import assert_gradients_match_oracle, assert_matches_oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_registry = pytest.mark.skipif(sp.registry_missing_reason() is not None,
                                    reason="this torch has no flash-attention registry")
needs_interpreter = pytest.mark.skipif(not dispatch.interpreter_enabled() or dispatch.triton_import_error() is not None,
                                       reason="runs the Triton kernels on CPU tensors (TRITON_INTERPRET=1)")
OPS = [name for name in sp._OPS if hasattr(torch.ops.aten, name)]


def _kernel_is_ours(op, key="CUDA"):
    """Whether the kernel the dispatcher holds for ``aten::op`` on ``key`` is the one sdpa_provider registered."""
    lines = [line for line in torch._C._dispatch_dump(f"aten::{op}").splitlines() if line.startswith(f"{key}:")]
    return any("sdpa_provider.py" in line for line in lines)


@pytest.fixture
def clean_registry():
    """No flash-attention implementation active before and after the test."""
    attention = sp._registry()
    if attention is not None:
        attention.restore_flash_attention_impl(_raise_warn=False)
    yield attention
    if attention is not None:
        attention.restore_flash_attention_impl(_raise_warn=False)


# ---- registration (CPU) ------------------------------------------------------------------------------------------

@needs_registry
def test_registered_on_import_and_not_activated():
    code = ("import torch.nn.attention as a, tileattn; "
            "print(a.list_flash_attention_impls()); print(a.current_flash_attention_impl())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr
    impls, current = result.stdout.strip().splitlines()[-2:]
    assert "'TILEATTN'" in impls
    assert current == "None"


@needs_registry
def test_use_for_sdpa_and_restore_toggle_the_registry(clean_registry):
    attention = clean_registry
    assert not sp.is_active() and not any(_kernel_is_ours(op) for op in OPS)
    message = tileattn.use_for_sdpa(verbose=False)
    assert "now run tileattn's Triton kernels" in message and "restore_sdpa" in message
    assert attention.current_flash_attention_impl() == "TILEATTN" and sp.is_active()
    assert all(_kernel_is_ours(op) for op in OPS), torch._C._dispatch_dump("aten::_flash_attention_forward")
    assert not _kernel_is_ours("_scaled_dot_product_flash_attention", "CPU")  # CUDA only
    tileattn.use_for_sdpa(verbose=False)  # twice: still one set of kernels, still active
    assert attention.current_flash_attention_impl() == "TILEATTN"
    assert "own kernels again" in tileattn.restore_sdpa(verbose=False)
    assert attention.current_flash_attention_impl() is None and not any(_kernel_is_ours(op) for op in OPS)
    assert "was not active" in tileattn.restore_sdpa(verbose=False)


@needs_registry
def test_torch_activate_and_restore_reach_the_same_kernels(clean_registry):
    attention = clean_registry
    attention.activate_flash_attention_impl("TILEATTN")
    assert sp.is_active() and all(_kernel_is_ours(op) for op in OPS)
    attention.restore_flash_attention_impl()
    assert not sp.is_active() and not any(_kernel_is_ours(op) for op in OPS)


@needs_registry
def test_use_for_sdpa_prints_what_it_did(clean_registry, capsys):
    message = tileattn.use_for_sdpa()
    assert capsys.readouterr().out.strip() == message
    restored = tileattn.restore_sdpa()
    assert capsys.readouterr().out.strip() == restored


class _OtherHandle:
    removed = False

    def remove(self):
        self.removed = True


@needs_registry
def test_another_provider_is_replaced_and_left_alone_by_restore(clean_registry, monkeypatch):
    from torch.nn.attention import _registry

    attention = clean_registry
    handle = _OtherHandle()
    monkeypatch.setitem(_registry._FLASH_ATTENTION_IMPLS, "OTHER", lambda: handle)
    attention.activate_flash_attention_impl("OTHER")
    assert "was not active" in tileattn.restore_sdpa(verbose=False) and "OTHER is active" in \
        tileattn.restore_sdpa(verbose=False)
    assert attention.current_flash_attention_impl() == "OTHER" and not handle.removed
    assert "replaced OTHER" in tileattn.use_for_sdpa(verbose=False)
    assert handle.removed and sp.is_active()


def _drop_registry(monkeypatch):
    import torch.nn.attention as attention

    monkeypatch.delattr(attention, "register_flash_attention_impl", raising=False)
    monkeypatch.delattr(attention, "activate_flash_attention_impl", raising=False)


def test_without_registry_nothing_fails_and_the_message_is_clear(monkeypatch):
    _drop_registry(monkeypatch)
    reason = sp.registry_missing_reason()
    assert torch.__version__ in reason and "register_flash_attention_impl" in reason and "torch >= 2.10" in reason
    assert sp.register() is False and sp.is_active() is False
    with pytest.warns(UserWarning, match="not activated for SDPA, nothing changed: torch .* has no flash-attention"):
        message = tileattn.use_for_sdpa(verbose=False)
    assert "torch >= 2.10" in message
    with pytest.raises(RuntimeError, match="no flash-attention registry"):
        tileattn.use_for_sdpa(strict=True, verbose=False)
    assert "nothing to restore" in tileattn.restore_sdpa(verbose=False)


def test_import_without_registry_succeeds():
    code = ("import warnings, torch.nn.attention as a; del a.register_flash_attention_impl; import tileattn; "
            "warnings.simplefilter('ignore'); print(tileattn.use_for_sdpa(verbose=False))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr
    assert "not activated for SDPA" in result.stdout


@needs_registry
def test_without_triton_activation_raises_clearly(clean_registry, monkeypatch):
    monkeypatch.setattr(sp, "_triton_missing_reason", lambda: "tileattn's SDPA implementation runs Triton kernels, "
                                                              "and Triton is not installed")
    with pytest.warns(UserWarning, match="Triton is not installed"):
        tileattn.use_for_sdpa(verbose=False)
    assert not sp.is_active()
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        clean_registry.activate_flash_attention_impl("TILEATTN")
    assert not sp.is_active() and not any(_kernel_is_ours(op) for op in OPS)


# ---- the op implementations through the dispatcher, on CPU (Triton's interpreter) -------------------------------

@pytest.fixture
def cpu_kernels():
    """tileattn's flash-op implementations registered for CPU tensors for the test's duration."""
    lib = sp.register_kernels("CPU")
    yield
    lib._destroy()


def _qkv(b, hq, hkv, sq, sk, d, dtype, device="cpu", layout="bhsd"):
    def make(h, s):
        if layout == "bshd":  # a [B, S, H, D] buffer seen as [B, H, S, D]
            return torch.randn(b, s, h, d, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(b, h, s, d, dtype=dtype, device=device)

    return make(hq, sq), make(hkv, sk), make(hkv, sk)


def _sdpa_op(q, k, v, causal=False, scale=None):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=causal, scale=scale)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,hq,hkv,d", [(17, 17, 2, 2, 64), (33, 70, 4, 2, 64), (70, 33, 2, 1, 40),
                                             (1, 45, 4, 1, 64)])
def test_sdpa_op_forward_matches_oracle(cpu_kernels, dtype, causal, sq, sk, hq, hkv, d):
    q, k, v = _qkv(2, hq, hkv, sq, sk, d, dtype, layout="bshd" if d == 40 else "bhsd")
    out, lse, cum_q, cum_k, max_q, max_k, rng_state, offset, debug_mask = _sdpa_op(q, k, v, causal)
    assert out.stride() == torch.empty_like(q).stride()  # the query's memory layout, as the meta function says
    assert_matches_oracle(out, q, k, v, lse=lse, causal=causal)  # causal is bottom-right, as FlashAttention-2's
    assert lse.is_contiguous() and cum_q is None and cum_k is None and (max_q, max_k) == (sq, sk)


@needs_interpreter
def test_sdpa_op_outputs_match_the_meta_function(cpu_kernels):
    q, k, v = _qkv(2, 4, 2, 19, 23, 64, torch.float16)
    got = _sdpa_op(q, k, v, True, 0.3)
    meta = _sdpa_op(q.to("meta"), k.to("meta"), v.to("meta"), True, 0.3)
    for g, m in zip(got, meta, strict=True):
        if isinstance(m, torch.Tensor):
            assert (g.shape, g.dtype, g.stride()) == (m.shape, m.dtype, m.stride())
        else:
            assert g == m
    assert torch.equal(got[6], torch.zeros(2, dtype=torch.uint64)) and got[7].item() == 0


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_op_backward_matches_oracle(cpu_kernels, causal):
    q, k, v = _qkv(1, 4, 2, 37, 53, 64, torch.float32)

    def ours(q, k, v):
        out, lse = _sdpa_op(q, k, v, causal, 0.2)[:2]
        return out, lse.detach()  # the op's lse is not differentiable

    def reference(q, k, v):  # plain PyTorch, differentiated in float64 and in the inputs' precision
        out, lse = tileattn.reference.naive_attention(q, k, v, causal=causal, scale=0.2, return_lse=True)
        return out, lse.detach()

    assert_gradients_match_oracle(ours, (q, k, v), oracle=reference, names=("dq", "dk", "dv"), keys=53)


@needs_interpreter
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (7, 0), (5, 3)])
def test_flash_forward_dense_bshd_with_windows(cpu_kernels, window):
    q, k, v = _qkv(2, 4, 2, 29, 41, 64, torch.float16, layout="bshd")
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D]
    out, lse, rng_state, unused, debug_mask = torch.ops.aten._flash_attention_forward(
        qb, kb, vb, None, None, 29, 41, 0.0, False, False, window_size_left=window[0], window_size_right=window[1])
    assert out.shape == qb.shape and out.stride() == torch.empty_like(qb).stride() and lse.shape == (2, 4, 29)
    assert rng_state.shape == (2,) and rng_state.dtype == torch.uint64 and unused.shape == () and debug_mask.numel() == 0
    assert_matches_oracle(out.transpose(1, 2), q, k, v, lse=lse, window=window)


def _packed(lengths_q, lengths_k, hq, hkv, d, dtype, device="cpu"):
    q = torch.randn(sum(lengths_q), hq, d, dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), hkv, d, dtype=dtype, device=device)
    v = torch.randn(sum(lengths_k), hkv, d, dtype=dtype, device=device)

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    return q, k, v, cu(lengths_q), cu(lengths_k)


def _sequences(cu_q, cu_k):
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    return list(zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])))


def _bhsd(x, a, b):
    return x[a:b].transpose(0, 1).unsqueeze(0)


@needs_interpreter
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (6, 0)])
def test_varlen_attn_forward_and_backward(cpu_kernels, window):
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    lengths_q, lengths_k = [9, 1, 30], [20, 13, 30]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 4, 64, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_aux=AuxRequest(lse=True),
                           window_size=window)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    grad = torch.randn_like(out)
    out.backward(grad)
    for (q0, q1), (k0, k1) in _sequences(cu_q, cu_k):
        args = [_bhsd(t.detach(), a, b) for t, (a, b) in ((q, (q0, q1)), (k, (k0, k1)), (v, (k0, k1)))]
        assert_matches_oracle(_bhsd(out.detach(), q0, q1), *args, lse=lse[:, q0:q1].unsqueeze(0), window=window)
        leaves = [a.double().requires_grad_() for a in args]
        ref = tileattn.reference.naive_attention(*leaves, window=window)
        ref.backward(_bhsd(grad, q0, q1).double())
        for name, got, (a, b), leaf in (("dq", q.grad, (q0, q1), leaves[0]), ("dk", k.grad, (k0, k1), leaves[1]),
                                        ("dv", v.grad, (k0, k1), leaves[2])):
            err = (_bhsd(got, a, b).double() - leaf.grad).abs().max().item()
            assert err < 1e-4 * max(1.0, leaf.grad.abs().max().item()), f"{name} of sequence {q0}: error {err:.3g}"


@needs_interpreter
def test_flash_forward_inplace_writes_out(cpu_kernels):
    if not hasattr(torch.ops.aten, "_flash_attention_forward_no_dropout_inplace"):
        pytest.skip("this torch has no _flash_attention_forward_no_dropout_inplace (torch 2.11)")
    from torch.nn.attention.varlen import AuxRequest, varlen_attn_out

    q, k, v, cu_q, cu_k = _packed([5, 21], [16, 21], 4, 2, 64, torch.float16)
    out = torch.full_like(q, float("nan"))
    result, lse = varlen_attn_out(out, q, k, v, cu_q, cu_k, 21, 21, return_aux=AuxRequest(lse=True),
                                  window_size=(-1, 0), enable_gqa=True)
    assert result is out and lse.shape == (4, q.shape[0])
    for (q0, q1), (k0, k1) in _sequences(cu_q, cu_k):
        assert_matches_oracle(_bhsd(out, q0, q1), _bhsd(q, q0, q1), _bhsd(k, k0, k1), _bhsd(v, k0, k1),
                              lse=lse[:, q0:q1].unsqueeze(0), causal=True)


@needs_interpreter
def test_unsupported_calls_raise_clearly(cpu_kernels):
    q, k, v = _qkv(1, 2, 2, 16, 16, 64, torch.float16)
    with pytest.raises(RuntimeError, match=r"TILEATTN \(tileattn\) SDPA flash forward unsupported: dropout_p=0.1"):
        torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.1)
    with pytest.raises(RuntimeError, match="return_debug_mask"):
        torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, True)
    with pytest.raises(RuntimeError, match="dtype torch.float64"):
        _sdpa_op(q.double(), k.double(), v.double())
    with pytest.raises(RuntimeError, match="head dims q 64, k 64, v 32"):
        _sdpa_op(q, k, v[..., :32])
    big = torch.randn(1, 2, 4, 264, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="equal head dims up to 256"):
        _sdpa_op(big, big, big)
    with pytest.raises(RuntimeError, match=r"query heads \(2\) must be a multiple of key/value heads \(3\)"):
        _sdpa_op(q, *_qkv(1, 3, 3, 16, 16, 64, torch.float16)[1:])
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    with pytest.raises(RuntimeError, match="alibi_slopes"):
        torch.ops.aten._flash_attention_forward(qb, kb, vb, None, None, 16, 16, 0.0, False, False,
                                                alibi_slopes=torch.ones(2))
    with pytest.raises(RuntimeError, match="seqused_k"):
        torch.ops.aten._flash_attention_forward(qb[0], kb[0], vb[0], torch.tensor([0, 16], dtype=torch.int32),
                                                torch.tensor([0, 16], dtype=torch.int32), 16, 16, 0.0, False, False,
                                                seqused_k=torch.tensor([8], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="restore_sdpa"):
        torch.ops.aten._flash_attention_forward(qb, kb, vb, None, None, 16, 16, 0.5, False, False)


@needs_interpreter
def test_rows_without_keys_get_zero_and_minus_inf(cpu_kernels):
    q, k, v = _qkv(1, 2, 2, 24, 10, 64, torch.float32)
    out, lse = _sdpa_op(q, k, v, True)[:2]  # bottom-right causal: the first 14 rows see no key
    assert (out[:, :, :14] == 0).all() and (lse[:, :, :14] == float("-inf")).all()
    assert_matches_oracle(out, q, k, v, lse=lse, causal=True)
    out, lse = _sdpa_op(q, k[:, :, :0], v[:, :, :0])[:2]
    assert (out == 0).all() and (lse == float("-inf")).all()


# ---- on the GPU, after activation -------------------------------------------------------------------------------

@pytest.fixture
def active():
    """tileattn active as SDPA's flash implementation for the test's duration."""
    tileattn.use_for_sdpa(strict=True, verbose=False)
    yield
    tileattn.restore_sdpa(verbose=False)


def _kernel_names(fn):
    """Names of the CUDA kernels ``fn()`` launched, from a torch.profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events() if event.device_type != torch.autograd.DeviceType.CPU}


def _flash_sdpa(q, k, v, causal, enable_gqa=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)


@pytest.mark.gpu
@needs_registry
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,sq,sk", [(False, 128, 128), (False, 77, 300), (False, 1000, 129), (True, 256, 256),
                                          (True, 1023, 1023), (False, 1, 513), (True, 1, 1)])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_gpu_sdpa_flash_backend_matches_oracle(active, dtype, d, causal, sq, sk, hq, hkv):
    q, k, v = _qkv(2, hq, hkv, sq, sk, d, dtype, device="cuda", layout="bshd")
    out = _flash_sdpa(q, k, v, causal, enable_gqa=hq != hkv)
    assert_matches_oracle(out, q, k, v, causal=causal)  # Sq == Sk whenever causal: SDPA's alignment equals ours


@pytest.mark.gpu
@needs_registry
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_aten_flash_forward_causal_is_bottom_right(active, dtype):
    q, k, v = _qkv(2, 4, 2, 100, 333, 128, dtype, device="cuda", layout="bshd")
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = torch.ops.aten._flash_attention_forward(qb, kb, vb, None, None, 100, 333, 0.0, True, False)[:2]
    assert_matches_oracle(out.transpose(1, 2), q, k, v, lse=lse, causal=True)


@pytest.mark.gpu
@needs_registry
def test_gpu_profiler_shows_our_kernels_and_restore_returns_pytorchs():
    q, k, v = _qkv(2, 8, 8, 1024, 1024, 128, torch.bfloat16, device="cuda")
    before = _kernel_names(lambda: _flash_sdpa(q, k, v, True))
    assert not any("_prefill_kernel" in n for n in before) and any("flash" in n.lower() for n in before), before
    tileattn.use_for_sdpa(strict=True, verbose=False)
    try:
        during = _kernel_names(lambda: _flash_sdpa(q, k, v, True))
        assert any("_prefill_kernel" in n for n in during), during
        assert not any("flash_fwd" in n for n in during), during
    finally:
        tileattn.restore_sdpa(verbose=False)
    after = _kernel_names(lambda: _flash_sdpa(q, k, v, True))
    assert not any("_prefill_kernel" in n for n in after) and any("flash" in n.lower() for n in after), after


@pytest.mark.gpu
@needs_registry
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,sq,sk,hkv", [(False, 200, 333, 4), (True, 256, 256, 2), (True, 1000, 1000, 8)])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_sdpa_flash_backward_matches_oracle(active, dtype, causal, sq, sk, hkv, d):
    q, k, v = _qkv(2, 8, hkv, sq, sk, d, dtype, device="cuda", layout="bshd")

    def ours(q, k, v):
        out = _flash_sdpa(q, k, v, causal, enable_gqa=hkv != 8)
        return out, torch.zeros(out.shape[:3], device=out.device)  # SDPA returns no lse

    def reference(q, k, v):
        out = tileattn.reference.naive_attention(q, k, v, causal=causal)
        return out, torch.zeros(out.shape[:3], device=out.device, dtype=out.dtype)

    names = _kernel_names(lambda: ours(*(t.detach().requires_grad_() for t in (q, k, v)))[0].sum().backward())
    assert any("_dq_kernel" in n for n in names) and any("_dkdv_kernel" in n for n in names), names
    assert_gradients_match_oracle(ours, (q, k, v), oracle=reference, names=("dq", "dk", "dv"), keys=sk)


@pytest.mark.gpu
@needs_registry
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (64, 0)])
def test_gpu_varlen_attn_matches_oracle(active, dtype, window):
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    lengths = [1, 129, 700, 64]
    q, k, v, cu, _ = _packed(lengths, lengths, 8, 8, 128, dtype, device="cuda")
    names = _kernel_names(lambda: varlen_attn(q, k, v, cu, cu, 700, 700, window_size=window))
    assert any("_prefill_kernel" in n for n in names), names
    out, lse = varlen_attn(q, k, v, cu, cu, 700, 700, return_aux=AuxRequest(lse=True), window_size=window)
    for (q0, q1), (k0, k1) in _sequences(cu, cu):
        assert_matches_oracle(_bhsd(out, q0, q1), _bhsd(q, q0, q1), _bhsd(k, k0, k1), _bhsd(v, k0, k1),
                              lse=lse[:, q0:q1].unsqueeze(0), window=window)


@pytest.mark.gpu
@needs_registry
def test_gpu_dropout_raises_clearly(active):
    q, k, v = _qkv(1, 2, 2, 64, 64, 64, torch.float16, device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError, match="dropout_p=0.1"):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
