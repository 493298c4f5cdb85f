"""The base of Quill's layers: an `nn.Module` whose calls and attribute reads skip PyTorch's
bookkeeping.

`nn.Module.__call__` does hook bookkeeping on every call (about 2 us); a decode step of a 30-layer
model makes some 330 layer calls, so skipping it takes 9% off a single-stream SmolLM2 step
(measured: 8.85 -> 8.05 ms). Quill registers no hooks; hooks registered on these layers do not run.

`nn.Module` also keeps parameters, buffers and submodules in tables of its own, which every
`self.weight` or `self.mlp` searches through `nn.Module.__getattr__` (some 700 reads a step).
Once the model is placed (`.to(device)`, which every loaded model goes through), each layer also
pins them in its instance dict, where an ordinary attribute read finds them first: 8.2-8.8 ->
7.6 ms a single-stream step. A pin goes as soon as the attribute is set or deleted again, so it
never outlives the table entry it copies; the next `.to()` pins afresh.
"""
from __future__ import annotations

from torch import nn


class InferenceModule(nn.Module):
    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.__call__ = cls.forward

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        for table in (self._parameters, self._buffers, self._modules):
            self.__dict__.update(table)
        return module

    def __setattr__(self, name: str, value) -> None:
        self.__dict__.pop(name, None)  # a pin, if any: the table entry set below is the truth
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._parameters or name in self._buffers or name in self._modules:
            self.__dict__.pop(name, None)
        super().__delattr__(name)
