"""``tileattn bench vit``: the article's Vision Transformer case. timm's ViT-B/16 at 224 px (197 tokens) up to
high resolution (1024 px: 4097 tokens), eager attention (timm's ``fused_attn=False``) / SDPA (timm's
default) / tileattn (``integrations.timm.patch``, ``auto`` and forced Triton): images per second and peak
extra memory of a forward, at about the same number of tokens per batch at every resolution. The
implementations run the same model, interleaved round-robin in every repeat; peak memory is measured on
each one's first call (in a fresh process on CPU, as in the e2e suite).

Without a GPU: a small CPU configuration (ViT-Ti/16 at 224 and 448 px, fp32), labelled as such. It needs
timm, which needs a torchvision built for the installed torch (see :func:`missing_timm_advice`).
"""

from __future__ import annotations

import torch

from .e2e import Peak
from .report import (Interruptible, Progress, environment, flag_notes, implausible, in_fresh_process,
                     interleaved_timings, markdown_table, rate_cell, speedup_limit, write_results)

CONFIGS = {
    "gpu": dict(model="vit_base_patch16_224", sizes=(224, 448, 768, 1024), tokens_per_batch=12608,
                dtype=torch.bfloat16, repeats=10, label="ViT-B/16, bf16"),
    "cpu": dict(model="vit_tiny_patch16_224", sizes=(224, 448), tokens_per_batch=1576, dtype=torch.float32,
                repeats=5, label="CPU small configuration: ViT-Ti/16, fp32"),
}
IMPLEMENTATIONS = ("eager", "sdpa", "tileattn", "tileattn-triton")


def missing_timm_advice() -> str:
    """What to do without timm, without breaking this install: a plain ``pip install timm`` pulls the newest
    torchvision, which requires the newest torch, so pip replaces the installed torch (a CPU build with
    several GB of a CUDA one); and PyPI's torchvision wheels are CUDA builds that do not import beside a CPU
    torch. The torchvision made for torch 2.N is 0.(N+15) (since torch 2.0)."""
    major_minor = torch.__version__.split("+")[0].split(".")[:2]
    vision = f"0.{int(major_minor[1]) + 15}" if major_minor[0] == "2" else None
    if torch.version.cuda is not None and vision:
        return f"pip install torchvision=={vision}.* timm (the torchvision made for this torch {torch.__version__})"
    steps = (f"with this CPU torch {torch.__version__}: pip install torchvision=={vision}.* --index-url "
             "https://download.pytorch.org/whl/cpu && pip install timm" if vision else
             "install the torchvision built for this torch first, then pip install timm")
    return ("timm imports torchvision, and `pip install timm` alone would replace this CPU build of torch "
            f"with a CUDA one (several GB); {steps}. Or run `tileattn bench vit` on a GPU machine")


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


def build(config, size, device):
    """The model at ``size`` px (random weights, seed 0), and a batch of ``tokens_per_batch`` tokens."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(config["model"], pretrained=False, img_size=size).to(device, config["dtype"]).eval()
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    batch = max(1, config["tokens_per_batch"] // tokens)
    return model, torch.randn(batch, 3, size, size, device=device, dtype=config["dtype"])


def _peak_in_fresh_process(size, impl):
    model, x = build(CONFIGS["cpu"], size, torch.device("cpu"))
    use(model, impl)
    with torch.no_grad(), Peak(torch.device("cpu")) as peak:
        model(x)
    return peak.gib


def speedup_bound(model, tokens) -> float:
    """The largest images/s ratio a change of attention can explain (``report.speedup_limit``): attention's
    ``4 * N^2 * dim`` FLOPs per block against ``2 * N`` per parameter."""
    attention = 4 * tokens**2 * model.embed_dim * len(model.blocks)
    return speedup_limit(attention, 2 * tokens * sum(p.numel() for p in model.parameters()))


def run(out_dir, *, config=None, implementations=IMPLEMENTATIONS, progress=None):
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"needs timm ({exc}): {missing_timm_advice()}.") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = config or CONFIGS["gpu" if device.type == "cuda" else "cpu"]
    if device.type != "cuda":
        implementations = tuple(i for i in implementations if i != "tileattn-triton")
    env = environment()
    progress = progress or Progress(len(config["sizes"]) * (len(implementations) + 1), "vit")
    progress.note(f"vit: {config['label']} on {env['device']}")
    rows = []
    with Interruptible() as run_state:  # Ctrl-C keeps what was measured
        for size in config["sizes"]:
            model, x = build(config, size, device)
            tokens, batch = model.patch_embed.num_patches + model.num_prefix_tokens, x.shape[0]
            outputs, peaks = {}, {}
            for impl in implementations:
                use(model, impl)
                try:
                    with torch.no_grad(), Peak(device) as peak:
                        outputs[impl] = model(x)  # also the warm-up
                    peaks[impl] = (peak.gib if device.type == "cuda"
                                   else in_fresh_process(_peak_in_fresh_process, size, impl))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                progress.step(f"{size}px ({tokens} tokens) x{batch} {impl}: "
                              + (f"+{peaks[impl]:.2f} GiB" if impl in peaks else "out of memory"))
            with torch.no_grad():
                timings = interleaved_timings({i: lambda: model(x) for i in outputs}, config["repeats"],
                                              before=lambda impl: use(model, impl), warmup=0)
            progress.step(f"{size}px timed: " + ", ".join(f"{i} {batch / t.median * 1e3:.0f} img/s"
                                                          + (" (noisy)" if t.noisy else "")
                                                          for i, t in timings.items()))
            limit = speedup_bound(model, tokens)
            for impl in implementations:
                row = dict(impl=impl, model=config["model"], image_size=size, seqlen=tokens, batch=batch,
                           dtype=str(config["dtype"]).removeprefix("torch."), ms=None, images_per_s=None,
                           peak_extra_gib=peaks.get(impl), speedup_limit=limit, max_abs_diff_vs_eager=None)
                if impl in timings:
                    row.update(timings[impl].fields("ms"), images_per_s=batch / timings[impl].median * 1e3,
                               max_abs_diff_vs_eager=(outputs[impl].float() - next(iter(outputs.values())).float())
                               .abs().max().item())
                rows.append(row)
            mark_implausible(rows[-len(implementations):], limit)
            del model, x, outputs
    return write_results(out_dir, "vit", env, rows, summarize(rows, config), run_state.interrupted)


def mark_implausible(size_rows, limit) -> None:
    """Set ``implausible`` (the baselines concerned) on the tileattn row of one image size whose images/s
    ratio to eager or sdpa is, either way, beyond ``limit`` (:func:`speedup_bound`)."""
    by = {r["impl"]: r for r in size_rows if r["images_per_s"]}
    ours = by.get("tileattn")
    baselines = [b for b in ("eager", "sdpa") if ours and b in by
                 and implausible(ours["images_per_s"] / by[b]["images_per_s"], limit)]
    if baselines:
        ours["implausible"] = baselines


def summarize(rows, config) -> str:
    """Images/s of each implementation (median and interquartile range), tileattn's ratios (marked when
    implausible for the size), peak memory, and the largest output difference from the first implementation."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    table = []
    for size in dict.fromkeys(r["image_size"] for r in rows):
        sel = {r["impl"]: r for r in rows if r["image_size"] == size}
        any_row = next(iter(sel.values()))
        ours = sel.get("tileattn", {})

        def ratio(baseline):
            theirs = sel.get(baseline, {}).get("images_per_s")
            if not ours.get("images_per_s") or not theirs:
                return None
            flag = (f" (implausible: > {any_row['speedup_limit']:.1f}x)"
                    if baseline in ours.get("implausible", ()) else "")
            return f"{ours['images_per_s'] / theirs:.3g}{flag}"

        table.append([size, any_row["seqlen"], any_row["batch"],
                      *(rate_cell(any_row["batch"] * 1e3, sel[i]) if i in sel else None for i in impls),
                      ratio("eager"), ratio("sdpa"), *(sel.get(i, {}).get("peak_extra_gib") for i in impls),
                      max((r["max_abs_diff_vs_eager"] or 0) for r in sel.values())])
    headers = ["image px", "tokens", "batch", *(f"{i} img/s" for i in impls), "tileattn / eager", "tileattn / sdpa",
               *(f"{i} +GiB" for i in impls), "max |out - eager's|"]
    return (f"{config['label']} ({config['model']}, random weights), forward only; +GiB: peak memory beyond the "
            "weights and inputs.\n\n" + markdown_table(headers, table) + "\n"
            + flag_notes(rows, "tileattn bench vit", config["repeats"]))
