"""Images of the wrong layout or size get an error that names the fix."""
import jax.numpy as jnp
import pytest

from toppax.models import create


@pytest.mark.parametrize("shape,fix", [
    ((1, 3, 32, 32), "channels-first"), ((1, 48, 48, 3), "img_size=48"),
    ((1, 32, 32, 1), "3 channels"), ((32, 32, 3), "4-D")])
def test_vim_names_the_fix_for_bad_images(shape, fix):
  model = create("vim_t", img_size=32, patch_size=8, depth=2, embed_dim=32)
  with pytest.raises(ValueError, match="expected NHWC") as e:
    model(jnp.zeros(shape))
  assert fix in str(e.value)


def test_plainmamba_names_channels_first_images():
  model = create("plainmamba_l1", img_size=80, embed_dims=16, num_layers=3,
                 num_convs_patch_embed=1, layers_with_dwconv=(0,), d_state=4, conv_size=5,
                 num_classes=5)
  with pytest.raises(ValueError, match="channels-first"):
    model(jnp.zeros((1, 3, 80, 80)))
