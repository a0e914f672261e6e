"""``patch_distill`` / ``unpatch_distill`` on a minimal host package, in this process: every name
the application holds its loss functions by is replaced, and put back. (The side-by-side run
of a full stand-in application is ``test_host_app.py``.)"""

import sys
import textwrap

import pytest

import distill_fused
from distill_fused.api import losses

HOST_FILES = {
    "distill/__init__.py": "",
    "distill/models/__init__.py": """
        from distill.models.losses import compute_combined_loss, get_kl_weight, vae_loss
    """,
    "distill/models/losses.py": """
        def compute_combined_loss(*args, **kwargs):
            return "host"

        def create_stft_loss(loss_config, device):
            return "host"

        def vae_loss(*args, **kwargs):
            return "host"

        def get_kl_weight(*args, **kwargs):
            return "host"

        def compute_kl_divergence(mu, logvar):
            return "host"

        def unrelated():
            return "host"
    """,
    "distill/training/__init__.py": "",
    "distill/training/loop.py": """
        from distill.models.losses import compute_combined_loss as combined
    """,
    "distill/late.py": """
        from distill.models.losses import vae_loss
    """,
    "distill/own_choice.py": """
        from distill_fused import create_stft_loss
    """,
    "distill/validation/__init__.py": "",
}


def _forget_host():
    for name in [n for n in sys.modules if n == "distill" or n.startswith("distill.")]:
        del sys.modules[name]


@pytest.fixture
def host(tmp_path, monkeypatch):
    for path, text in HOST_FILES.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    _forget_host()
    import distill.models
    import distill.models.losses
    import distill.training.loop
    originals = {name: getattr(distill.models.losses, name) for name in
                 ("compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
                  "compute_kl_divergence", "unrelated")}
    yield sys.modules, originals
    distill_fused.unpatch_distill()
    _forget_host()


def _ours(fn, name):
    """``fn`` is the patch's wrapper of this package's function ``name``."""
    return getattr(fn, "__wrapped__", None) is getattr(losses, name)


def test_patch_replaces_every_name_and_undoes(host):
    modules, originals = host
    host_losses, models, loop = (modules["distill.models.losses"], modules["distill.models"],
                                 modules["distill.training.loop"])
    import distill.own_choice  # the application's own import of ours: no patch touches it
    distill_fused.patch_distill()
    for name in ("compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
                 "compute_kl_divergence"):
        assert _ours(getattr(host_losses, name), name), name
    assert models.compute_combined_loss is host_losses.compute_combined_loss
    assert models.get_kl_weight is host_losses.get_kl_weight
    assert loop.combined is host_losses.compute_combined_loss
    assert host_losses.unrelated is originals["unrelated"]
    assert host_losses.get_kl_weight(5, 10, 0.5, 1.0) == 1.0
    assert distill.own_choice.create_stft_loss is losses.create_stft_loss

    import distill.late  # imported while patched: holds ours
    assert distill.late.vae_loss is host_losses.vae_loss

    distill_fused.unpatch_distill()
    for name, original in originals.items():
        assert getattr(host_losses, name) is original, name
    assert models.compute_combined_loss is originals["compute_combined_loss"]
    assert loop.combined is originals["compute_combined_loss"]
    assert distill.late.vae_loss is originals["vae_loss"]
    assert distill.own_choice.create_stft_loss is losses.create_stft_loss
    distill_fused.unpatch_distill()  # a second undo does nothing
    assert host_losses.vae_loss is originals["vae_loss"]


def test_patched_loss_takes_the_patchs_mode_unless_the_call_gives_one(host, monkeypatch):
    modules, _ = host
    distill_fused.patch_distill(nonfinite="warn")
    patched = modules["distill.models.losses"].compute_combined_loss
    assert _ours(patched, "compute_combined_loss")
    assert modules["distill.training.loop"].combined is patched
    seen = []
    monkeypatch.setattr(losses, "nonfinite_mode", lambda mode: seen.append(mode) or "silent")
    with pytest.raises(TypeError, match="recon"):
        patched(None, None, None, None)
    with pytest.raises(TypeError, match="recon"):
        patched(None, None, None, None, nonfinite="count")
    assert seen == ["warn", "count"]


def test_patch_again_replaces_the_patch(host):
    modules, originals = host
    distill_fused.patch_distill(nonfinite="warn")
    first = modules["distill.models.losses"].compute_combined_loss
    distill_fused.patch_distill()
    second = modules["distill.models.losses"].compute_combined_loss
    assert second is not first and _ours(second, "compute_combined_loss")
    assert modules["distill.training.loop"].combined is second
    distill_fused.unpatch_distill()
    assert (modules["distill.models.losses"].compute_combined_loss
            is originals["compute_combined_loss"])


def test_bad_patches_change_nothing(host, tmp_path):
    """A bad call leaves the patch in force as it was, and undoing it still restores all."""
    modules, originals = host
    distill_fused.patch_distill()
    patched = {name: getattr(modules["distill.models.losses"], name) for name in originals}
    with pytest.raises(ValueError, match="nonfinite"):
        distill_fused.patch_distill(nonfinite="loud")
    with pytest.raises(ImportError, match="distill.models.nowhere"):
        distill_fused.patch_distill("distill.models.nowhere")
    with pytest.raises(ValueError, match="defines none of"):
        distill_fused.patch_distill("distill.validation")
    for name, fn in patched.items():
        assert getattr(modules["distill.models.losses"], name) is fn
    distill_fused.unpatch_distill()
    for name, original in originals.items():
        assert getattr(modules["distill.models.losses"], name) is original
