"""When does context parallelism's communication hide behind compute? A model on paper, for
``tileattn.distributed``'s two variants on a 7B-class shape (Hq = 32, Hkv = 8, D = 128, bf16).

Per ring step each rank computes its queries against one K/V block, merges the block's result into its
accumulators, and at the same time passes the block on:
    compute  = 4 * S_local^2 * Hq * D * f / F       (two matmuls; f = 1/2 with causal under the zigzag layout,
                                                    which gives every rank half of each block; F = attention FLOP/s)
    merge    = S_local * Hq * (10 * D + 12) B / HBM  (read the fp32 accumulator and the bf16 block result, write the
                                                    accumulator, with their lse: one fused pass at HBM bandwidth)
    transfer = S_local * Hkv * 2 * D * 2 B / BW     (the K and V block over one link direction)
A step lasts max(compute + merge, transfer); the ring is W steps and W - 1 transfers:
    ring      = (compute + merge) + (W - 1) * max(compute + merge, transfer)
    allgather = (W - 1) * transfer + W * compute     (the same bytes, not overlapped, but no merges: one call per
                                                    local chunk over all the keys it sees)
Backward (ring): about 2.5x the forward's matmul work (FlashAttention-2's five matmuls against two) while K/V
(bf16) and their gradients (fp32) travel: 3x the bytes (its accumulations are not modelled).
Efficiency = W * compute / time: 1 means the communication is fully hidden and nothing else costs.
The transfer hides from S_local >= 2 * (Hkv / Hq) * (bytes / element) * F / (4 * f * BW) tokens on. Whether the
all-gather beats the ring does not depend on S_local: (W - 1) exposed transfers against (W - 1) merges, i.e.
transfer / merge ~ (Hkv / Hq) * HBM / (2.5 * BW): below 1 (GQA over NVLink) the all-gather wins, above (PCIe,
InfiniBand) the ring.

Not modelled: per-message latency (~10 us, which matters below a few thousand tokens per rank), kernel efficiency
falling on small blocks, tileattn's merge being several unfused elementwise kernels today (a few times the fused
pass), the all-gather's memory (the whole sequence's K/V on every rank), and links shared by several GPUs.
A ring of more than 8 H100s leaves the NVLink domain: its slowest hop is InfiniBand, so read the InfiniBand rows
for W > 8.

Run: python benchmarks/cp_model.py [--out benchmarks/results]   (writes cp-model-*.md, .json and .png)
"""

import argparse
import json
import pathlib

HQ, HKV, D, BYTES = 32, 8, 128, 2  # Llama-3-8B / Mistral-7B attention, bf16
FLOPS = 500e12  # attention forward, bf16, H100-class (tileattn's prefill kernel at D = 128: ~500 TFLOP/s)
HBM = 3.0e12  # H100 copy bandwidth, B/s (benchmarks/NOTES.md)
BACKWARD_WORK, BACKWARD_BYTES = 2.5, 3.0  # relative to the forward
LINKS = {  # per GPU and direction, GB/s
    "NVLink (H100, 450 GB/s)": 450e9,
    "PCIe Gen5 x16 (64 GB/s)": 64e9,
    "InfiniBand NDR (50 GB/s)": 50e9,
}
GPUS = [2, 4, 8, 16, 32, 64]
TOKENS = [2**17, 2**18, 2**19, 2**20, 2**21, 2**22]  # 128k .. 4M


def step_times(seq_len, world, bandwidth, causal=True, backward=False):
    """(compute, merge, transfer) of one ring step, seconds."""
    local = seq_len / world
    compute = 4 * local**2 * HQ * D * (0.5 if causal else 1.0) / FLOPS
    merge = 0.0 if backward else local * HQ * (10 * D + 12) / HBM
    transfer = local * HKV * 2 * D * BYTES / bandwidth
    if backward:
        compute, transfer = compute * BACKWARD_WORK, transfer * BACKWARD_BYTES
    return compute, merge, transfer


def efficiency(seq_len, world, bandwidth, variant="ring", **kw):
    compute, merge, transfer = step_times(seq_len, world, bandwidth, **kw)
    if variant == "ring":
        total = compute + merge + (world - 1) * max(compute + merge, transfer)
    else:
        total = (world - 1) * transfer + world * compute
    return world * compute / total


def hiding_threshold(bandwidth, causal=True, backward=False):
    """The S_local from which a ring step's compute outlasts its transfer."""
    work = (0.5 if causal else 1.0) * (BACKWARD_WORK if backward else 1.0)
    moved = BACKWARD_BYTES if backward else 1.0
    return 2 * (HKV / HQ) * BYTES * moved * FLOPS / (4 * work * bandwidth)


def tokens_label(n):
    return f"{n // 2**20}M" if n >= 2**20 else f"{n // 2**10}k"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    stem = out / f"cp-model-{HQ}q{HKV}kv-d{D}-bf16"

    rows = []
    for link, bw in LINKS.items():
        for seq_len in TOKENS:
            for world in GPUS:
                compute, merge, transfer = step_times(seq_len, world, bw)
                rows.append(dict(link=link, tokens=seq_len, gpus=world, local_tokens=seq_len // world,
                                 step_compute_ms=compute * 1e3, step_merge_ms=merge * 1e3,
                                 step_transfer_ms=transfer * 1e3,
                                 ring=efficiency(seq_len, world, bw),
                                 allgather=efficiency(seq_len, world, bw, "allgather"),
                                 ring_backward=efficiency(seq_len, world, bw, backward=True)))
    thresholds = {link: {name: round(hiding_threshold(bw, **kw)) for name, kw in (
        ("causal forward", {}), ("causal backward", dict(backward=True)), ("full forward", dict(causal=False)))}
        for link, bw in LINKS.items()}
    stem.with_suffix(".json").write_text(json.dumps(dict(
        model=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, bytes_per_element=BYTES, attention_flops=FLOPS, hbm=HBM,
                   backward_work=BACKWARD_WORK, backward_bytes=BACKWARD_BYTES, links=LINKS),
        hiding_threshold_local_tokens=thresholds, rows=rows), indent=1) + "\n")

    lines = [f"# Context parallelism on paper: Hq={HQ}, Hkv={HKV}, D={D}, bf16, {FLOPS / 1e12:.0f} TFLOP/s",
             "", "Written by `benchmarks/cp_model.py` (the model and its assumptions are in its docstring). "
             "Efficiency = compute / total time; 1.00 = communication fully hidden and nothing else costing. "
             "Causal attention, zigzag layout; the ring's time includes one merge of the block's result per step, "
             "the all-gather's none.", "",
             "## Tokens per rank from which a ring step hides its transfer", "",
             "| link | causal forward | causal backward | non-causal forward |", "|---|---|---|---|"]
    lines += [f"| {link} | {t['causal forward']} | {t['causal backward']} | {t['full forward']} |"
              for link, t in thresholds.items()]
    for link in LINKS:
        lines += ["", f"## {link}: ring forward efficiency (all-gather in brackets; ring backward after the slash)",
                  "", "| tokens | " + " | ".join(f"{w} GPUs" for w in GPUS) + " |", "|---" * (len(GPUS) + 1) + "|"]
        for seq_len in TOKENS:
            cells = [r for r in rows if r["link"] == link and r["tokens"] == seq_len]
            lines.append(f"| {tokens_label(seq_len)} | " + " | ".join(
                f"{r['ring']:.2f} ({r['allgather']:.2f}) / {r['ring_backward']:.2f}" for r in cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LINKS), figsize=(5 * len(LINKS), 4), sharey=True)
    for ax, (link, bw) in zip(axes, LINKS.items()):
        for seq_len in TOKENS:
            line, = ax.plot(GPUS, [efficiency(seq_len, w, bw) for w in GPUS], marker="o", label=tokens_label(seq_len))
            ax.plot(GPUS, [efficiency(seq_len, w, bw, "allgather") for w in GPUS], linestyle=":",
                    color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(GPUS, [str(w) for w in GPUS])
        ax.set_title(link)
        ax.set_xlabel("GPUs (ring: solid, all-gather: dotted)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("compute / total time (causal forward)")
    axes[0].set_ylim(0, 1.05)
    axes[-1].legend(title="tokens", loc="lower left")
    fig.suptitle(f"Context parallelism: when K/V transfer hides behind compute (Hq={HQ}, Hkv={HKV}, D={D}, bf16, "
                 f"{FLOPS / 1e12:.0f} TFLOP/s)")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"wrote {stem}.md, .json, .png")


if __name__ == "__main__":
    main()
