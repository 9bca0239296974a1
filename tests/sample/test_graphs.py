"""CUDA graphs at sampling (ddpm.runtime.graphs, issue 24), checked on the CPU.

A CUDA graph freezes what a call computed from Python values when it was recorded, refuses
(fails the capture on) a read of a tensor's value into Python, and replays the kernels on fixed
input and output buffers. ``make_fx`` records a call the same way: every Python value becomes a
constant of the trace, every tensor argument an input, and a data-dependent read raises. So the
recorder below stands in for ``torch.cuda.graph``: a replay reruns the trace on the fixed buffers
and writes into a fixed output buffer, as a graph does. Through it, the sampling path
(``generate`` with samplers that keep earlier outputs or re-noise, guided batches of 2B with new
labels per batch, a last batch of another size) must give the eager path's images; and the ways
a graph goes wrong are shown to be caught: a Python value frozen at recording, a read of a
tensor's value (the capture fails and sampling goes on eagerly), an output that is not copied.
The CUDA-specific part (streams, the memory pool) runs on the device in benchmarks/speed.py,
which compares graphed and eager images there.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from ddpm.cli.common import command_runtime
from ddpm.cli.app import build_parser
from ddpm.core.schedule import Schedule
from ddpm.core.unet import UNet, UNetConfig
from ddpm.run.checkpoint import Run
from ddpm.runtime import policy
from ddpm.runtime.graphs import GraphedCall
from ddpm.runtime.policy import Runtime, default_cuda_graphs, inference_model, resolve_runtime
from ddpm.runtime.processes import Dist
from ddpm.sample.engine import generate
from ddpm.sample.spec import SampleSpec

pytestmark = pytest.mark.usefixtures("one_thread")


class TracedRecorder:
    """Records as ``torch.cuda.graph`` does, on the CPU (see the module docstring)."""

    def __init__(self) -> None:
        self.records = 0
        self.replays = 0
        self.warm_ups = 0

    def warm_up(self, call, inputs):
        self.warm_ups += 1
        return call(*inputs)

    def record(self, call, inputs):
        tensors = [a for a in inputs if a is not None]

        def traced(*ts):
            it = iter(ts)
            return call(*(None if a is None else next(it) for a in inputs))

        graph = make_fx(traced)(*tensors)
        output = torch.empty_like(graph(*tensors))
        self.records += 1

        def replay() -> None:
            self.replays += 1
            output.copy_(graph(*tensors))  # the fixed output buffer, rewritten by every replay

        return replay, output


class FailingRecorder(TracedRecorder):
    def record(self, call, inputs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def _unet_run(conditional: bool) -> Run:
    torch.manual_seed(0)
    cfg = UNetConfig.preset("tiny", image_size=16, num_classes=2 if conditional else None)
    net = UNet(cfg)
    for m in net.modules():  # the UNet zero-initialises its output: give it a function to keep
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    net.eval().requires_grad_(False)
    return Run(model=net, ema_model=None, schedule=Schedule.from_name("sigmoid", 50), classes=["a", "b"] if conditional
               else None, prediction="v", image_size=16, run_dir=Path("in-memory"), step=0, config={},
               checkpoint=Path("in-memory"))


@pytest.fixture
def recorded(monkeypatch):
    """A runtime with ``cuda_graphs`` samples through GraphedCall with the CPU recorder (one
    without keeps the eager path); yields the recorders made."""
    made: list[TracedRecorder] = []
    eager_call = Runtime.sampling_call

    def sampling_call(self, net):
        if not self.cuda_graphs:
            return eager_call(self, net)
        made.append(TracedRecorder())
        return GraphedCall(inference_model(net, self.device, self.precision, channels_last=self.channels_last),
                           made[-1])

    monkeypatch.setattr(Runtime, "sampling_call", sampling_call)
    return made


GRAPHED = resolve_runtime("cpu", "fp32", progress=False, cuda_graphs=True)
EAGER = resolve_runtime("cpu", "fp32", progress=False, cuda_graphs=False)


@pytest.mark.parametrize("sampler,steps", [("dpm-solver", 6), ("ancestral", 8), ("ddim", 5), ("consistency", 3)])
def test_replayed_sampling_gives_the_eager_images(recorded, sampler, steps):
    run = _unet_run(conditional=False)
    spec = SampleSpec(sampler, steps, seed=3, batch_size=3)  # 5 images: batches of 3 and 2, two graphs
    eager = generate(run, 5, spec, EAGER)
    assert not recorded
    with_graphs = generate(run, 5, spec, GRAPHED)
    (rec,) = recorded
    assert rec.records == 2 and rec.warm_ups == 2
    assert rec.replays == 2 * steps - rec.warm_ups  # every call after a shape's first is a replay
    assert (with_graphs.int() - eager.int()).abs().max() <= 1


def test_guided_sampling_replays_with_the_labels_it_is_given(recorded):
    run = _unet_run(conditional=True)
    labels = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0])  # two batches of 4: the second's labels go into the buffers
    spec = SampleSpec("dpm-solver", 5, guidance=3.0, seed=1, batch_size=4)
    eager = generate(run, 8, spec, EAGER, labels=labels)
    with_graphs = generate(run, 8, spec, GRAPHED, labels=labels)
    assert recorded[-1].records == 1 and recorded[-1].replays == 2 * 5 - 1  # one shape (2B = 8): only the first call is eager
    assert (with_graphs.int() - eager.int()).abs().max() <= 1
    flipped = generate(run, 8, spec, EAGER, labels=1 - labels)
    assert (flipped[4:].int() - eager[4:].int()).abs().float().mean() > 5  # labels matter, so the check has teeth


class ScaledByAnAttribute(nn.Module):
    """A network whose output depends on a Python number it holds: frozen when recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, x, t):
        return x * self.scale + t.view(-1, 1, 1, 1)


def test_the_recorder_freezes_python_values_as_a_capture_does():
    net = ScaledByAnAttribute()
    call = GraphedCall(net, TracedRecorder())
    x, t = torch.ones(2, 3, 4, 4), torch.zeros(2)
    call(x, t)  # warm-up
    net.scale = 2.0
    call(x, t)  # recorded with scale 2
    net.scale = 5.0
    assert torch.allclose(call(x, t + 1), x * 2.0 + 1)  # the tensor input moved, the Python value did not


class ReadsItsTimestep(nn.Module):
    """A network that reads its timestep's value into Python: a capture of it fails."""

    def forward(self, x, t):
        return x * float(t.flatten()[0]) / 100


def test_a_read_of_a_tensor_value_fails_the_recording_and_sampling_goes_on_eagerly():
    call = GraphedCall(ReadsItsTimestep(), TracedRecorder())
    x = torch.ones(2, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the sampling network failed"):
        outs = [call(x, torch.full((2,), step)) for step in (10, 20, 50)]
    assert call.eager
    for out, step in zip(outs, (10, 20, 50)):
        assert torch.allclose(out, x * step / 100)


def test_each_result_is_a_copy_that_later_replays_leave_alone():
    net = nn.Conv2d(3, 3, 1).eval().requires_grad_(False)
    call = GraphedCall(lambda x, t: net(x) + t.view(-1, 1, 1, 1), TracedRecorder())
    x = torch.randn(2, 3, 4, 4)
    outs = [call(x, torch.full((2,), float(i))) for i in range(4)]
    for i, out in enumerate(outs):
        assert torch.allclose(out, net(x) + i)


def test_a_failed_capture_warns_once_and_samples_eagerly():
    run = _unet_run(conditional=False)
    eager = inference_model(run.model, "cpu", "fp32")
    call = GraphedCall(eager, FailingRecorder())
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [call(x, t) for _ in range(4)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["CUDA graph capture of the sampling network failed (operation not permitted when stream is "
                        "capturing); sampling without CUDA graphs"]
    assert call.eager
    for out in outs:
        assert torch.equal(out, eager(x, t))


def test_cuda_graphs_are_the_default_on_cuda_only_and_a_flag_turns_them_off(monkeypatch):
    assert default_cuda_graphs(torch.device("cuda")) and not default_cuda_graphs(torch.device("cpu"))
    assert not resolve_runtime("cpu", "fp32").cuda_graphs
    # A CPU runtime never records, even when asked: CUDA graphs are CUDA's.
    asked = resolve_runtime("cpu", "fp32", cuda_graphs=True)
    assert not isinstance(asked.sampling_call(nn.Identity()), GraphedCall)
    monkeypatch.setattr(policy, "default_cuda_graphs", lambda device: True)  # as on a GPU
    parser = build_parser()
    for cmd in (["sample", "--run", "R", "--out", "g.png"], ["eval", "--run", "R", "--ref", "cifar10"]):
        assert command_runtime(parser.parse_args([*cmd, "--device", "cpu"]), Dist()).cuda_graphs is True
        assert command_runtime(parser.parse_args([*cmd, "--device", "cpu", "--no-cuda-graphs"]), Dist()).cuda_graphs is False


class FailsAtItsSecondRecording(TracedRecorder):
    def record(self, call, inputs):
        if self.records == 1:
            raise RuntimeError("capture failed")
        return super().record(call, inputs)


def test_a_capture_failing_after_another_shape_was_recorded_drops_every_graph():
    net = nn.Conv2d(3, 3, 1).eval().requires_grad_(False)
    recorder = FailsAtItsSecondRecording()
    call = GraphedCall(lambda x, t: net(x) * t.view(-1, 1, 1, 1), recorder)
    a, b = torch.randn(3, 3, 4, 4), torch.randn(2, 3, 4, 4)
    call(a, torch.ones(3)), call(a, torch.ones(3))  # shape A: warm-up, recorded
    call(b, torch.ones(2))  # shape B: warm-up
    with pytest.warns(RuntimeWarning, match=r"failed \(capture failed\)"):
        call(b, torch.ones(2))
    replays = recorder.replays
    assert torch.allclose(call(a, torch.full((3,), 2.0)), net(a) * 2)  # A now runs eagerly too
    assert call.eager and recorder.replays == replays


def test_labels_and_no_labels_are_two_signatures_with_their_own_graphs():
    seen = []

    def net(x, t, y=None):
        seen.append(y is None)
        return x + t.view(-1, 1, 1, 1) + (0 if y is None else y.view(-1, 1, 1, 1) * 10)

    recorder = TracedRecorder()
    call = GraphedCall(net, recorder)
    x = torch.zeros(2, 1, 2, 2)
    for i in range(3):
        t, y = torch.full((2,), float(i)), torch.tensor([1, 2])
        assert torch.equal(call(x, t, None), x + i)
        assert torch.equal(call(x, t, y), x + i + torch.tensor([10.0, 20.0]).view(-1, 1, 1, 1))
    assert recorder.records == 2 and recorder.replays == 4


def test_signatures_beyond_max_graphs_run_eagerly():
    recorder = TracedRecorder()
    call = GraphedCall(lambda x, t: x * 2 + t.view(-1, 1, 1, 1), recorder, max_graphs=1)
    for batch in (3, 3, 3, 2, 2, 2):
        x = torch.randn(batch, 1, 2, 2)
        assert torch.equal(call(x, torch.ones(batch)), x * 2 + 1)
    assert recorder.records == 1 and recorder.replays == 2 and recorder.warm_ups == 1


def test_calls_from_outside_inference_mode_replay_too():
    # The input buffers are made under inference mode; a caller outside it must still copy into them.
    call = GraphedCall(lambda x, t: x + t.view(-1, 1, 1, 1), TracedRecorder())
    x = torch.randn(2, 1, 2, 2)
    outs = [call(x, torch.full((2,), float(i))) for i in range(3)]
    assert all(torch.equal(out, x + i) for i, out in enumerate(outs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the GPU machine)")
def test_on_cuda_the_real_recorder_replays_the_eager_images_and_falls_back_in_one_warning():
    run = _unet_run(conditional=True)
    run.model.cuda()
    device = torch.device("cuda")
    eager_rt = resolve_runtime("cuda", "fp32", progress=False, cuda_graphs=False)
    graphed_rt = resolve_runtime("cuda", "fp32", progress=False, cuda_graphs=True)
    assert isinstance(graphed_rt.sampling_call(run.model), GraphedCall)
    for spec, n in ((SampleSpec("dpm-solver", 6, seed=3, batch_size=3), 8),  # batches 3, 3, 2
                    (SampleSpec("dpm-solver", 5, guidance=3.0, seed=1, batch_size=4), 8)):  # guided: 2B
        labels = torch.arange(n) % 2
        eager = generate(run, n, spec, eager_rt, labels=labels)
        with_graphs = generate(run, n, spec, graphed_rt, labels=labels)
        assert (with_graphs.int() - eager.int()).abs().max() <= 1
    caller = torch.cuda.current_stream(device)
    call = GraphedCall(lambda x, t: x * float(t.flatten()[0].item()))
    x = torch.ones(2, 3, 4, 4, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [call(x, torch.full((2,), step, device=device)) for step in (1, 2, 3)]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert torch.cuda.current_stream(device) == caller
    assert all(torch.equal(out, x * step) for out, step in zip(outs, (1, 2, 3)))
