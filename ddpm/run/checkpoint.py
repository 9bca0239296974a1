"""Checkpoints and run folders: safetensors + JSON, never pickles.

A run folder holds ``config.json`` (everything needed to rebuild the model and schedule, class
names included) and ``checkpoints/ckpt_<step>.safetensors``. One checkpoint is one file:
tensors (model, EMA, optimiser state) plus, in the safetensors metadata, the JSON
config and a JSON skeleton of the nested training state with tensors replaced by references.
Loading therefore never executes code, and a single ``os.replace`` makes a write atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DDPMError, first_line
from ..files.atomic import atomic_write_to, remove_temp_files
from ..files.images import class_name
from .config import RunConfig
from .folder import RunFolder, latest_checkpoint, list_checkpoints
from ..core.schedule import Schedule
from ..core.unet import UNet

__all__ = ["Run", "Sampleable", "save_checkpoint", "save_safetensors", "load_checkpoint", "list_checkpoints",
           "latest_checkpoint", "load_run", "weights_sha256", "run_info"]

_TENSOR_REF = "__tensor__"


# ------------------------------------------------------------------ nested state <-> tensors
def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting tensors by key."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        # safetensors refuses shared or non-contiguous storage: give each tensor its own copy.
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR_REF: key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            # JSON keys are strings; optimiser state uses int keys, so record the type.
            ks = f"{type(k).__name__}:{k}"
            out[ks] = _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)
        return {"__dict__": out}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "__tuple__": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (only tensors, numbers, strings, lists, dicts)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR_REF in obj:
            return tensors[obj[_TENSOR_REF]]
        if "__dict__" in obj:
            out = {}
            for ks, v in obj["__dict__"].items():
                kind, _, k = ks.partition(":")
                out[int(k) if kind == "int" else k] = _unflatten(v, tensors)
            return out
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("__tuple__") else items
    return obj


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir: str | Path, step: int, config: RunConfig | dict[str, Any], state: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write ``checkpoints/ckpt_<step>.safetensors`` atomically, then prune to the newest ``keep``.

    ``state`` is a nested dict of tensors and plain values (``model``, ``ema``, ``optimizer``,
    ``rng``, ...); ``config`` is the run's JSON config. Raises
    :class:`~ddpm.files.atomic.OutputWriteError` (an ``OSError`` and a ``DDPMError``) when the file
    cannot be written (a full disk: errno ENOSPC or EFBIG); the earlier checkpoints are then
    untouched and no temporary file is left.
    """
    folder = RunFolder(run_dir)
    ckpt_dir = folder.checkpoints_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    config_dict = config.to_dict() if isinstance(config, RunConfig) else config
    metadata = {"format": "ddpm-checkpoint-1", "step": str(step), "config": json.dumps(config_dict, sort_keys=True),
                "state": json.dumps(skeleton)}
    path = save_safetensors(folder.checkpoint_path(step), tensors, metadata)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    # Temporary files left by writes that a kill interrupted are full-size: remove them.
    remove_temp_files(ckpt_dir)
    return path


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (contiguous, unshared) and string ``metadata`` to a safetensors file at
    ``path`` atomically (:func:`ddpm.files.atomic.atomic_write_to`); returns ``path``. Raises
    :class:`~ddpm.files.atomic.OutputWriteError` when the file cannot be written, errno included."""
    path = Path(path)

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            # The Rust writer reports a full disk as its own error type; callers handle file
            # system trouble as OSError, so pass it on as one, errno included.
            m = re.search(r"os error (\d+)", str(e))
            if m is None:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None

    # By name: the Rust writer opens the file itself, and streams it instead of building a copy in memory.
    return atomic_write_to(path, write)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    only: tuple[str, ...] | None = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(step, config, state)`` from a checkpoint file; ``only`` restricts to top-level keys."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "ddpm-checkpoint-1":
                raise DDPMError(f"{str(path)!r} is not a ddpm checkpoint (no 'ddpm-checkpoint-1' metadata)")
            keys = [k for k in f.keys() if only is None or k.split(".", 1)[0] in only]
            tensors = {k: f.get_tensor(k) for k in keys}
    except DDPMError:
        raise
    except Exception as e:
        raise DDPMError(f"cannot read checkpoint {str(path)!r}: {first_line(e)}")
    skeleton = json.loads(meta["state"])
    if only is not None:
        skeleton = {"__dict__": {k: v for k, v in skeleton["__dict__"].items() if k.partition(":")[2] in only}}
    return int(meta["step"]), json.loads(meta["config"]), _unflatten(skeleton, tensors)


# ------------------------------------------------------------------------------------ runs
@dataclass
class Sampleable:
    """A network ready to sample from, held in memory: what :func:`ddpm.sample.engine.generate` needs.

    ``model`` and ``ema_model`` are :class:`~ddpm.core.unet.UNet` networks (the EMA one may be None);
    ``schedule`` is the diffusion schedule they were trained with, ``prediction`` the target they
    output (``eps``, ``v`` or ``x0``), ``classes`` the class names of a conditional model (index i
    is label i; the null class is ``model.config.null_class``), ``image_size`` the side in pixels.
    :func:`load_run` returns one (a :class:`Run`); the trainer builds one around its EMA weights
    for its sample grids and in-training FID, so both sample the same way.
    """

    model: UNet
    ema_model: UNet | None
    schedule: Schedule
    classes: list[str] | None
    prediction: str
    image_size: int

    @property
    def conditional(self) -> bool:
        """Whether the model was trained with class labels."""
        return self.model.config.conditional

    def _unconditional_error(self) -> DDPMError:
        return DDPMError("this model is unconditional; it has no classes to choose from")

    def class_index(self, name: str) -> int:
        """Index of class ``name``; an unknown name is an error listing the valid ones."""
        if not self.classes:
            raise self._unconditional_error()
        # Class names are folder names with non-UTF-8 bytes escaped; the raw bytes (typed or
        # pasted from a listing) name the same class.
        name = class_name(name)
        if name in self.classes:
            return self.classes.index(name)
        if name.isdigit() and int(name) < len(self.classes):
            return int(name)
        raise DDPMError(f"unknown class {name!r}; this run's classes are: {', '.join(self.classes)}")


@dataclass
class Run(Sampleable):
    """A trained model ready to sample from, rebuilt from a run folder without any flags: a
    :class:`Sampleable` with where it came from (``run_dir``, the ``checkpoint`` file, its
    ``step``) and the run's saved :class:`~ddpm.run.config.RunConfig` (``config``)."""

    run_dir: Path
    step: int
    config: RunConfig
    checkpoint: Path

    def _unconditional_error(self) -> DDPMError:
        return DDPMError(f"run {str(self.run_dir)!r} is unconditional; it has no classes to choose from")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None) -> Run:
    """Rebuild model, EMA model and schedule from ``checkpoint``, or else the newest checkpoint of ``run_dir``.

    The weights go onto ``device``, in eval mode without gradients. Raises :class:`DDPMError` when
    ``run_dir`` does not exist, has no checkpoint yet, or the file is not a readable ddpm checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DDPMError(f"run folder {str(run_dir)!r} does not exist; expected the --out folder of 'ddpm train'")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise DDPMError(f"run folder {str(run_dir)!r} has no checkpoints/ckpt_*.safetensors yet")
    step, saved, state = load_checkpoint(path, "cpu", only=("model", "ema"))
    config = RunConfig.from_dict(saved, f"checkpoint {str(path)!r}")
    model = UNet(config.model)
    model.load_state_dict(state["model"])
    ema_model = None
    if "ema" in state:
        ema_model = UNet(config.model)
        ema_model.load_state_dict(state["ema"]["weights"])
        ema_model.to(device).eval().requires_grad_(False)
    model.to(device).eval().requires_grad_(False)
    return Run(model=model, ema_model=ema_model, schedule=config.schedule, classes=config.classes,
               prediction=config.prediction, image_size=config.image_size, run_dir=run_dir, step=step, config=config,
               checkpoint=path)


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict's names, dtypes, shapes and exact bytes (order independent)."""

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_info(run_dir: str | Path) -> dict[str, Any]:
    """Facts about a run from its newest checkpoint, without building its network: step,
    parameters (counted from the saved weights), classes, image size, target, schedule, sha256 of
    the model and EMA weights, EMA updates and the whole config. Raises :class:`DDPMError` for a
    missing folder or one without checkpoints."""
    if not Path(run_dir).exists():
        raise DDPMError(f"run folder {str(run_dir)!r} does not exist")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise DDPMError(f"run folder {str(run_dir)!r} has no checkpoints yet")
    step, saved, state = load_checkpoint(path, "cpu", only=("model", "ema"))
    config = RunConfig.from_dict(saved, f"checkpoint {str(path)!r}")
    return {
        "run": str(run_dir),
        "checkpoint": str(path),
        "step": step,
        # every entry of a UNet's state dict is a parameter (it registers no buffers)
        "params": sum(t.numel() for t in state["model"].values()),
        "classes": config.classes,
        "image_size": config.image_size,
        "prediction": config.prediction,
        "schedule": saved.get("schedule"),
        "model_sha256": weights_sha256(state["model"]),
        "ema_sha256": weights_sha256(state["ema"]["weights"]) if "ema" in state else None,
        "ema_updates": state["ema"]["num_updates"] if "ema" in state else None,
        "config": saved,
    }
