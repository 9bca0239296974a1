"""The typed ``config.json`` of a run folder: everything needed to rebuild the network and its
schedule with no flags (as nanoGPT saves its model config in every checkpoint), plus the
training options and, for a run written by ``ddpm import``, where it came from.

:class:`RunConfig` is the one writer of ``config.json`` (the trainer and ``ddpm import`` build
it) and the one reader of it and of the copy each checkpoint carries in its metadata (``ddpm
info``, ``sample``, ``eval``, the memorisation check, resume, the benchmarks). The migrations of
runs written by older versions live in :meth:`RunConfig.from_dict` alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..core.samplers import CONSISTENCY_SAMPLER, DEFAULT_SAMPLER
from ..core.schedule import Schedule
from ..core.unet import UNetConfig
from ..errors import DDPMError
from ..files.atomic import atomic_write_json
from .folder import RunFolder

__all__ = ["RunConfig"]


@dataclass
class RunConfig:
    """A run's configuration.

    ``model``: the UNet's architecture; ``schedule``: the diffusion schedule (alphas_cumprod and
    friends, float64); ``prediction``: the network's target, ``eps`` (Ho et al. 2020), ``v``
    (Salimans & Ho 2022) or ``x0``; ``classes``: class names of a conditional run (label i is
    class i; None when unconditional); ``num_images``: the training set's size, in images;
    ``train``: the :class:`ddpm.train.TrainConfig` fields as saved (a plain dict: this floor
    does not know the trainer's options; the trainer reads them); ``imported``: for a run
    written by ``ddpm import``, its source (None otherwise); ``ddpm_version``: the package
    version that wrote it; ``data``: the identity of the training data
    (:func:`ddpm.data.sets.data_identity`: its absolute path, image count and a digest of its file
    names), checked when the run resumes (None for runs written before it was recorded).
    """

    model: UNetConfig
    schedule: Schedule
    prediction: str = "eps"
    classes: list[str] | None = None
    num_images: int | None = None
    train: dict[str, Any] = field(default_factory=dict)
    imported: dict[str, Any] | None = None
    ddpm_version: str = __version__
    data: dict[str, Any] | None = None

    @property
    def image_size(self) -> int:
        """The side of the run's square images, in pixels."""
        return int(self.model.image_size)

    @property
    def conditional(self) -> bool:
        """Whether the run was trained with class labels."""
        return bool(self.classes)

    @property
    def consistency(self) -> bool:
        """Whether the network is a consistency model (``ddpm distill``: the training option
        ``objective`` is ``consistency``, and ``init_from`` names the teacher's checkpoint)."""
        return self.train.get("objective") == "consistency"

    @property
    def default_sampler(self) -> str:
        """The sampler ``ddpm sample`` and ``ddpm eval`` use for this run when none is named."""
        return CONSISTENCY_SAMPLER if self.consistency else DEFAULT_SAMPLER

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``config.json`` (and of each checkpoint's metadata); the keys are
        those every version since the first has written."""
        out: dict[str, Any] = {
            "ddpm_version": self.ddpm_version, "model": self.model.to_dict(), "schedule": self.schedule.to_dict(),
            "prediction": self.prediction, "classes": self.classes, "image_size": self.image_size,
            "num_images": self.num_images, "train": dict(self.train),
        }
        if self.imported is not None:
            out["imported"] = self.imported
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> "RunConfig":
        """A :class:`RunConfig` from a ``config.json`` object, migrating older runs: a run saved
        before the target was recorded predicted ``eps``; one saved before class names were
        recorded is unconditional. Raises :class:`DDPMError` naming ``source`` for an object
        without a model or schedule, or with values of the wrong kind."""
        if not isinstance(d, dict) or "model" not in d or "schedule" not in d:
            raise DDPMError(f"{source} is not a ddpm run config (it has no model and schedule)")
        try:
            return cls(model=UNetConfig.from_dict(d["model"]), schedule=Schedule.from_dict(d["schedule"]),
                       prediction=str(d.get("prediction") or "eps"), classes=d.get("classes"),
                       num_images=d.get("num_images"), train=dict(d.get("train") or {}), imported=d.get("imported"),
                       ddpm_version=str(d.get("ddpm_version", "unknown")), data=d.get("data"))
        except (TypeError, ValueError, KeyError) as e:
            raise DDPMError(f"{source} holds an unusable run config: {e}") from None

    @classmethod
    def read(cls, folder: RunFolder) -> "RunConfig":
        """The ``config.json`` of ``folder``. Raises :class:`DDPMError` naming the file when it is
        missing, unreadable or not a run config."""
        path = folder.config_path
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DDPMError(f"{str(path)!r} does not exist; expected a run folder written by 'ddpm train' or "
                            "'ddpm import'") from None
        except (OSError, ValueError) as e:
            raise DDPMError(f"cannot read {str(path)!r}: {e}") from None
        return cls.from_dict(data, repr(str(path)))

    def write(self, folder: RunFolder) -> None:
        """Write ``folder/config.json`` atomically (a failure is the one-line message of
        :meth:`RunFolder.write_errors`)."""
        with folder.write_errors("config.json"):
            folder.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder.config_path, self.to_dict())
