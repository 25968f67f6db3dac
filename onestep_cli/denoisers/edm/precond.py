"""EDM's preconditioning wrappers as `Denoiser`s: `D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`.

`EDMPrecond` is Karras et al.'s preconditioning; `VPPrecond` and `VEPrecond` are the variance-preserving and
variance-exploding parametrisations of Song et al. as EDM expresses them in sigma units. Constructor arguments are
EDM's, so an EDM snapshot's recorded `init_kwargs` rebuild the same network; the wrapped U-Net is `self.model`.
The wrapper always works in float32; only the U-Net runs in float16, and only when `use_fp16` is set and the input
is on CUDA (EDM's rule).
"""

from __future__ import annotations

import torch

from ...errors import OnestepError
from ..base import Denoiser, broadcast_sigma
from .networks import DhariwalUNet, SongUNet

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class _Precond(Denoiser):
    """Shared plumbing: builds the U-Net, prepares labels and dtypes, and applies `scalings(sigma)`."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 model_kwargs: dict):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; use one of {', '.join(MODEL_TYPES)}.")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.augment_dim = model_kwargs.get("augment_dim", 0)
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(c_skip, c_out, c_in, c_noise)` for noise levels `sigma`, each shaped like `sigma`."""
        raise NotImplementedError  # pragma: no cover

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None, *,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised estimate `x0_hat` (float32) of `x = x0 + sigma * eps`.

        `cond`: one-hot class labels `[batch, label_dim]`, or None (all-zero labels, i.e. unconditional, when the
        network is class-conditional). `augment_labels`: EDM's `[batch, augment_dim]` augmentation labels, or None.
        """
        x = x.to(torch.float32)
        sigma = broadcast_sigma(sigma, x)
        class_labels = self._class_labels(cond, x)
        if augment_labels is not None and not self.augment_dim:
            raise ValueError("augment_labels were given but this network was built with augment_dim=0; pass None.")
        dtype = torch.float16 if self.use_fp16 and x.device.type == "cuda" else torch.float32

        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        f_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         augment_labels=augment_labels)
        return c_skip * x + c_out * f_x.to(torch.float32)

    def _class_labels(self, cond: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if self.label_dim == 0:
            if cond is not None:
                raise ValueError("this EDM network is unconditional (label_dim=0); pass cond=None.")
            return None
        if cond is None:
            # One all-zero row broadcasts over the batch: the unconditional input, as in EDM.
            return torch.zeros([1, self.label_dim], device=x.device)
        return cond.to(torch.float32).reshape(-1, self.label_dim)


class EDMPrecond(_Precond):
    """Karras et al. (2022) preconditioning: unit-variance network input and target at every noise level."""

    def __init__(
        self,
        img_resolution: int,                # Image resolution, pixels.
        img_channels: int,                  # Colour channels.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,             # Run the U-Net in float16 on CUDA.
        sigma_min: float = 0,               # Lowest supported noise level.
        sigma_max: float = float("inf"),    # Highest supported noise level.
        sigma_data: float = 0.5,            # Standard deviation of the training data.
        model_type: str = "DhariwalUNet",   # U-Net class name: SongUNet or DhariwalUNet.
        **model_kwargs,                     # Arguments of the U-Net.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                                model_type=model_type, **model_kwargs)

    def scalings(self, sigma):
        """`c_skip = s_d^2/(sigma^2+s_d^2)`, `c_out = sigma s_d/sqrt(sigma^2+s_d^2)`, `c_in = 1/sqrt(s_d^2+sigma^2)`,
        `c_noise = log(sigma)/4`."""
        sigma_data = self.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    """Variance-preserving (DDPM++ "VP") preconditioning with the linear-beta schedule in continuous time."""

    def __init__(
        self,
        img_resolution: int,                # Image resolution, pixels.
        img_channels: int,                  # Colour channels.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,             # Run the U-Net in float16 on CUDA.
        beta_d: float = 19.9,               # Extent of the noise level schedule.
        beta_min: float = 0.1,              # Initial slope of the noise level schedule.
        M: int = 1000,                      # Number of timesteps of the original DDPM formulation.
        epsilon_t: float = 1e-5,            # Smallest t used in training.
        model_type: str = "SongUNet",       # U-Net class name: SongUNet or DhariwalUNet.
        **model_kwargs,                     # Arguments of the U-Net.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        with torch.device("cpu"):  # Numbers, even while snapshot.py builds the network on the meta device.
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t,
                                model_type=model_type, **model_kwargs)

    def scalings(self, sigma):
        """`c_skip = 1`, `c_out = -sigma`, `c_in = 1/sqrt(sigma^2+1)`, `c_noise = (M-1) t(sigma)`."""
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise level at time `t` in [0, 1]: `sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Time `t` of noise level `sigma`, the inverse of `sigma(t)`."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding (NCSN++ "VE") preconditioning."""

    def __init__(
        self,
        img_resolution: int,                # Image resolution, pixels.
        img_channels: int,                  # Colour channels.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,             # Run the U-Net in float16 on CUDA.
        sigma_min: float = 0.02,            # Lowest supported noise level.
        sigma_max: float = 100,             # Highest supported noise level.
        model_type: str = "SongUNet",       # U-Net class name: SongUNet or DhariwalUNet.
        **model_kwargs,                     # Arguments of the U-Net.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, model_type=model_type,
                                **model_kwargs)

    def scalings(self, sigma):
        """`c_skip = 1`, `c_out = sigma`, `c_in = 1`, `c_noise = log(sigma/2)`."""
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


PRECOND_TYPES = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}


class EDMLoadError(OnestepError, ValueError):
    """A file could not be turned into an EDM denoiser; the message names the file and what to do."""


def build_precond(class_name: str, init_kwargs: dict, init_args: tuple = ()) -> _Precond:
    """A freshly initialised `class_name` (EDMPrecond, VPPrecond or VEPrecond) built from EDM-style arguments.

    Raises ValueError naming the class and the offending argument when they do not describe a supported network.
    """
    if class_name not in PRECOND_TYPES:
        raise ValueError(f"the network class {class_name!r} is not supported; supported: {', '.join(PRECOND_TYPES)}.")
    try:
        return PRECOND_TYPES[class_name](*init_args, **init_kwargs)
    except TypeError as error:
        raise ValueError(f"{class_name} cannot be built from the arguments {init_kwargs}: {error}.") from error
