"""CUDA-graph replays of a matting model's streaming step: no Python or launch overhead.

At one frame per call (T = 1, live video) the fused model is bound by launching its ~120
kernels from Python, not by the GPU (bench/RESULTS.md). A CUDA graph records those
launches once and replays them with one call. :class:`CudaGraphStep` wraps a model
with RVM's streaming contract and does that transparently::

    step = CudaGraphStep(convert(model).cuda())
    rec = [None] * 4
    for src in frames:                       # (B, T, 3, H, W) CUDA tensors
        fgr, pha, *rec = step(src, *rec, downsample_ratio=0.25)

It is itself such a model, so ``convert_video(CudaGraphStep(model), ...)`` works too.

How a call runs:

* ``src`` not on a CUDA device: ``ValueError`` at once, on the first call too (a CUDA
  graph can only be captured on CUDA; run the model itself elsewhere).
* Any recurrent state None (the first call of a stream): the model runs eagerly.
* The first call with a new *signature* (shapes, dtypes and device of ``src`` and the
  states, ``downsample_ratio``, ``segmentation_pass``) also runs eagerly: a shape seen
  once (the short last chunk of a video) never pays for a capture.
* The second call with a signature captures the model's forward for it (one warm-up call
  on a side stream, then ``torch.cuda.graph``); that call and every later one copies
  ``src`` and the states into the graph's static inputs and replays it.

The outputs of a replay live in the graph's memory. ``fgr``/``pha`` (the outputs before
the states) are cloned unless ``clone_outputs=False``; the returned states are the
graph's own, valid until the next call (they are meant to be passed back, as in the loop
above). Graphs of different signatures on one device share a memory pool. Calls made
under ``torch.inference_mode`` and without it can be mixed.

What makes a model capturable: no host synchronisation in forward (no ``.item()``,
``.tolist()``, data-dependent shapes) and no CPU tensors. BiMatting's fused forward has
none (the sparse decoder's tile lists are built on the device; ``bench/host_overhead.py``
checks for synchronising ops). A capture that fails raises ``RuntimeError`` naming the
signature.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .devices import current_cuda_device

__all__ = ["CudaGraphStep", "capture"]


def capture(forward: Callable[[], Sequence[Tensor]], example: Tensor, pool=None):
    """Record ``forward()`` (a closure over static input tensors) as a CUDA graph.

    Runs it once eagerly on a side stream (warm-up, as ``torch.cuda.graphs`` asks), then
    captures it. Returns ``(graph, outputs)``: ``graph.replay()`` recomputes ``outputs``
    (static tensors) from the current contents of the static inputs. ``example``: a
    tensor of the step, whose device must be CUDA. ``pool``: a graph memory pool to share.
    """
    _check_device(example)
    with current_cuda_device(example.device):  # (torch.cuda.graph captures on the current device)
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(example.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may use CUDA meanwhile (convert_video's encoder threads
        # copy earlier results to the host while the main thread captures).
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = list(forward())
    return graph, outputs


def _check_device(src: Tensor) -> None:
    """``ValueError`` naming ``src``'s device unless it is a CUDA one (the only graphs ``capture`` records)."""
    if src.device.type != "cuda":
        raise ValueError(f"src must be a CUDA tensor to be captured in a CUDA graph, got one on {src.device} "
                         "(CudaGraphStep needs a model and inputs on CUDA; call the model itself elsewhere)")


@dataclass
class _Captured:
    graph: object  # has replay()
    src: Tensor  # static input
    rec: list[Tensor]  # static recurrent states
    outputs: list[Tensor]  # static outputs: (fgr, pha | seg, *rec)


class CudaGraphStep(nn.Module):
    """``model`` behind CUDA-graph replays; called as the model (see the module docstring).

    ``model``: called as ``outs = model(src, *rec, downsample_ratio=r, segmentation_pass=s)``
    with outputs ``(*frame_outputs, *new_rec)`` (one new state per state given), e.g.
    :class:`~bimatting_triton.BiMatting` (converted or not) or RVM's ``MattingNetwork``.
    ``clone_outputs``: return copies of the frame outputs (else the graph's own tensors,
    overwritten by the next call). ``src`` must be a CUDA tensor: ``ValueError`` on any
    call, the first included, otherwise.
    """

    def __init__(self, model: nn.Module, clone_outputs: bool = True):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.clone_outputs = clone_outputs
        self._seen: set = set()
        self._graphs: dict = {}
        self._pools: dict = {}  # device -> the memory pool its graphs share

    @property
    def graphs(self) -> int:
        """How many signatures have been captured."""
        return len(self._graphs)

    def reset(self) -> None:
        """Forget every captured graph (and its memory), e.g. after changing the model's weights."""
        self._seen.clear()
        self._graphs.clear()
        self._pools.clear()

    @torch.no_grad()
    def forward(self, src: Tensor, *rec: Tensor | None, downsample_ratio: float = 1,
                segmentation_pass: bool = False):
        kwargs = dict(downsample_ratio=downsample_ratio)
        if segmentation_pass:  # passed only when set: models without the argument work too
            kwargs["segmentation_pass"] = True
        if not isinstance(src, Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
        _check_device(src)
        with current_cuda_device(src.device):  # Triton launches and graphs go to the current device
            if not rec or any(r is None for r in rec):
                return self.model(src, *rec, **kwargs)  # a stream's first call: shapes of the states unknown
            return self._step(src, rec, kwargs, downsample_ratio, segmentation_pass)

    def _step(self, src: Tensor, rec: tuple[Tensor, ...], kwargs: dict, downsample_ratio, segmentation_pass):
        key = (_signature(src), tuple(_signature(r) for r in rec), float(downsample_ratio), bool(segmentation_pass))
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen.add(key)
                return self.model(src, *rec, **kwargs)
            captured = self._capture(key, src, rec, kwargs)
        # Static tensors made under inference_mode can only be written in it (and others out of it).
        with torch.inference_mode(captured.src.is_inference()):
            captured.src.copy_(src)
            for static, value in zip(captured.rec, rec):
                if value.data_ptr() != static.data_ptr():
                    static.copy_(value)
        captured.graph.replay()
        outputs = captured.outputs
        frame = len(outputs) - len(rec)
        if self.clone_outputs:
            return [o.clone() for o in outputs[:frame]] + outputs[frame:]
        return list(outputs)

    def _capture(self, key, src: Tensor, rec: tuple[Tensor, ...], kwargs: dict) -> _Captured:
        static_src = src.clone()
        static_rec = [r.clone() for r in rec]

        def step():
            return self.model(static_src, *static_rec, **kwargs)

        if src.device not in self._pools and src.device.type == "cuda":
            self._pools[src.device] = torch.cuda.graph_pool_handle()
        try:
            graph, outputs = capture(step, static_src, self._pools.get(src.device))
        except ValueError:
            raise
        except Exception as exc:
            raise RuntimeError(
                f"CudaGraphStep: could not capture the model for src {tuple(src.shape)} {src.dtype}, "
                f"{kwargs}: {type(exc).__name__}: {exc} (a host synchronisation or a CPU tensor in forward?)"
            ) from exc
        if len(outputs) < len(rec):
            raise RuntimeError(f"CudaGraphStep: the model returned {len(outputs)} outputs for {len(rec)} states")
        captured = _Captured(graph, static_src, static_rec, outputs)
        self._graphs[key] = captured
        return captured


def _signature(t: Tensor) -> tuple:
    if not isinstance(t, Tensor):
        raise TypeError(f"recurrent states must be tensors or None, got {type(t).__name__}")
    return (tuple(t.shape), t.dtype, t.device)
