"""Attention tests run the Triton kernels in the interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before the kernel modules are imported
(and while Triton imports its own lazily loaded parts); it is set just for
that and then restored, so that ``impl="auto"`` elsewhere in the session
still picks the reference on CPU.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    # Triton 3.x asserts interpreter mode when this is first imported (lazily, at launch)
    with contextlib.suppress(ImportError):
        import triton.experimental.gluon  # noqa: F401

    import kvmem.attention.triton  # noqa: F401

    if _prev is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _prev
