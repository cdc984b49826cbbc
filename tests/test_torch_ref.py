"""Equivalence with the reference PyTorch implementations (timm, Hugging Face).

Random-init reference models (no hub downloads) are saved to safetensors, loaded with
``load_pretrained`` and must give the same logits (max abs diff < 1e-4, fp32). Needs the
``torch-ref`` extra; skipped without it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file as save_np  # noqa: E402

from qvec_jax import pretrained as ck  # noqa: E402

pytestmark = pytest.mark.torch_ref
TOL = 1e-4


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``torchvision`` modules, used only while importing timm/transformers when the
    installed torchvision cannot load (e.g. a CUDA build next to a CPU-only torch). timm
    imports torchvision at module level for data transforms; its ViT never calls it."""

    class _Meta(type):
        def __getattr__(cls, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return f"{cls.__name__}.{attr}"

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []

        def getattr_(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return self._Meta(attr, (), {})

        mod.__getattr__ = getattr_
        return mod

    def exec_module(self, module):
        pass


def _drop_torchvision():
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]


def _import_refs():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except Exception:  # installed but broken binary: import the references without it
        _drop_torchvision()
        finder = _TorchvisionStandIn()
        sys.meta_path.insert(0, finder)
        try:
            import timm
            from transformers.models.vit import modeling_vit
        except ImportError as e:
            pytest.skip(f"torch-ref extra incomplete: {e}", allow_module_level=True)
        finally:
            sys.meta_path.remove(finder)
            _drop_torchvision()
        return timm, modeling_vit
    timm = pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from transformers.models.vit import modeling_vit

    return timm, modeling_vit


timm, modeling_vit = _import_refs()


def _perturb(module, seed=0, scale=0.05):
    """Make every parameter (biases, norms, cls, posemb too) random, so no mapping hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def _images(n, size, seed=0):
    x = np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _save_state_dict(module, path):
    save_np({k: v.detach().numpy().copy() for k, v in module.state_dict().items()}, str(path))
    return path


def _ours(path, x, **kw):
    model, params = ck.load_pretrained(path, num_classes=None, image_size=x.shape[1], **kw)
    return model, params, np.asarray(model.apply({"params": params}, x))


def test_timm_small_vit_logits(tmp_path):
    from vit_layouts import to_big_vision

    ref = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7))
    x, xt = _images(2, 224)
    with torch.no_grad():
        want = ref(xt).numpy()
    path = _save_state_dict(ref, tmp_path / "ti16.safetensors")
    model, params, got = _ours(path, x)
    assert (model.width, model.num_heads, model.depth, model.num_classes) == (192, 3, 12, 7)
    assert np.abs(got - want).max() < TOL
    # The same weights written as Google and big_vision .npz give the same logits.
    from qvec_jax import flatten

    np.savez(tmp_path / "g.npz", **{k: np.asarray(v) for k, v in flatten(params).items()})
    np.savez(tmp_path / "bv.npz", **to_big_vision(jax_to_np(params)))
    for name in ("g.npz", "bv.npz"):
        _, _, got2 = _ours(tmp_path / name, x)
        assert np.abs(got2 - want).max() < TOL, name


def jax_to_np(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


@pytest.mark.slow
def test_timm_vit_b16_logits(tmp_path):
    ref = _perturb(timm.create_model("vit_base_patch16_224", pretrained=False), scale=0.02)
    x, xt = _images(2, 224, seed=1)
    with torch.no_grad():
        want = ref(xt).numpy()
    model, _, got = _ours(_save_state_dict(ref, tmp_path / "b16.safetensors"), x)
    assert (model.width, model.depth, model.num_heads, model.num_classes) == (768, 12, 12, 1000)
    assert np.abs(got - want).max() < TOL


def _hf_config(**kw):
    return modeling_vit.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=4,
        layer_norm_eps=1e-6,  # HF's default is 1e-12; the Google checkpoints use 1e-6
        **kw,
    )


def test_hf_vit_for_image_classification_logits(tmp_path):
    ref = _perturb(modeling_vit.ViTForImageClassification(_hf_config(num_labels=5)), seed=1)
    x, xt = _images(3, 28, seed=2)
    with torch.no_grad():
        want = ref(pixel_values=xt).logits.numpy()
    ref.save_pretrained(tmp_path / "hf")  # the on-disk layout (model.safetensors + config)
    model, _, got = _ours(tmp_path / "hf", x)
    assert model.num_classes == 5 and model.num_heads == 2
    assert np.abs(got - want).max() < TOL
    # the in-memory state_dict names of transformers >= 5 load too
    _, _, got2 = _ours(_save_state_dict(ref, tmp_path / "sd.safetensors"), x)
    assert np.abs(got2 - want).max() < TOL


def test_hf_vit_model_pooler_is_pre_logits(tmp_path):
    ref = _perturb(modeling_vit.ViTModel(_hf_config()), seed=3)
    x, xt = _images(2, 28, seed=4)
    with torch.no_grad():
        want = ref(pixel_values=xt).pooler_output.numpy()
    ref.save_pretrained(tmp_path / "hfm")
    model, params, got = _ours(tmp_path / "hfm" / "model.safetensors", x)
    assert model.num_classes is None and model.representation_size == 32
    assert "pre_logits" in params and "head" not in params
    assert np.abs(got - want).max() < TOL
