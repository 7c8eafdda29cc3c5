"""tileattn.integrations.timm.patch on timm ViTs: outputs match the unpatched model."""

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import tileattn.integrations.timm as tileattn_timm  # noqa: E402

from conftest import DEVICE, HAS_CUDA  # noqa: E402

# auto may pick SDPA's own kernel for these plain calls: also check tileattn's kernels on the same forward.
BACKENDS = ["auto", "triton" if HAS_CUDA else "torch"]


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_patch16_224", dict(img_size=64)),
    ("deit_tiny_patch16_224", dict(img_size=64)),
    ("vit_small_patch16_224", dict(img_size=48, qk_norm=True)),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_vit_matches_unpatched(name, kwargs, backend):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).to(DEVICE).eval()
    patched = copy.deepcopy(model)
    count = tileattn_timm.patch(patched, backend=backend)
    assert count == len(model.blocks)
    assert patched.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "eva02_base_patch14_224"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_patched_vit_half_precision_gpu(name, backend):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).cuda().eval().half()
    patched = copy.deepcopy(model)
    tileattn_timm.patch(patched, backend=backend)
    x = torch.randn(4, 3, 224, 224, device="cuda").half()
    with torch.no_grad():
        expected, got = model(x).float(), patched(x).float()
    assert (got - expected).abs().max().item() < 2e-2 * expected.abs().max().item()


def test_patch_sets_the_backend_and_can_repatch():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).to(DEVICE).eval()
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
    assert tileattn_timm.patch(model, backend="torch") == len(model.blocks)
    assert {m.tileattn_backend for m in model.modules() if hasattr(m, "qkv")} == {"torch"}
    assert tileattn_timm.patch(model) == len(model.blocks)  # patching again only changes the backend
    assert {m.tileattn_backend for m in model.modules() if hasattr(m, "qkv")} == {"auto"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="backend must be one of"):
        tileattn_timm.patch(model, backend="cuda")


@pytest.mark.parametrize("name,kwargs", [
    ("eva02_tiny_patch14_224", dict(img_size=56)),                 # rotary embeddings, SwiGLU, q/v biases
    ("eva02_small_patch14_224", dict(img_size=42, qkv_fused=False)),  # separate q/k/v projections
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_eva_matches_unpatched(name, kwargs, backend):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).to(DEVICE).eval()
    patched = copy.deepcopy(model)
    assert tileattn_timm.patch(patched, backend=backend) == len(model.blocks)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-4, atol=1e-4)
    assert tileattn_timm.unpatch(patched) == len(model.blocks)
    assert type(patched.blocks[0].attn) is type(model.blocks[0].attn)
