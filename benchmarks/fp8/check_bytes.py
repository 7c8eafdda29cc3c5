"""The fp8 bytes the Triton decode kernel writes for new tokens, against ``tileattn.quant.quantize``, on a GPU.

    PYTHONPATH=. python benchmarks/fp8/check_bytes.py

Serving-sized calls (B = 8, Hq = 32, Hkv = 8, D = 128; contiguous and paged caches of 16- and 64-token pages; Sq 1
and 4; bf16 and fp16), every fp8 format and scale granularity, new tokens of every magnitude (random over the whole
range, exact ties between codes at power-of-two scales, fp32 subnormals, zeros, NaN and infinities). Each call's
written tokens (and per-token scales) must equal ``quant.quantize`` (``quant.token_scales``) byte for byte (the
attention over them is tests/test_fp8_kvcache.py's to check). Prints one line per configuration; exit status 1 on
any mismatch.
"""

from __future__ import annotations

import itertools
import sys

import torch

import tileattn
from tileattn import quant
from tileattn.reference import gather_cache

B, HQ, HKV, D, CAPACITY = 8, 32, 8, 128, 512


def codes_and_ties(fmt):
    """Every finite code of ``fmt`` and the exact midpoints between neighbouring ones (fp32)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt).float()
    finite = values[torch.isfinite(values)].unique()
    return torch.cat([finite, (finite[1:] + finite[:-1]) / 2])


def new_tokens(shape, fmt, dtype, power, gen):
    """Random magnitudes from 2^-30 to 2^20, a third of the elements codes or ties at the scale ``power``, and
    specials, in ``dtype``."""
    x = torch.randn(shape, generator=gen) * 2.0 ** (torch.rand(shape, generator=gen) * 50 - 30)
    picks = torch.rand(shape, generator=gen) < 0.33
    edges = codes_and_ties(fmt)
    chosen = edges[torch.randint(len(edges), (int(picks.sum()),), generator=gen)]
    x[picks] = chosen * torch.where(torch.rand(chosen.shape, generator=gen) < 0.5, -1.0, 1.0) * power
    x[-1, -1, -1, :8] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-39, -1e-45, 3e38])
    x[0, 0, 0] = 0.0  # an all-zero token
    return x.to(dtype).cuda()


def scales(granularity, rows, slots, power, gen):
    if granularity == "token":  # computed on write; what the slots held before does not matter
        return torch.rand(rows, slots, HKV, generator=gen).cuda().transpose(1, 2) + 0.5
    shape = {"tensor": (), "head": (HKV,), "batch_head": (B, HKV)}[granularity]
    return (power * 2.0 ** torch.randint(-2, 3, shape, generator=gen).float()).cuda()


def check(fmt, granularity, dtype, page_size, sq, gen) -> list[str]:
    if page_size is None:
        rows, slots, table = B, CAPACITY, None
    else:
        per_seq = CAPACITY // page_size
        rows, slots = B * per_seq + 5, page_size
        table = torch.randperm(rows, generator=gen)[:B * per_seq].view(B, per_seq).to(torch.int32).cuda()
    caches = [torch.randn(rows, slots, HKV, D, generator=gen).to(fmt).cuda().transpose(1, 2) for _ in range(2)]
    power = 2.0 ** torch.randint(-3, 3, (), generator=gen).item()
    k_scale, v_scale = (scales(granularity, rows, slots, power, gen) for _ in range(2))
    k_new, v_new = (new_tokens((B, HKV, sq, D), fmt, dtype, power, gen) for _ in range(2))
    q = torch.randn(B, HQ, sq, D, generator=gen).to(dtype).cuda()
    lengths = torch.randint(0, CAPACITY - sq, (B,), generator=gen)
    lengths[0] = 0
    seqlens = lengths.to(torch.int32).cuda()
    tileattn.attention_with_kvcache(q, *caches, seqlens, block_table=table, k_new=k_new, v_new=v_new,
                                    k_scale=k_scale, v_scale=v_scale, backend="triton")
    problems = []
    for name, cache, scale, new in (("k", caches[0], k_scale, k_new), ("v", caches[1], v_scale, v_new)):
        for b, length in enumerate(lengths.tolist()):
            stored = gather_cache(cache, b, length + sq, table)[:, length:]
            if granularity == "token":
                expected_scale = quant.token_scales(new[b:b + 1], fmt)
                written = gather_cache(scale[..., None], b, length + sq, table)[:, length:, 0]
                if not torch.equal(written, expected_scale[0]):
                    problems.append(f"{name} scales of sequence {b}: {int((written != expected_scale[0]).sum())} "
                                    "differ")
            else:
                expected_scale = scale[b:b + 1] if granularity == "batch_head" else scale
            expected = quant.quantize(new[b:b + 1], expected_scale, fmt)[0]
            wrong = stored.view(torch.uint8) != expected.view(torch.uint8)
            if wrong.any():
                where = wrong.nonzero()[0].tolist()
                x = new[b][where[0], where[1], where[2]].item()
                problems.append(f"{name} bytes of sequence {b}: {int(wrong.sum())} of {wrong.numel()} differ, e.g. "
                                f"x = {x!r}: stored 0x{stored.view(torch.uint8)[tuple(where)].item():02x}, "
                                f"quant.quantize 0x{expected.view(torch.uint8)[tuple(where)].item():02x}")
    return problems


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    gen = torch.Generator().manual_seed(16)
    failures = 0
    # Each new (format, scale mode, layout, dtype, Sq) compiles a kernel: bf16 over every layout (Sq 4 on 16-token
    # pages), fp16 contiguous (the GPU tests cover fp16, bf16 and fp32 at small shapes).
    layouts = [(torch.bfloat16, None, 1), (torch.bfloat16, 16, 4), (torch.bfloat16, 64, 1), (torch.float16, None, 4)]
    for fmt, granularity, (dtype, page_size, sq) in itertools.product(
            quant.FP8_DTYPES, ("tensor", "head", "batch_head", "token"), layouts):
        label = (f"{str(fmt)[6:]:14s} {granularity:10s} {str(dtype)[6:]:8s} "
                 f"{'contiguous' if page_size is None else f'paged {page_size}':10s} Sq={sq}")
        problems = check(fmt, granularity, dtype, page_size, sq, gen)
        failures += bool(problems)
        print(f"{'ok  ' if not problems else 'FAIL'} {label}" + "".join(f"\n     {p}" for p in problems), flush=True)
    print(f"{failures} configurations with mismatches" if failures else "all bytes equal quant.quantize's")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
