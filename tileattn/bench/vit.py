"""``tileattn bench vit``: the article's Vision Transformer case. timm's ViT-B/16 at 224 px (197 tokens) up to
high resolution (1024 px: 4097 tokens), eager attention (timm's ``fused_attn=False``) / SDPA (timm's
default) / tileattn (``integrations.timm.patch``, ``auto`` and forced Triton): images per second and peak
extra memory of a forward, at about the same number of tokens per batch at every resolution.

Without a GPU: a small CPU configuration (ViT-Ti/16 at 224 and 448 px, fp32), labelled as such.
"""

from __future__ import annotations

import contextlib

import torch

from .e2e import Peak, timed
from .report import Progress, environment, markdown_table, write_results

GPU_CONFIG = dict(model="vit_base_patch16_224", sizes=(224, 448, 768, 1024), tokens_per_batch=12608,
                  dtype=torch.bfloat16, label="ViT-B/16, bf16")
CPU_CONFIG = dict(model="vit_tiny_patch16_224", sizes=(224, 448), tokens_per_batch=1576, dtype=torch.float32,
                  label="CPU small configuration: ViT-Ti/16, fp32")
IMPLEMENTATIONS = ("eager", "sdpa", "tileattn", "tileattn-triton")


def use(model, impl) -> None:
    """Route the model's attention through ``impl`` (timm's own paths, or tileattn's patch)."""
    from timm.layers import Attention

    from ..integrations import timm as tileattn_timm

    if impl.startswith("tileattn"):
        tileattn_timm.patch(model, backend="triton" if impl == "tileattn-triton" else "auto")
        return
    tileattn_timm.unpatch(model)
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = impl == "sdpa"


def run(out_dir, *, config=None, implementations=IMPLEMENTATIONS, progress=None):
    try:
        import timm
    except ImportError as exc:
        raise RuntimeError(f"tileattn bench vit needs timm (pip install timm): {exc}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = config or (GPU_CONFIG if device.type == "cuda" else CPU_CONFIG)
    if device.type != "cuda":
        implementations = tuple(i for i in implementations if i != "tileattn-triton")
    env = environment()
    progress = progress or Progress(len(config["sizes"]) * len(implementations), "vit")
    rows = []
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C keeps what was measured
        for size in config["sizes"]:
            torch.manual_seed(0)
            model = timm.create_model(config["model"], pretrained=False, img_size=size).to(device, config["dtype"])
            model.eval()
            tokens = model.patch_embed.num_patches + model.num_prefix_tokens
            batch = max(1, config["tokens_per_batch"] // tokens)
            x = torch.randn(batch, 3, size, size, device=device, dtype=config["dtype"])
            reference = None
            for impl in implementations:
                use(model, impl)
                try:
                    with torch.no_grad(), Peak(device) as peak:
                        out = model(x)
                        ms = timed(lambda: model(x), device, repeats=10 if device.type == "cuda" else 2)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    ms, out = None, None
                if reference is None:
                    reference = out
                diff = None if out is None else (out.float() - reference.float()).abs().max().item()
                rows.append(dict(impl=impl, model=config["model"], image_size=size, seqlen=tokens, batch=batch,
                                 dtype=str(config["dtype"]).removeprefix("torch."), ms=ms,
                                 images_per_s=None if ms is None else batch / ms * 1e3,
                                 peak_extra_gib=None if ms is None else peak.gib, max_abs_diff_vs_eager=diff))
                progress.step(f"{size}px ({tokens} tokens) x{batch} {impl}: "
                              + ("OOM" if ms is None else f"{ms:.1f} ms, {batch / ms * 1e3:.0f} img/s"))
            del model, x, reference
    return write_results(out_dir, "vit", env, rows, summarize(rows, config))


def summarize(rows, config) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    table = []
    for size in dict.fromkeys(r["image_size"] for r in rows):
        sel = {r["impl"]: r for r in rows if r["image_size"] == size}
        any_row = next(iter(sel.values()))
        ips = {i: sel.get(i, {}).get("images_per_s") for i in impls}

        def ratio(other):
            return None if not ips.get("tileattn") or not ips.get(other) else ips["tileattn"] / ips[other]

        table.append([size, any_row["seqlen"], any_row["batch"], *(ips[i] for i in impls), ratio("eager"),
                      ratio("sdpa"), *(sel.get(i, {}).get("peak_extra_gib") for i in impls),
                      max((r["max_abs_diff_vs_eager"] or 0) for r in sel.values())])
    headers = ["image px", "tokens", "batch", *(f"{i} img/s" for i in impls), "tileattn / eager", "tileattn / sdpa",
               *(f"{i} +GiB" for i in impls), "max |out - eager's|"]
    return (f"{config['label']} ({config['model']}, random weights), forward only, median of timed runs; "
            "+GiB: peak memory beyond the weights and inputs.\n\n" + markdown_table(headers, table))
