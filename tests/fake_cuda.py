"""A CUDA device simulated on CPU, well enough to catch host/device mixing.

Inside ``fake_cuda()``, tensors made for device "cuda" (factories with ``device=``,
``.to("cuda")``, ``.cuda()``) live on the CPU as ``FakeCuda`` tensors, whose ``.device``
says cuda:0; every result of an operation on them is one too. What a real GPU refuses
raises ``HostDeviceError`` here:

* ``.numpy()`` / ``np.asarray`` / ``.tolist()`` of a device tensor (move it with ``.cpu()``
  first; scalar reads such as ``float(t)``, ``int(t)``, ``bool(t)`` work on CUDA and here);
* an operation mixing a device tensor with a CPU tensor of more than one element (CUDA
  accepts 0-d CPU scalars, and CPU index tensors in ``t[idx]`` / ``t[idx] = v``).

``torch.cuda.is_available()`` stays False (code that asks it keeps to CPU-only paths such
as ``synchronize``); ``torch.cuda.mem_get_info`` answers 4 GiB free and
``get_device_name`` "simulated CUDA"; pinned memory is ordinary memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)


class HostDeviceError(RuntimeError):
    """A device tensor used as if it were on the host (or mixed with host tensors)."""


class FakeCuda(torch.Tensor):
    """A CPU tensor standing for a CUDA tensor (see the module docstring)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _plain(x: Any) -> Any:
    return x.as_subclass(torch.Tensor) if isinstance(x, FakeCuda) else x


def _wrap(x: Any) -> Any:
    return x.as_subclass(FakeCuda) if type(x) is torch.Tensor else x


REFUSED = {torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.tolist}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}  # CPU indices allowed
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.pin_memory}


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901
        kwargs = dict(kwargs or {})
        if func in REFUSED and isinstance(args[0], FakeCuda):
            raise HostDeviceError(f"{func.__name__}() of a CUDA tensor {tuple(args[0].shape)}: "
                                  "move it to the host with .cpu() first")
        if func in MOVES:
            return self._move(func, args, kwargs)
        to_device = _is_cuda(kwargs.get("device"))
        if to_device:
            kwargs["device"] = "cpu"
        flat, _ = tree_flatten((args, kwargs))
        on_device = to_device or any(isinstance(t, FakeCuda) for t in flat)
        if on_device and func not in INDEXING:
            host = [t for t in flat if type(t) is torch.Tensor and t.dim() > 0]
            if host and any(isinstance(t, FakeCuda) for t in flat):
                raise HostDeviceError(
                    f"{getattr(func, '__name__', func)}: a CUDA tensor and a CPU tensor "
                    f"{tuple(host[0].shape)} in one operation")
        out = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        return tree_map(_wrap, out) if on_device else out

    def _move(self, func, args, kwargs):
        """.cpu() / .cuda() / .to(...) / .pin_memory(): copies between host and device."""
        t, on_device = args[0], isinstance(args[0], FakeCuda)
        if func is torch.Tensor.pin_memory:
            return t
        if func is torch.Tensor.cpu:
            return _plain(t).clone() if on_device else t
        if func is torch.Tensor.cuda:
            return t if on_device else _wrap(t.clone())
        rest = args[1:]
        if rest and isinstance(rest[0], torch.Tensor):  # .to(other): its device and dtype
            target, dtype = ("cuda" if isinstance(rest[0], FakeCuda) else "cpu"), rest[0].dtype
        else:
            device, dtype, _, _ = torch._C._nn._parse_to(*tree_map(_plain, rest), **kwargs)
            target = None if device is None else device.type
        out = _plain(t) if dtype is None else _plain(t).to(dtype)
        if target is None:
            return _wrap(out) if on_device else out
        if target == "cuda":
            return _wrap(out if on_device or out is not t else out.clone())
        return out.clone() if on_device and out is _plain(t) else out


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Run the block with "cuda" simulated on CPU (see the module docstring). The
    vocabulary metrics stay eager inside it: once compiled (after 4,096 rows in the
    process, ``fastskip.run.vocab_reductions``), Dynamo traces through the simulated
    tensors' ``__torch_function__`` and returns garbage for them; a real CUDA tensor
    gets its own compiled graph (Dynamo guards on the device)."""
    with mock.patch.dict(os.environ, {"FASTSKIP_COMPILE_METRICS": "0"}), \
            mock.patch("torch.cuda.mem_get_info", lambda device=None: (4 * 2**30, 8 * 2**30)), \
            mock.patch("torch.cuda.get_device_name", lambda device=None: "simulated CUDA"), \
            _Mode():
        yield
