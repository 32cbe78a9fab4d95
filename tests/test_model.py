import pytest
import torch

from vae_edge.training.model import VAE, VAEConfig, loss_parts


@pytest.mark.parametrize("channels", [(8, 16), (8, 16, 24)])
@pytest.mark.parametrize("batch", [1, 7])
def test_shapes(channels, batch):
    model = VAE(VAEConfig(latent_dim=5, channels=channels, hidden_dim=16))
    x = torch.rand(batch, 1, 28, 28)
    mu, log_var = model.encode(x)
    assert mu.shape == log_var.shape == (batch, 5)
    images = model.decode(mu)
    assert images.shape == (batch, 1, 28, 28)
    assert 0 <= images.min() and images.max() <= 1


def test_reparameterize_uses_generator():
    mu, log_var = torch.zeros(3, 4), torch.zeros(3, 4)
    a = VAE.reparameterize(mu, log_var, torch.Generator().manual_seed(1))
    b = VAE.reparameterize(mu, log_var, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    shifted = VAE.reparameterize(mu + 5, torch.full((3, 4), -100.0))
    assert torch.allclose(shifted, torch.full((3, 4), 5.0))


def test_kl_closed_form_matches_definition():
    mu = torch.tensor([[0.5, -1.0]])
    log_var = torch.tensor([[0.2, -0.7]])
    _, kl = loss_parts(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28), mu, log_var)
    var = log_var.exp()
    expected = 0.5 * (var + mu**2 - 1 - log_var).sum()
    assert torch.allclose(kl, expected.reshape(1))
    _, zero = loss_parts(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28),
                         torch.zeros(1, 2), torch.zeros(1, 2))
    assert zero.item() == 0.0


def test_kl_is_one_formula_for_training_and_evaluation():
    # vae-eval reports KL on numpy float64 arrays with the formula training minimises on tensors
    import numpy as np

    from vae_edge.training.kl import kl_to_prior

    mu = np.array([[0.5, -1.0, 2.0], [0.0, 0.3, -0.1]])
    log_var = np.array([[0.2, -0.7, 1.5], [0.0, -3.0, 0.4]])
    _, trained = loss_parts(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28),
                            torch.tensor(mu, dtype=torch.float64),
                            torch.tensor(log_var, dtype=torch.float64))
    evaluated = kl_to_prior(mu, log_var, np.exp)
    np.testing.assert_allclose(evaluated, trained.numpy(), rtol=1e-12)
    np.testing.assert_allclose(evaluated, 0.5 * (np.exp(log_var) + mu**2 - 1 - log_var).sum(1),
                               rtol=1e-12)


def test_config_validation_and_round_trip():
    config = VAEConfig(latent_dim=3, channels=[4, 8], hidden_dim=9)
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"latent_dim must be in \[1, 512\], got 0"):
        VAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match=r"channels needs at least one positive width, got \(\)"):
        VAEConfig(channels=())
    for size in (30, 512, 12):
        with pytest.raises(ValueError,
                           match=f"image_size must be a multiple of 4 from 16 to 256, got {size}"):
            VAEConfig(image_size=size)
    with pytest.raises(ValueError, match=r"image_channels must be 1 \(grayscale\) or 3 \(colour\), "
                       "got 2"):
        VAEConfig(image_channels=2)
    with pytest.raises(ValueError, match=r"unknown model config keys: \['depth'\]"):
        VAEConfig.from_dict({"depth": 3})


def test_default_config_keeps_the_shipped_architecture():
    """(28, 1 channel, widths 32, 64): the modules the shipped model's weights load into."""
    state = VAE(VAEConfig(num_classes=10)).state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    assert shapes == {
        "encoder_conv.0.weight": (32, 1, 4, 4), "encoder_conv.0.bias": (32,),
        "encoder_conv.2.weight": (64, 32, 4, 4), "encoder_conv.2.bias": (64,),
        "encoder_fc.0.weight": (256, 3136), "encoder_fc.0.bias": (256,),
        "to_mu.weight": (16, 256), "to_mu.bias": (16,),
        "to_log_var.weight": (16, 256), "to_log_var.bias": (16,),
        "decoder_fc.0.weight": (256, 16), "decoder_fc.0.bias": (256,),
        "decoder_fc.2.weight": (3136, 256), "decoder_fc.2.bias": (3136,),
        "decoder_conv.0.weight": (64, 32, 4, 4), "decoder_conv.0.bias": (32,),
        "decoder_conv.2.weight": (32, 1, 4, 4), "decoder_conv.2.bias": (1,),
        "classifier.weight": (10, 16), "classifier.bias": (10,),
    }


def test_shipped_checkpoint_config_loads():
    """The shipped bundle's model config (written before image channels were recorded)."""
    import json

    from vae_edge.runtime.bundle import default_bundle_path

    manifest = json.loads((default_bundle_path() / "manifest.json").read_text())
    config = VAEConfig.from_dict(manifest["model_config"])
    assert (config.image_size, config.image_channels, config.channels) == (28, 1, (32, 64))


@pytest.mark.parametrize("size, image_channels, stages, widths", [
    (16, 1, 2, (8, 16)), (28, 1, 2, (8, 16)), (32, 3, 3, (8, 16, 32)),
    (64, 3, 4, (8, 16, 32, 64)), (44, 3, 2, (8, 16)),
])
def test_architecture_follows_the_image(size, image_channels, stages, widths):
    config = VAEConfig(latent_dim=4, channels=(8, 16), hidden_dim=16, image_size=size,
                       image_channels=image_channels)
    assert config.stages == stages and config.channels == widths
    assert VAEConfig.from_dict(config.to_dict()) == config
    model = VAE(config)
    x = torch.rand(2, image_channels, size, size)
    mu, log_var = model.encode(x)
    assert mu.shape == (2, 4)
    assert model.decode(mu).shape == x.shape
    strided = [layer for layer in model.encoder_conv
               if isinstance(layer, torch.nn.Conv2d) and layer.stride == (2, 2)]
    assert len(strided) == stages


def test_widths_added_by_doubling_stop_at_256():
    assert VAEConfig(channels=(200,), image_size=64).channels == (200, 256, 256, 256)
    assert VAEConfig(channels=(512,), image_size=32).channels == (512, 512, 512)
    # more widths than stages: the extra layers keep the resolution
    assert VAEConfig(channels=(8, 16, 24), image_size=16).channels == (8, 16, 24)
