"""Triton kernels on a CPU: Triton's interpreter (TRITON_INTERPRET=1) runs a kernel's
Python body with numpy in place of the GPU. It is slow, and exact enough to check a
kernel against torch, or to train the tiny models of the tests.

Two gaps of Triton 3.9's interpreter stop Liger's kernels there, and `enable` fills them:
- a float argument of a kernel stays a Python float, where compiled Triton passes an fp32
  scalar (Liger's kernels call `.to()` on such arguments): it is wrapped as one;
- `triton.language.extra.libdevice` (rsqrt, erf, tanh, ...) has only the compiler's
  declarations: each name `tl.math` has is routed there (looked up when called, once the
  interpreter has put its own `tl.math` in place), and tanh is written with a sigmoid.

`enable` must run before Triton is imported at all: `triton.jit` reads TRITON_INTERPRET
when it decorates a function, Triton's own standard library (tl.sum, tl.sigmoid, ...)
included. A training process calls it from the plugins' `before_import` hook, before the
training stack (which imports Triton) is.
"""

from __future__ import annotations

import os

_done = False


def enable() -> None:
    """Run Triton kernels through the interpreter from here on (idempotent)."""
    global _done
    if _done:
        return
    import sys

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        from payload.errors import FerryError

        raise FerryError(
            "Triton was imported before its interpreter was switched on, so its kernels "
            "cannot run on this CPU; switch it on first (TRITON_INTERPRET=1)."
        )
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def implicit_cvt(arg: object) -> object:
        if isinstance(arg, float):
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return convert(arg)

    interpreter._implicit_cvt = implicit_cvt

    def routed(name: str):  # type: ignore[no-untyped-def]
        return lambda *args: getattr(tl.math, name)(*args)

    for name in dir(libdevice):
        if not name.startswith("_") and hasattr(tl.math, name):
            setattr(libdevice, name, routed(name))
    libdevice.tanh = lambda x: 2 * tl.sigmoid(2 * x) - 1
    _done = True


def on_cpu() -> bool:
    """No CUDA device: Triton kernels can only run interpreted."""
    import torch

    return not torch.cuda.is_available()
