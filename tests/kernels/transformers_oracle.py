"""Helpers for tests that use transformers' Mamba mixers as the oracle."""

from __future__ import annotations

import inspect


def use_torch_paths(monkeypatch, module, names) -> None:
    """Undecorated torch functions of a transformers modelling module.

    With mamba_ssm / causal_conv1d installed, transformers would hand CPU tensors to their CUDA
    kernels; the plain torch functions are the readable reference the tests compare against.
    """
    for name in names:
        monkeypatch.setattr(module, name, inspect.unwrap(getattr(module, name)))


class MixerRecorder:
    """Forward hook keeping the mixer's input hidden states and output of the latest call."""

    def __init__(self, mixer):
        self.inputs = self.output = None
        self._handle = mixer.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.inputs, self.output = args[0].detach().clone(), output.detach().clone()

    def remove(self):
        self._handle.remove()
