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


def test_config_validation_and_round_trip():
    config = VAEConfig(latent_dim=3, channels=[4, 8], hidden_dim=9)
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"latent_dim must be in \[1, 512\], got 0"):
        VAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="channels needs at least two positive widths"):
        VAEConfig(channels=(8,))
    with pytest.raises(ValueError, match=r"unknown model config keys: \['depth'\]"):
        VAEConfig.from_dict({"depth": 3})
