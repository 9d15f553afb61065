"""A stand-in for CUDA graphs on the CPU (tests of bimatting_triton.cuda_graph and its users).

``use_fake_graphs(monkeypatch)`` replaces ``cuda_graph.capture``: a "captured" graph records
the step's closure and its first outputs; ``replay`` reruns the closure and writes into those
same output tensors, as a CUDA graph does. A step that forgot to copy its inputs into the
static ones would therefore replay stale results.
"""
import torch

from bimatting_triton import cuda_graph


class FakeGraph:
    """Records ``forward`` at capture; ``replay`` recomputes it into the captured outputs."""

    def __init__(self, forward):
        self.forward = forward
        self.outputs = list(forward())
        self.replays = 0

    def replay(self):
        self.replays += 1
        for static, fresh in zip(self.outputs, self.forward()):
            with torch.inference_mode(static.is_inference()):  # a real replay writes raw memory
                static.copy_(fresh)


def use_fake_graphs(monkeypatch) -> list:
    """Patch ``cuda_graph.capture`` for this test; returns the list of graphs it makes."""
    made = []

    def fake_capture(forward, example, pool=None):
        forward()  # the warm-up call, as the real capture makes
        graph = FakeGraph(forward)
        made.append(graph)
        return graph, graph.outputs

    monkeypatch.setattr(cuda_graph, "capture", fake_capture)
    monkeypatch.setattr(cuda_graph, "_check_device", lambda src: None)  # the stand-in runs on any device
    return made
