"""Launching a compiled Triton kernel directly, without Triton's per-call argument binding.

``kernel[grid](*args)`` makes Triton bind and specialize every argument on every call: about 40-100 us of
host time per launch of our 40-argument kernels on the H100 host, longer than the GPU work of a decode step
at batch 1. A :class:`Launcher` asks Triton once per specialization (the first call compiles or fetches the
kernel through the normal path) and afterwards launches the compiled kernel itself.

The specialization key holds everything the compiled kernel assumed. Triton 3.6 and 3.9 specialize
(``native_specialize_impl``; tests/test_launch.py checks this rule against the installed Triton):
  - a tensor on its dtype and on whether its data pointer is 16-byte aligned (the direct launch then passes
    the pointer as an int);
  - an int on whether it equals 1 (compiled in as a constant), whether it is divisible by 16, and on its
    width (ints outside int32 become i64 arguments: such launches take Triton's own path here);
  - a float not at all (an fp32 argument);
plus the constexprs, ``num_warps``, ``num_stages`` and the current device. Triton versions whose rule was not
checked, the interpreter (``TRITON_INTERPRET=1``) and calls with ints beyond int32 take Triton's normal path.
"""

from __future__ import annotations

import torch
import triton

try:
    from triton import knobs
    from triton.runtime.jit import JITFunction
except ImportError:  # a Triton without knobs (< 3.4): always the normal path
    knobs = JITFunction = None

# Versions whose specialization rule and CompiledKernel.run signature were read and tested.
VERIFIED_TRITON_VERSIONS = ("3.6.", "3.9.")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def int_classes(values) -> tuple | None:
    """Triton's specialization class of each int: 2 = equal to 1, 1 = divisible by 16, 0 = neither, 3 = a bool
    (Triton passes bools as u1, not as ints); None when one needs 64 bits. (2, not 1, marks "equal to 1": 1 and
    True hash alike.)"""
    if values and (max(values) > _INT32_MAX or min(values) < _INT32_MIN):
        return None
    return tuple([3 if type(v) is bool else 2 if v == 1 else 0 if v % 16 else 1 for v in values])


def tensor_classes(tensors, pointers) -> tuple:
    """Triton's specialization of each tensor, given its data pointer: its dtype and whether the pointer is 16-byte
    aligned."""
    return tuple([(t.dtype, p % 16 == 0) for t, p in zip(tensors, pointers)])


def _current_device() -> int:
    return torch.cuda.current_device()  # as Triton's own launch does


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _hooked(hook) -> bool:
    """Whether a launch hook does anything (Triton >= 3.6 keeps an empty ``HookChain`` there; users may assign a
    function or None)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class PlanCache(dict):
    """Prepared launches by call signature (shapes, strides, dtypes, options), so that a repeated call (the same
    layer shape in every step of a model) recomputes nothing but its outputs. Emptied when full: a program meets
    few signatures, and one that meets endless new ones must not grow it without bound."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def remember(self, key, plan):
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan
        return plan


class Launch:
    """Everything about one launch but its tensors: grid, ints, floats, constexprs, warps, stages, and the part of
    the specialization key they fix. Build it once per call signature (:meth:`Launcher.prepare`) and launch it with
    each call's tensors (:meth:`Launcher.launch`)."""

    __slots__ = ("grid", "ints", "floats", "constexprs", "num_warps", "num_stages", "static_key", "tail")

    def __init__(self, grid, ints, floats, constexprs, num_warps, num_stages):
        self.grid = tuple(grid)
        self.ints, self.floats = tuple(ints), tuple(map(float, floats))  # an int would be specialized as an int
        self.constexprs, self.num_warps, self.num_stages = constexprs, num_warps, num_stages
        ints_key = int_classes(self.ints)
        self.static_key = None if ints_key is None else (num_warps, num_stages, constexprs, ints_key)
        self.tail = (*self.ints, *self.floats, *constexprs)


class Launcher:
    """Launch ``fn`` (a ``@triton.jit`` kernel whose parameters are its tensors, then its ints, then its floats,
    then its constexprs): ``launcher(grid, tensors, ints, floats, constexprs, num_warps, num_stages)``, or, where a
    call signature repeats, ``launcher.launch(launcher.prepare(grid, ints, ...), tensors)`` with the prepared
    :class:`Launch` cached. ``constexprs`` is the tuple :meth:`constexprs` builds."""

    def __init__(self, fn):
        self.fn = fn
        self.fast = (knobs is not None and isinstance(fn, JITFunction)
                     and triton.__version__.startswith(VERIFIED_TRITON_VERSIONS))
        params = getattr(fn, "params", None)
        if params is not None:
            self.constexpr_names = tuple(p.name for p in params if p.is_constexpr)
        else:  # the interpreter's wrapper: read the names from the Python function
            import inspect

            annotations = inspect.signature(fn.fn).parameters.values()
            self.constexpr_names = tuple(p.name for p in annotations if "constexpr" in str(p.annotation))
        self._kernels: dict = {}

    def constexprs(self, **values) -> tuple:
        """The constexpr values in the kernel's parameter order; every constexpr must be given."""
        if set(values) != set(self.constexpr_names):
            raise TypeError(f"{self.fn.__name__} takes constexprs {self.constexpr_names}, got {tuple(values)}")
        return tuple(values[name] for name in self.constexpr_names)

    prepare = Launch

    def __call__(self, grid, tensors, ints, floats, constexprs, num_warps, num_stages):
        self.launch(Launch(grid, ints, floats, constexprs, num_warps, num_stages), tensors)

    def launch(self, launch: Launch, tensors) -> None:
        if self.fast and launch.static_key is not None:
            device = _current_device()
            # The compiled launcher takes a pointer as an int as readily as a tensor, and skips for an int what it
            # does for each tensor (a data_ptr() call and a driver query of the pointer): our callers have
            # validated every tensor to be on this CUDA device.
            pointers = [t.data_ptr() for t in tensors]
            key = (device, launch.static_key, tensor_classes(tensors, pointers))
            kernel = self._kernels.get(key)
            if kernel is not None:
                grid, stream = launch.grid, _current_stream(device)
                enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
                if _hooked(enter_hook) or _hooked(exit_hook):  # profilers (e.g. proton) see our launches, tensors too
                    args = (*tensors, *launch.tail)
                    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                               kernel.launch_metadata(grid, stream, *args), enter_hook, exit_hook, *args)
                else:
                    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                               None, None, None, *pointers, *launch.tail)
                return
            self._kernels[key] = self._launch_through_triton(launch, tensors)
            return
        self._launch_through_triton(launch, tensors)

    def _launch_through_triton(self, launch: Launch, tensors):
        return self.fn[launch.grid](*tensors, *launch.ints, *launch.floats,
                                    **dict(zip(self.constexpr_names, launch.constexprs)),
                                    num_warps=launch.num_warps, num_stages=launch.num_stages)
