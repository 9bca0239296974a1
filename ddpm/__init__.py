"""ddpm: denoising diffusion probabilistic models in plain PyTorch.

The pieces compose::

    import ddpm, torch
    net = ddpm.UNet(ddpm.UNetConfig.preset("ddpm-cifar10", num_classes=10))
    sched = ddpm.Schedule.sigmoid()
    loss = ddpm.diffusion_loss(net, sched, images, labels, prediction="v", null_class=10).mean()
    model = ddpm.eps_model(ddpm.guided(net, labels, scale=3.0), sched, "v")
    x = ddpm.samplers.dpm_solver(model, torch.randn(8, 3, 32, 32), sched, steps=20)
"""

from . import samplers
from .ema import EMA, edm_ema_decay
from .guidance import guided
from .losses import diffusion_loss, drop_labels, timestep_probabilities
from .samplers import eps_model
from .schedule import Schedule
from .unet import PRESETS, UNet, UNetConfig, count_parameters

__version__ = "0.1.0"

__all__ = ["EMA", "PRESETS", "Schedule", "UNet", "UNetConfig", "count_parameters", "diffusion_loss",
           "drop_labels", "edm_ema_decay", "eps_model", "guided", "samplers", "timestep_probabilities", "__version__"]
