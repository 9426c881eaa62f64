"""Transformers enable_lvsa recognises but does not support yet get a NotImplementedError saying why."""
import pytest

pytest.importorskip("diffusers")
from diffusers import Cosmos3OmniTransformer  # noqa: E402

from lvsa_kernels.diffusers import enable_lvsa  # noqa: E402


def test_cosmos3_is_a_clear_not_implemented_error():
    model = Cosmos3OmniTransformer(head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_hidden_layers=1, num_key_value_heads=1, vocab_size=32, latent_channel=4,
                                   patch_latent_dim=16)
    with pytest.raises(NotImplementedError, match=r"LVSA \(Cosmos3OmniTransformer\): not supported: .*rectangular"):
        enable_lvsa(model)
    assert "_lvsa_handle" not in model.__dict__ and not model._forward_pre_hooks
