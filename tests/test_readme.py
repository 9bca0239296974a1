"""The README's two set-up commands stay true: CI runs exactly the test command."""

from __future__ import annotations

from pathlib import Path

from conftest import FakeExtractor

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one() -> None:
    demo, tests = _commands()
    assert demo.endswith("ddpm demo")
    assert tests.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the README's test command and .ci/run must be the same line"


def test_readme_library_example_runs() -> None:
    """The library example, on the tiny preset and a random batch, trains a step and samples."""
    import torch

    code = (ROOT / "README.md").read_text().split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"ddpm-cifar10"', '"tiny"')
    g = torch.Generator().manual_seed(0)
    scope = {"images": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, "labels": torch.tensor([0, 3, 8, 9])}
    exec(compile(code, "README.md", "exec"), scope)
    x = scope["x"]
    assert x.shape == (16, 3, 32, 32) and torch.isfinite(x).all() and scope["images_seen"] == 4


def test_dependencies_have_lower_bounds_only_and_the_commands_pin_the_tested_torch() -> None:
    """pip must not downgrade (or refuse) a newer PyTorch a user already has: the package's
    requirements carry no upper caps; the tested versions live in the README's and CI's commands."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        spec = next(d for d in deps if re.match(rf"{name}\b(?!-)", d))
        assert ">=" in spec and not re.search(r"<|==|~=|!=", spec), spec
    for command in _commands():
        assert re.search(r"torch==\d", command) and re.search(r"torchvision==\d", command), command


def test_readme_scoring_example_runs(tmp_path: Path, monkeypatch) -> None:
    """The Evaluate section's Python example scores images against a class folder (a stand-in
    extractor replaces Inception: the example's plumbing is under test, not the network)."""
    import numpy as np
    import torch
    from PIL import Image

    from ddpm.scoring import evaluate

    monkeypatch.setattr(evaluate, "FeatureExtractor", FakeExtractor)
    rng = np.random.default_rng(0)
    for k, name in enumerate(["airplane", "ship"]):
        (tmp_path / "ref" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(60 * k, 120 + 60 * k, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "ref" / name / f"{i}.png")
    blocks = [b.split("```", 1)[0] for b in (ROOT / "README.md").read_text().split("```python")[1:]]
    code = next(b for b in blocks if "Reference.build" in b)
    code = code.replace('"cifar10/test"', repr(str(tmp_path / "ref")))
    code = code.replace("ReferenceSettings(", f"ReferenceSettings(cache_dir={str(tmp_path / 'cache')!r}, ")
    images = torch.from_numpy(rng.integers(0, 255, (8, 3, 32, 32), dtype=np.uint8))
    scope = {"images": images, "labels": torch.arange(8) % 2}
    exec(compile(code, "README.md", "exec"), scope)
    r = scope["reference"].score(images, scope["labels"])
    assert r["fid"] > 0 and 0 <= r["class_accuracy"]["overall"] <= 1
    assert set(r["class_accuracy"]["per_class"]) == {"airplane", "ship"}
