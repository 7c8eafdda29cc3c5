import time, torch, tileattn
import torch.nn.functional as F
from tileattn.kernels.decode import decode_attention
from tileattn.kernels.prefill import prefill_attention
def bench(fn, n=300):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize(); t2 = time.perf_counter()
    return round((t1 - t) / n * 1e6, 1), round((t2 - t) / n * 1e6, 1)  # host us per call, wall us per call
b, L = 8, 64
q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(b, 32, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
pad = torch.ones(b, L, dtype=torch.bool, device="cuda"); pad[:, :5] = False
m4 = pad[:, None, None, :]
lengths = torch.full((b,), L, dtype=torch.int32, device="cuda")
print("sdpa masked", bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m4)))
print("tileattn masked", bench(lambda: tileattn.attention(q, k, v, mask=m4)))
print("tileattn plain", bench(lambda: tileattn.attention(q, k, v)))
print("decode_attention masked", bench(lambda: decode_attention(q, k, v, lengths, new_tokens=0, scale=0.08, mask=m4.expand(b, 32, 1, L))))
print("decode_attention plain", bench(lambda: decode_attention(q, k, v, lengths, new_tokens=0, scale=0.08)))
print("torch.full", bench(lambda: torch.full((b,), L, dtype=torch.int32, device="cuda")))
print("prefill_attention masked", bench(lambda: prefill_attention(q, k, v, scale=0.08, mask=m4.expand(b, 32, 1, L))))
print("mask.all sync", bench(lambda: bool(pad.all())))
