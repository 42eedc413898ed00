"""pycuda buffers for the TensorRT runner: pinned host memory, device memory, one stream.

Kept apart from TensorRT so that it can be tested on any CUDA machine. It avoids the classic pycuda
traps: it shares the *primary* context that PyTorch's CUDA runtime uses (retained as
``pycuda.autoprimaryctx`` does) instead of creating a second context; it makes that context current
on whatever thread calls it, and pops it again (Prefect runs tasks in worker threads); host buffers are page-locked (asynchronous copies from
pageable memory silently become synchronous) and are filled with ``np.copyto``, never replaced; and
memory is freed by an explicit ``free()``, never in ``__del__``, when the context may already be gone.

pycuda ships no type information, so its modules are typed ``Any`` here (see the import lines).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def nbytes_for(shape: Sequence[int], dtype: np.dtype[Any] | type | str) -> int:
    """Bytes of a dense C-contiguous array.

    Args:
        shape: dimensions; all must be known (no -1).
        dtype: numpy dtype of the elements.

    Returns:
        ``prod(shape) * itemsize``.

    Raises:
        ValueError: a dimension is negative (still dynamic).
    """
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {tuple(shape)} has a dynamic (-1) dimension; resolve it to the profile's maximum first")
    return math.prod(shape) * np.dtype(dtype).itemsize


def _driver() -> Any:
    import pycuda.driver as cuda  # pyright: ignore[reportMissingImports]

    return cuda


_PRIMARY: Any = None
_PRIMARY_LOCK = threading.Lock()


def primary_context() -> Any:
    """Return the primary CUDA context of device 0, shared with PyTorch and the CUDA runtime.

    This is what ``pycuda.autoprimaryctx`` retains, without its import-time ``push``: that push
    stays on the stack of whichever thread imported it first, and pycuda aborts the whole process
    ("context stack was not empty") when such a thread exits, which a Prefect worker thread does.
    Here the context is only ever current inside ``context_current()``, balanced on every thread.
    """
    global _PRIMARY
    with _PRIMARY_LOCK:
        if _PRIMARY is None:
            cuda = _driver()
            cuda.init()
            _PRIMARY = cuda.Device(0).retain_primary_context()
            atexit.register(_release_primary)
    return _PRIMARY


def _release_primary() -> None:
    global _PRIMARY
    ctx, _PRIMARY = _PRIMARY, None
    if ctx is not None:
        with contextlib.suppress(Exception):  # at exit the driver may already be shutting down
            ctx.detach()


@contextlib.contextmanager
def context_current() -> Iterator[Any]:
    """Make the primary context current on this thread for the duration of the block.

    A CUDA context is current per thread: a runner activated on one thread and called from another
    would otherwise get "invalid device context". Nesting is fine (push/pop are balanced).
    """
    ctx = primary_context()
    ctx.push()
    try:
        yield ctx
    finally:
        _driver().Context.pop()


class Stream:
    """One CUDA stream; every copy and kernel of a runner goes through it, in order."""

    def __init__(self) -> None:
        self._stream: Any = _driver().Stream()

    @property
    def handle(self) -> int:
        """The raw ``cudaStream_t`` as an int (what ``execute_async_v3`` takes)."""
        return int(self._stream.handle)

    @property
    def pycuda_stream(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        """Wait until everything queued on the stream has finished."""
        self._stream.synchronize()

    def release(self) -> None:
        """Drop the stream (after synchronizing, so no queued work refers to freed memory)."""
        if self._stream is not None:
            self._stream.synchronize()
            self._stream = None


class HostDeviceBuffer:
    """A pinned host array and a device allocation of the same size, for one tensor.

    Both are sized once for the largest shape the tensor can take (the profile's maximum); each call
    uses the leading part that the current batch needs.
    """

    def __init__(self, max_shape: Sequence[int], dtype: np.dtype[Any] | type | str) -> None:
        """Allocate the buffers.

        Args:
            max_shape: largest shape of the tensor (fully resolved).
            dtype: element type.

        Raises:
            ValueError: ``max_shape`` has a dynamic dimension.
        """
        cuda = _driver()
        self.dtype = np.dtype(dtype)
        self.max_shape = tuple(int(d) for d in max_shape)
        self.nbytes = nbytes_for(self.max_shape, self.dtype)
        # A zero-byte allocation is an error in CUDA; keep at least one element.
        self.host: np.ndarray | None = cuda.pagelocked_empty(max(1, math.prod(self.max_shape)), self.dtype)
        self.device: Any = cuda.mem_alloc(max(1, self.nbytes))

    @property
    def device_ptr(self) -> int:
        """Device address of the buffer (what ``set_tensor_address`` takes)."""
        return int(self.device)

    def _host_view(self, shape: Sequence[int]) -> np.ndarray:
        if self.host is None:
            raise RuntimeError("buffer used after free()")
        count = math.prod(shape)
        if count > self.host.size:
            raise ValueError(f"shape {tuple(shape)} needs {count} elements, buffer holds {self.host.size}")
        return self.host[:count].reshape(tuple(shape))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """Copy ``array`` into the pinned buffer, then queue its copy to the device.

        Args:
            array: data of any shape that fits; cast to the buffer's dtype (same kind only).
            stream: stream the copy is queued on.

        Raises:
            ValueError: the array is larger than the buffer.
            TypeError: the array's dtype cannot be cast to the buffer's without changing kind.
        """
        view = self._host_view(array.shape)
        # copyto keeps the pinned memory: assigning a new array would silently swap in pageable memory.
        np.copyto(view, array, casting="same_kind")
        _driver().memcpy_htod_async(self.device, view, stream.pycuda_stream)

    def download(self, shape: Sequence[int], stream: Stream) -> np.ndarray:
        """Queue the copy of the leading ``shape`` elements back to the pinned buffer.

        Args:
            shape: the shape the tensor has for this call.
            stream: stream the copy is queued on.

        Returns:
            A view of the pinned buffer: valid only after ``stream.synchronize()``, and overwritten by
            the next call; copy it before handing it out.
        """
        view = self._host_view(shape)
        _driver().memcpy_dtoh_async(view, self.device, stream.pycuda_stream)
        return view

    def free(self) -> None:
        """Release the device and pinned memory now (idempotent)."""
        if self.device is not None:
            self.device.free()
            self.device = None
        if self.host is not None:
            # pagelocked_empty's array is a view of a pycuda HostAllocation, which frees the pinned pages.
            base: Any = self.host.base
            self.host = None
            if base is not None and hasattr(base, "free"):
                base.free()
