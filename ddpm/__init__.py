"""ddpm: denoising diffusion probabilistic models in plain PyTorch.

The pieces compose::

    import ddpm, torch
    net = ddpm.UNet(ddpm.UNetConfig.preset("ddpm-cifar10", num_classes=10))
    sched = ddpm.Schedule.linear()
    loss = ddpm.diffusion_loss(net, sched, images, labels, null_class=10).mean()
    x = ddpm.samplers.dpm_solver(ddpm.guided(net, labels, scale=3.0), torch.randn(8, 3, 32, 32), sched, steps=20)
"""

from . import samplers
from .ema import EMA
from .guidance import guided
from .losses import diffusion_loss, drop_labels
from .schedule import Schedule
from .unet import PRESETS, UNet, UNetConfig, count_parameters

__version__ = "0.1.0"

__all__ = ["EMA", "PRESETS", "Schedule", "UNet", "UNetConfig", "count_parameters", "diffusion_loss",
           "drop_labels", "guided", "samplers", "__version__"]
