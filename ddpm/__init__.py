"""ddpm: denoising diffusion probabilistic models in plain PyTorch.

The pieces compose::

    import ddpm, torch
    net = ddpm.UNet(ddpm.UNetConfig.preset("ddpm-cifar10", num_classes=10))
    sched = ddpm.Schedule.sigmoid()
    loss = ddpm.diffusion_loss(net, sched, images, labels, prediction="v", null_class=10).mean()
    model = ddpm.eps_model(ddpm.guided(net, labels, scale=3.0), sched, "v")
    x = ddpm.core.samplers.dpm_solver(model, torch.randn(8, 3, 32, 32), sched, steps=20)
"""

import os as _os
import sys as _sys


def _cpu_sharing_default() -> None:
    """For the ``ddpm`` command (and ``python -m ddpm``, ``torchrun -m ddpm``): OpenMP threads
    sleep instead of spin-waiting, unless the user set ``OMP_WAIT_POLICY`` themselves.

    Measured on a 2-core CPU (``benchmarks/contention.py``, small preset, batch 32): beside one
    busy single-threaded job, training ran at 13.9 images/s with torch's default spin-wait and
    took a third of the other job's speed; with PASSIVE it ran at 18.5 and left the other job 90%
    of its speed, for 8% less alone (38.9 -> 35.8 images/s). It has to be decided here, before
    torch loads its OpenMP runtime, which reads the variable once; library users (``import
    ddpm`` from their own program) keep their own environment.
    """
    command = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    # while ``python -m ddpm`` locates the package, sys.argv[0] is "-m"
    if "torch" not in _sys.modules and command in ("ddpm", "ddpm.exe", "-m"):
        _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_cpu_sharing_default()

from .core import samplers  # noqa: E402  (after the OpenMP default above)
from .core.ema import EMA, edm_ema_decay
from .core.guidance import guided
from .core.losses import diffusion_loss, drop_labels, timestep_probabilities
from .core.samplers import eps_model
from .core.schedule import Schedule
from .core.unet import PRESETS, UNet, UNetConfig, count_parameters

__version__ = "0.1.0"

__all__ = ["EMA", "PRESETS", "Schedule", "UNet", "UNetConfig", "count_parameters", "diffusion_loss",
           "drop_labels", "edm_ema_decay", "eps_model", "guided", "samplers", "timestep_probabilities", "__version__"]
