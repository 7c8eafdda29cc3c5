"""The direct launch path (``tileattn.kernels.launch``): a compiled kernel is reused only for calls that Triton would
specialize the same way. A stale specialization is a silent wrong answer, so this is checked three ways: the key
against the installed Triton's own rule, the launcher against a stand-in kernel that verifies every launch it gets,
and real kernels on alternating aligned/misaligned views, lengths divisible by 16 or not and sizes of 1 against
the float64 oracle (through the interpreter on CPU, compiled on the GPU, where the direct path runs)."""

import random

import pytest
import torch

import tileattn
from tileattn.kernels import launch
from tileattn.testing import assert_matches_oracle, random_qkv

from conftest import DEVICE, KERNEL_DTYPES

triton_specialize = pytest.importorskip("triton._C.libtriton").native_specialize_impl
BaseBackend = pytest.importorskip("triton.backends.compiler").BaseBackend


def triton_key(arg):
    """The installed Triton's specialization of one argument, as its binder computes it."""
    return triton_specialize(BaseBackend, arg, False, True, True)


INTS = [0, 1, 2, 15, 16, 17, 31, 32, 48, 127, 128, 1023, 1024, 4096, -1, -16, 2**31 - 1, 2**31 - 16, -(2**31)]


def test_int_classes_match_triton():
    """Two ints we put in one class are specialized alike by the installed Triton; ints past int32 are refused."""
    rng = random.Random(0)
    values = INTS + [rng.randrange(-(2**31), 2**31) for _ in range(2000)] + [rng.randrange(0, 4096) * 16 for _ in range(200)]
    seen = {}
    for value in values:
        ours = launch.int_classes([value])
        assert ours is not None
        assert seen.setdefault(ours, triton_key(value)) == triton_key(value), value
    assert len(seen) == 3  # equal to 1, divisible by 16, neither
    for value in (2**31, -(2**31) - 1, 2**40):
        assert triton_key(value)[0] == "i64" and launch.int_classes([3, value]) is None
    for flag in (True, False):  # bools are u1 arguments to Triton, never an int's class
        assert triton_key(flag)[0] == "u1" and launch.int_classes([flag]) not in (launch.int_classes([int(flag)]),)


def test_tensor_classes_match_triton():
    base = torch.zeros(256, dtype=torch.uint8)
    seen = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.uint8):
        for offset in range(0, 32, 1 if dtype.itemsize == 1 else 2):
            t = base[offset:offset + 64].view(dtype) if offset % dtype.itemsize == 0 else None
            if t is None:
                continue
            ours = launch.tensor_classes([t], [t.data_ptr()])
            assert seen.setdefault(ours, triton_key(t)) == triton_key(t), (dtype, offset)
    assert len(seen) == 10  # five dtypes x aligned or not


class _StandInKernel:
    """Compiled for one specialization: every launch it receives must have exactly that specialization. The direct
    launch passes tensors as their data pointers: the launch's tensors are ``jit.current`` (set by the test)."""

    def __init__(self, specialization, jit):
        self.specialization, self.jit, self.launches = specialization, jit, 0
        self.function = self.packed_metadata = None

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        tensors = self.jit.current
        pointers, (*runtime, constexpr) = args[:len(tensors)], args[len(tensors):]
        assert list(pointers) == [t.data_ptr() for t in tensors]
        spec = [triton_key(a) if not isinstance(a, float) else None for a in (*tensors, *runtime)]
        assert spec + [("constexpr", constexpr)] == self.specialization
        self.launches += 1


class _StandInJIT:
    """What ``fn[grid](*args, **constexprs)`` does, for a kernel with two tensors, three ints and a float."""

    params = [type("P", (), dict(name=n, is_constexpr=n == "C"))() for n in ("A", "B", "i", "j", "k", "f", "C")]
    __name__ = "stand_in"

    def __init__(self):
        self.compiled = {}

    def __getitem__(self, grid):
        def bind(*args, C, num_warps, num_stages):
            spec = [triton_key(a) if not isinstance(a, float) else None for a in args] + [("constexpr", C)]
            key = (repr(spec), num_warps, num_stages)
            kernel = self.compiled.setdefault(key, _StandInKernel(spec, self))
            kernel.launches += 1
            return kernel
        return bind


def test_launcher_never_reuses_a_kernel_for_another_specialization(monkeypatch):
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 0)
    fn = _StandInJIT()
    launcher = launch.Launcher.__new__(launch.Launcher)
    launcher.fn, launcher.fast, launcher.constexpr_names, launcher._kernels = fn, True, ("C",), {}
    buffer = torch.zeros(4096, dtype=torch.uint8, device=DEVICE)
    rng = random.Random(1)
    for _ in range(3000):
        tensors = [buffer[rng.choice((0, 2, 16, 18, 32)):][:64].view(rng.choice((torch.float16, torch.bfloat16)))
                   for _ in range(2)]
        ints = [rng.choice(INTS[:14]) for _ in range(3)]
        fn.current = tensors
        launcher((1, 1, 1), tensors, ints, [rng.random()], (rng.choice((1, 2)),), 4, 1)
    assert sum(k.launches for k in fn.compiled.values()) == 3000
    assert len(fn.compiled) > 50  # many specializations met, each compiled once and reused only for itself


def _misaligned(t):
    """The same values in a view whose data pointer is off 16-byte alignment (one element into a wider buffer)."""
    holder = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    holder.copy_(t)
    return holder


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_alternating_specializations_against_oracle(dtype):
    """In one process, calls that Triton specializes differently, in an order that would expose a reused kernel:
    aligned then misaligned views, lengths divisible by 16 and not, sizes of 1; prefill, decode-shaped and
    KV-cache calls, every result against the oracle."""
    cases = []
    for sk in (32, 33, 1, 48, 17):
        for aligned in (True, False, True):
            cases.append((sk, aligned))
    for sk, aligned in cases:
        for sq, hq, hkv in ((sk, 2, 1), (1, 4, 2), (3, 2, 2)):
            q, k, v = random_qkv(1, hq, hkv, sq, sk, 32, dtype=dtype, device=DEVICE)
            if not aligned:
                q, k, v = _misaligned(q), _misaligned(k), _misaligned(v)
            out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
            assert_matches_oracle(out, q, k, v, lse=lse, causal=True)
        # Cache appends and decode over a cache whose capacity is or is not a multiple of 16, in one launch and
        # split in two (the last split merges through the reused workspace).
        q, k_new, v_new = random_qkv(2, 4, 2, 1, 1, 32, dtype=dtype, device=DEVICE)
        cache_len = 16 * 3 + (0 if sk % 16 == 0 else 1)
        k_cache = torch.randn(2, 2, cache_len, 32, dtype=dtype, device=DEVICE)
        v_cache = torch.randn_like(k_cache)
        if not aligned:
            k_cache, v_cache = _misaligned(k_cache), _misaligned(v_cache)
        lengths = torch.tensor([min(sk, cache_len - 1), 0], dtype=torch.int32, device=DEVICE)
        out = tileattn.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new,
                                              check_bounds=False, num_splits=1 + (sk % 2), backend="triton")
        for b in range(2):
            n = int(lengths[b]) + 1
            assert torch.equal(k_cache[b, :, n - 1], k_new[b, :, 0]) and torch.equal(v_cache[b, :, n - 1], v_new[b, :, 0])
            assert_matches_oracle(out[b:b + 1], q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n],
                                  causal=True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_prepared_launches_follow_each_calls_layout(dtype, backend):
    """A repeated call reuses the launch prepared for its signature (``api._Call.plan``), whose strides are baked
    in: calls of the same shapes in alternating memory layouts and mask broadcasts, prefill and decode-shaped,
    must each get their own, every result against the oracle."""
    layouts = ("contiguous", "bshd", "strided", "contiguous", "dmajor", "bshd")
    for sq in (24, 1):
        for i, layout in enumerate(layouts):
            q, k, v = random_qkv(2, 4, 2, sq, 40, 32, dtype=dtype, device=DEVICE, layout=layout)
            keep = torch.rand(2, 40, device=DEVICE) > 0.3
            keep[:, -1] = True
            mask = keep[:, None, None, :] if i % 2 else keep[:, None, None, :].expand(2, 4, sq, 40).contiguous()
            out = tileattn.attention(q, k, v, causal=sq > 1, backend=backend)
            assert_matches_oracle(out, q, k, v, causal=sq > 1)
            out = tileattn.attention(q, k, v, mask=mask, backend=backend)
            assert_matches_oracle(out, q, k, v, mask=mask)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_prepared_kvcache_launches_follow_each_calls_layout(dtype):
    """The same for ``attention_with_kvcache`` and flash-attn's ``[B, S, H, D]`` entry point: caches of one shape
    seen through different strides, lengths at unit stride or not (the latter is copied per call, not planned).
    flash-attn's entry point runs ``auto``: the Triton kernel on a GPU, the PyTorch path on CPU."""
    from tileattn import flash_attn_compat

    for i in range(6):
        q, k_new, v_new = random_qkv(2, 4, 2, 1, 1, 32, dtype=dtype, device=DEVICE, layout=("contiguous", "bshd")[i % 2])
        storage = torch.randn(2, 50, 2, 64, dtype=dtype, device=DEVICE)  # [B, S, H, 2 * D]: k and v interleaved
        k_cache, v_cache = (storage[..., :32], storage[..., 32:]) if i % 3 else (storage[..., 32:], storage[..., :32])
        lengths = torch.tensor([[7, 30], [30, 7]][i % 2], dtype=torch.int32, device=DEVICE)
        if i >= 3:
            lengths = lengths.repeat_interleave(2)[::2]  # the same lengths at stride 2
        out = tileattn.attention_with_kvcache(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), lengths,
                                              k_new=k_new, v_new=v_new, check_bounds=False, backend="triton")
        seq_first = flash_attn_compat.flash_attn_with_kvcache(q.transpose(1, 2), k_cache, v_cache,
                                                              cache_seqlens=lengths, causal=True)
        for b in range(2):  # the first call appended one token; the second attends to the cached ones only
            n = int(lengths[b]) + 1
            keys, values = k_cache[b:b + 1, :n].transpose(1, 2), v_cache[b:b + 1, :n].transpose(1, 2)
            assert_matches_oracle(out[b:b + 1], q[b:b + 1], keys, values, causal=True)
            assert_matches_oracle(seq_first[b:b + 1].transpose(1, 2), q[b:b + 1], keys[:, :, :-1], values[:, :, :-1],
                                  causal=True)
