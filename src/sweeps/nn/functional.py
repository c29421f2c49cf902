"""Pure NumPy math shared by the layers: im2col/col2im, softmax, losses.

No state, no config, no logging. Shapes follow the book (Saito, ch07 `common/util.py`):
images are (N, C, H, W); an im2col matrix has one row per output pixel (n, oy, ox) and one
column per filter tap (c, ky, kx).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


def conv_output_size(size: int, filter_size: int, stride: int, pad: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * pad - filter_size) // stride + 1


def windows(x: np.ndarray, FH: int, FW: int, stride: int, pad: int) -> np.ndarray:
    """A read-only strided view of every FHxFW window of x.

    (N, C, H, W) -> (N, C, out_h, out_w, FH, FW); no copy except the zero padding.
    """
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    N, C, H, W = x.shape
    out_h = (H - FH) // stride + 1
    out_w = (W - FW) // stride + 1
    sN, sC, sH, sW = x.strides
    return as_strided(
        x,
        shape=(N, C, out_h, out_w, FH, FW),
        strides=(sN, sC, sH * stride, sW * stride, sH, sW),
        writeable=False,
    )


def im2col(x: np.ndarray, FH: int, FW: int, stride: int = 1, pad: int = 0) -> np.ndarray:
    """(N, C, H, W) -> (N*out_h*out_w, C*FH*FW), rows (n, oy, ox), columns (c, ky, kx).

    The matrix is the transpose of a C-contiguous (C*FH*FW, N*out_h*out_w) array: filling
    that layout copies whole runs of out_w pixels, several times faster than writing rows of
    FH*FW taps, and BLAS reads a transposed operand at full speed.
    """
    N, C = x.shape[:2]
    win = windows(x, FH, FW, stride, pad)  # (N, C, oh, ow, FH, FW), a view
    out_h, out_w = win.shape[2:4]
    col_t = np.empty((C, FH, FW, N, out_h, out_w), dtype=x.dtype)
    np.copyto(col_t, win.transpose(1, 4, 5, 0, 2, 3))  # the one copy
    return col_t.reshape(C * FH * FW, N * out_h * out_w).T


def col2im(
    col: np.ndarray, x_shape: tuple[int, ...], FH: int, FW: int, stride: int = 1, pad: int = 0
) -> np.ndarray:
    """Adjoint of im2col: sum every column entry back into its input pixel.

    (N*out_h*out_w, C*FH*FW) -> (N, C, H, W). The loop runs over the FH*FW filter taps only
    (25 for a 5x5 filter); each step adds one strided slice covering every sample and pixel.
    ``col`` may have either memory layout; the transposed one (as im2col makes it) is read
    without a copy.
    """
    N, C, H, W = x_shape
    out_h = conv_output_size(H, FH, stride, pad)
    out_w = conv_output_size(W, FW, stride, pad)
    col_t = col.T.reshape(C, FH, FW, N, out_h, out_w)
    img = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=col.dtype)
    for ky in range(FH):
        y_end = ky + stride * out_h
        for kx in range(FW):
            x_end = kx + stride * out_w
            # (C, N, oh, ow) -> (N, C, oh, ow), added into every (ky, kx)-shifted pixel
            img[:, :, ky:y_end:stride, kx:x_end:stride] += col_t[:, ky, kx].transpose(1, 0, 2, 3)
    return img[:, :, pad : H + pad, pad : W + pad]


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max for stability. (N, K) -> (N, K)."""
    z = x - x.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def one_hot(t: np.ndarray, num_classes: int, off: float = 0.0, on: float = 1.0, dtype=np.float64):
    """(N,) int labels -> (N, num_classes) with `on` at the label and `off` elsewhere."""
    out = np.full((t.shape[0], num_classes), off, dtype=dtype)
    out[np.arange(t.shape[0]), t] = on
    return out


def smooth_curve(y: np.ndarray, window: int = 11, beta: float = 2.0) -> np.ndarray:
    """The book's loss smoother (`common/util.py`): Kaiser window, reflected ends, same length."""
    y = np.asarray(y, dtype=np.float64)
    if y.size < window:
        return y.copy()
    half = window // 2
    s = np.r_[y[half:0:-1], y, y[-2 : -half - 2 : -1]]
    w = np.kaiser(window, beta)
    return np.convolve(w / w.sum(), s, mode="valid")
