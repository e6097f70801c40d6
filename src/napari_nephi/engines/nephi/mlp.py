"""Coordinate networks ``f(x, z)``: a displacement at points ``x`` given latent codes ``z(x)``.

- :class:`ModulatedSiren` (NePhi; Mehta et al. 2021): coordinates are embedded with random Fourier
  features; a *synthesis* branch of sine layers produces hidden activations that are multiplied,
  layer by layer, by a *modulation* branch of ReLU layers fed with ``[latent code, embedding]``.
- :class:`Siren` (IDIR, Wolterink et al. 2022): sine layers on ``[x, z]``.
- :class:`ReluFourier`: a ReLU MLP on ``[Fourier features of x, z]``.

The last layer of each is initialised to zero, so a fresh network is the zero displacement
(an identity map). Weights are drawn from a local generator: the same ``seed`` gives the same
network without touching torch's global random state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.errors import InputError
from .fourier import FourierFeatures

REPRESENTATIONS = ("modulated", "siren", "relu_fourier")


def _uniform_(linear: nn.Linear, bound: float, g: torch.Generator) -> nn.Linear:
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=g)
        fan_in = linear.weight.shape[1]
        linear.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=g)
    return linear


def _zero_(linear: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    return linear


class SineLayer(nn.Module):
    """``sin(omega * (W x + b))`` with SIREN initialisation (Sitzmann et al. 2020)."""

    def __init__(self, in_features: int, out_features: int, omega: float, first: bool, g: torch.Generator):
        super().__init__()
        self.omega = float(omega)
        bound = 1 / in_features if first else math.sqrt(6 / in_features) / self.omega
        self.linear = _uniform_(nn.Linear(in_features, out_features), bound, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega * self.linear(x))


class ModulatedSiren(nn.Module):
    """Synthesis sine layers on Fourier features, gated by ReLU modulators fed ``[z, embedding]``."""

    def __init__(
        self,
        ndim: int,
        latent_dim: int,
        hidden: int = 64,
        layers: int = 3,
        n_frequencies: int = 32,
        fourier_scale: float = 2.0,
        omega: float = 30.0,
        seed: int = 0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.embed = FourierFeatures(ndim, n_frequencies, fourier_scale, seed=seed)
        e = self.embed.out_features
        # The embedding is already periodic with unit amplitude, so every synthesis layer,
        # the first included, uses SIREN's hidden-layer initialisation.
        self.synthesis = nn.ModuleList(
            SineLayer(e if i == 0 else hidden, hidden, omega, first=False, g=g) for i in range(layers)
        )
        self.modulation = nn.ModuleList(
            _uniform_(nn.Linear((0 if i == 0 else hidden) + latent_dim + e, hidden), 1 / math.sqrt(hidden), g)
            for i in range(layers)
        )
        self.out = _zero_(nn.Linear(hidden, ndim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        e = self.embed(x)
        ze = e if z is None else torch.cat([z, e], dim=-1)
        h, m = e, None
        for syn, mod in zip(self.synthesis, self.modulation):
            m = torch.relu(mod(ze if m is None else torch.cat([m, ze], dim=-1)))
            h = syn(h) * m
        return self.out(h)


class Siren(nn.Module):
    """Plain SIREN on ``[x, z]`` (the first layer's ``first_omega`` sets the frequency content)."""

    def __init__(
        self,
        ndim: int,
        latent_dim: int,
        hidden: int = 64,
        layers: int = 3,
        omega: float = 30.0,
        first_omega: float = 8.0,
        seed: int = 0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        dims = [ndim + latent_dim] + [hidden] * layers
        self.net = nn.Sequential(
            *(
                SineLayer(dims[i], dims[i + 1], first_omega if i == 0 else omega, first=i == 0, g=g)
                for i in range(layers)
            )
        )
        self.out = _zero_(nn.Linear(hidden, ndim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        inp = x if z is None else torch.cat([x, z], dim=-1)
        return self.out(self.net(inp))


class ReluFourier(nn.Module):
    """ReLU MLP on ``[Fourier features of x, z]``."""

    def __init__(
        self,
        ndim: int,
        latent_dim: int,
        hidden: int = 64,
        layers: int = 3,
        n_frequencies: int = 32,
        fourier_scale: float = 2.0,
        seed: int = 0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.embed = FourierFeatures(ndim, n_frequencies, fourier_scale, seed=seed)
        dims = [self.embed.out_features + latent_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for i in range(layers):
            mods += [_uniform_(nn.Linear(dims[i], dims[i + 1]), math.sqrt(6 / dims[i]), g), nn.ReLU()]
        self.net = nn.Sequential(*mods)
        self.out = _zero_(nn.Linear(hidden, ndim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        e = self.embed(x)
        inp = e if z is None else torch.cat([e, z], dim=-1)
        return self.out(self.net(inp))


def build_network(
    representation: str,
    ndim: int,
    latent_dim: int,
    hidden: int,
    layers: int,
    n_frequencies: int,
    fourier_scale: float,
    omega: float,
    first_omega: float,
    seed: int,
) -> nn.Module:
    """One coordinate network of the kind ``representation`` (see :data:`REPRESENTATIONS`).

    ``nn.Linear`` draws default weights from the global generator before ours overwrite them;
    forking the generator keeps torch's global random state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        return _build(
            representation,
            ndim,
            latent_dim,
            hidden,
            layers,
            n_frequencies,
            fourier_scale,
            omega,
            first_omega,
            seed,
        )


def _build(
    representation, ndim, latent_dim, hidden, layers, n_frequencies, fourier_scale, omega, first_omega, seed
):
    if representation == "modulated":
        return ModulatedSiren(ndim, latent_dim, hidden, layers, n_frequencies, fourier_scale, omega, seed)
    if representation == "siren":
        return Siren(ndim, latent_dim, hidden, layers, omega, first_omega, seed)
    if representation == "relu_fourier":
        return ReluFourier(ndim, latent_dim, hidden, layers, n_frequencies, fourier_scale, seed)
    raise InputError(
        f"Unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}."
    )
