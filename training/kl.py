"""KL(q(z|x) || N(0, I)) for a diagonal Gaussian posterior, in closed form, nats per row.

Training minimises it on torch tensors and vae-eval reports it on numpy arrays; both call this
one formula, passing their own exp, so the figure evaluated is the one trained."""


def kl_to_prior(mu, log_var, exp):
    """Per-row KL of N(mu, diag exp(log_var)) from N(0, I): (B, d) -> (B,). exp is torch.exp
    or numpy.exp."""
    return -0.5 * (1.0 + log_var - mu ** 2 - exp(log_var)).sum(-1)
