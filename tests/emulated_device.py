"""An emulated accelerator for a CPU-only machine: tensors that live "on the device" hold real CPU values (so analyses
compute real answers) but report ``device == EMULATED`` and raise, as CUDA does, when an operation mixes them with
CPU tensors.  Host syncs (a device value read by the host) are counted.

Why not the ``meta`` device itself: meta tensors have no values, so no analysis can run on them (every ``bool()``
fails).  Why not a fake ``cuda``: a CPU build of torch refuses ``tensor.to("cuda")`` in C++ before any Python hook
sees it.  So each device tensor is a wrapper subclass reporting ``meta`` (a device the CPU build knows) around a
CPU tensor, and a ``TorchDispatchMode`` sees every operation:

- an operation whose tensors include device tensors and CPU tensors raises ``Expected all tensors to be on the same
  device``, except where CUDA allows it: a 0-dim CPU tensor (a scalar), CPU indices into a device tensor, and
  copies (``.to``, ``copy_``);
- a factory given ``device=EMULATED`` makes a device tensor; a CPU generator drawing device values raises, as on CUDA;
- ``.numpy()`` of a device tensor fails as CUDA's does (the wrapper has no CPU storage);
- every read of a device value by the host (``item``/``bool``/``float``, a copy to the CPU, ``nonzero`` and
  boolean indexing, which calls it) adds one to ``syncs``; every copy from the CPU to the device, one to ``uploads``.

Python (``model.to(device)``, ``x.to(device)``, ``torch.arange(n, device=x.device)``) cannot tell it from a real
accelerator, so an analysis that passes here keeps every tensor on the model's device."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
EMULATED = torch.device("meta")
TRANSFERS = {aten._to_copy.default, aten.copy_.default}
# operations whose result size (or value) the host must read back from the device
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default}
CPU_INDICES_ALLOWED = {aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default, aten.index_put.default}


class DeviceTensor(torch.Tensor):
    """A tensor on the emulated device: its values are ``self.elem``, a CPU tensor."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                   device=EMULATED, storage_offset=elem.storage_offset(),
                                                   requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    # torch turns a list index into a tensor on the indexed tensor's device below any Python hook, which here would
    # be a real (valueless) meta tensor: it is made a CPU index first, which CUDA accepts too
    def __getitem__(self, index):
        return super().__getitem__(_cpu_lists(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_cpu_lists(index), value)

    def tolist(self):
        return self.cpu().tolist()  # as CUDA's: a copy to the host (counted as a sync)

    def __repr__(self):
        return f"DeviceTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an emulated-device tensor outside emulated_device()")


def _cpu_lists(index):
    if isinstance(index, tuple):
        return tuple(_cpu_lists(i) for i in index)
    return torch.tensor(index) if isinstance(index, list) else index


class DeviceMixed(RuntimeError):
    """An operation mixed device and CPU tensors, which CUDA refuses."""


def _is_device(device) -> bool:
    return device is not None and torch.device(device).type == EMULATED.type


class emulated_device(TorchDispatchMode):
    """``with emulated_device() as emulated: ...``: inside, ``EMULATED`` behaves as an accelerator (see the module)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0
        self.uploads = 0  # copies from the CPU to the device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.is_meta and not isinstance(t, DeviceTensor) for t in flat):
            raise RuntimeError(f"{func} got a valueless meta tensor: torch made it on the emulated device below the "
                               "emulation (torch.tensor(data, device=...)?); make it on the CPU and move it with .to()")
        on_device = [t for t in flat if isinstance(t, DeviceTensor)]
        on_cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor) and t.dim() > 0]
        made_on_device = _is_device(kwargs.get("device"))
        if func is aten._to_copy.default and on_device and kwargs.get("device") is not None and not made_on_device:
            self.syncs += 1  # a copy to the host waits for the device
        elif func in SYNCING and on_device:
            self.syncs += 1
        elif func in CPU_INDICES_ALLOWED and on_device and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.syncs += 1  # a boolean index is a nonzero(), whose result size the host reads
        elif func is aten._to_copy.default and made_on_device and not on_device:
            self.uploads += 1
        if on_device and on_cpu and func not in TRANSFERS:
            indices_only = func in CPU_INDICES_ALLOWED and isinstance(args[0], DeviceTensor) and all(
                t is not args[0] and t.dtype in (torch.long, torch.int, torch.bool) for t in on_cpu)
            if not indices_only:
                raise DeviceMixed(f"Expected all tensors to be on the same device, but found at least two devices, "
                                  f"{EMULATED} (emulated) and cpu! ({func})")
        if made_on_device and isinstance(kwargs.get("generator"), torch.Generator) \
                and kwargs["generator"].device.type == "cpu":
            raise DeviceMixed(f"Expected a '{EMULATED.type}' device type for generator but found 'cpu' ({func})")
        wrappers = {id(t.elem): t for t in on_device}
        inner_args, inner_kwargs = tree_map(lambda t: t.elem if isinstance(t, DeviceTensor) else t, (args, kwargs))
        if made_on_device:
            inner_kwargs = {**inner_kwargs, "device": torch.device("cpu")}
        out = func(*inner_args, **inner_kwargs)
        if func is aten._local_scalar_dense.default or func is aten.equal.default:
            return out
        to_device = made_on_device or (on_device and not (func is aten._to_copy.default and "device" in kwargs
                                                          and kwargs["device"] is not None))
        if func is aten.copy_.default:  # the destination decides where the copy lives
            return args[0]

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in wrappers:  # an in-place operation returns its (device) input
                return wrappers[id(t)]
            return DeviceTensor(t) if to_device else t

        return tree_map(wrap, out)
