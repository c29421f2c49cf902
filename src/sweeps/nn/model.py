"""A sequential network over one contiguous parameter buffer, and the book's models.

``Sequential`` gathers every layer's parameters into one flat array (and the gradients into
another) and re-points the layers' ``params``/``grads`` entries at views of them. Optimizers
then update all parameters with a few in-place vector operations, and weight decay touches
one contiguous slice: the decayed weights come first in the buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sweeps.nn import layers as L
from sweeps.nn.init import Init

ACTIVATIONS: dict[str, type[L.Layer]] = {"relu": L.ReLU, "sigmoid": L.Sigmoid, "tanh": L.Tanh}
LOSSES = ("softmax_ce", "softmax_ce_clipped", "mse")
EVAL_CHUNK_BYTES = 8 * 2**20  # an evaluation chunk's largest array: about a last-level cache


def _check_choice(kind: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; choose from {sorted(allowed)}")


class Sequential:
    """Layers applied in order, then a loss.

    ``params``/``grads`` map the book's names (``W1``, ``b1``, ``gamma1``, ``beta1``, ...) to
    views of ``flat_params``/``flat_grads``. ``n_decayed`` is the length of the leading slice
    of the buffer holding the weights that weight decay applies to. ``hidden`` lists the
    indices of the hidden activation layers, whose outputs the trainer inspects.
    """

    def __init__(
        self,
        layers: Sequence[L.Layer],
        loss: L.SoftmaxCrossEntropy | L.MeanSquaredError,
        input_shape: tuple[int, ...],
        hidden: Sequence[int] = (),
        dtype=np.float32,
    ) -> None:
        self.layers = list(layers)
        self.run_order = _run_order(self.layers)
        self.loss_layer = loss
        self.input_shape = tuple(input_shape)
        self.hidden = list(hidden)
        self._hidden_index = {i: k for k, i in enumerate(self.hidden)}
        self.dtype = np.dtype(dtype)
        self._sample_bytes: int | None = None  # see eval_chunk
        self._flatten_parameters()

    def _flatten_parameters(self) -> None:
        entries = []  # (decayed?, book name, layer, key)
        w_index = 0
        for layer in self.layers:
            if isinstance(layer, L.Affine | L.Convolution):
                w_index += 1
            for key in layer.params:
                suffix = (
                    w_index if isinstance(layer, L.Affine | L.Convolution | L.BatchNorm) else ""
                )
                entries.append((key in layer.decayed, f"{key}{suffix}", layer, key))
        entries.sort(key=lambda e: not e[0])  # stable: decayed weights first
        sizes = [e[2].params[e[3]].size for e in entries]
        total = int(sum(sizes))
        self.flat_params = np.empty(total, dtype=self.dtype)
        self.flat_grads = np.zeros(total, dtype=self.dtype)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.n_decayed = 0
        offset = 0
        for (decayed, name, layer, key), n in zip(entries, sizes, strict=True):
            shape = layer.params[key].shape
            view = self.flat_params[offset : offset + n].reshape(shape)
            view[...] = layer.params[key]
            gview = self.flat_grads[offset : offset + n].reshape(shape)
            layer.params[key], layer.grads[key] = view, gview
            self.params[name], self.grads[name] = view, gview
            offset += n
            if decayed:
                self.n_decayed = offset

    @property
    def decayed_params(self) -> np.ndarray:
        return self.flat_params[: self.n_decayed]

    # -- forward / backward -------------------------------------------------------------

    def _check_input(self, x: np.ndarray) -> None:
        if x.shape[1:] != self.input_shape:
            raise ValueError(
                f"input shape {x.shape[1:]} does not match the model's input {self.input_shape} "
                f"(batch shape {x.shape})"
            )

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """(N, *input_shape) -> (N, classes): the last layer's output (logits for softmax)."""
        self._check_input(x)
        x = x.astype(self.dtype, copy=False)
        for layer in self.run_order:
            x = layer.forward(x, train)
        return x

    def loss(self, x: np.ndarray, t: np.ndarray, train: bool = True) -> float:
        """Forward pass and data loss (weight decay is added by the optimizer's transform)."""
        self.out = self.forward(x, train)
        return self.loss_layer.forward(self.out, t)

    def backward(self) -> None:
        """Fill ``grads`` from the last ``loss`` call."""
        dout = self.loss_layer.backward()
        for layer in reversed(self.run_order[1:]):
            dout = layer.backward(dout)
        # The input is data: no gradient for it, which saves the first layer's dx product.
        self.run_order[0].backward_params(dout)

    def gradient(self, x: np.ndarray, t: np.ndarray) -> float:
        """Loss (training mode) and backprop in one call; returns the loss."""
        value = self.loss(x, t, train=True)
        self.backward()
        return value

    # -- evaluation ---------------------------------------------------------------------

    def eval_chunk(self, batch_size: int) -> int:
        """Samples per evaluation chunk: ``batch_size``, fewer when the chunk's largest
        intermediate array (a layer's output, a convolution's im2col matrix) would exceed
        ``EVAL_CHUNK_BYTES``. Those arrays are written once and read once or twice: past the
        last-level cache each pass goes to memory. SimpleConvNet's conv output is 69 KB per
        sample, 69 MB for the default 1000; evaluating 6000 samples measured 1.09 s in chunks
        of 1000, 0.79 s in chunks of 100 (2 cores, 32 MB L3)."""
        if self._sample_bytes is None:
            h, largest = np.zeros((1, *self.input_shape), dtype=self.dtype), 0
            for layer in self.layers:
                h = layer.forward(h, False)
                col = getattr(layer, "col", None)
                largest = max(largest, h.nbytes, col.nbytes if col is not None else 0)
            self._sample_bytes = largest
        return max(1, min(batch_size, EVAL_CHUNK_BYTES // max(self._sample_bytes, 1)))

    def evaluate(
        self,
        x: np.ndarray,
        t: np.ndarray,
        batch_size: int = 1000,
        *,
        hidden_rows: int = 0,
        on_hidden: Callable[[int, np.ndarray], object] | None = None,
    ) -> tuple[float, float]:
        """Mean loss and accuracy in evaluation mode, in chunks of at most ``batch_size``
        samples (``eval_chunk``) to bound memory.

        ``on_hidden(k, a)``: called with the output ``a`` of the k-th hidden activation layer
        (``hidden[k]``) for the first ``hidden_rows`` samples, chunk by chunk, right after the
        layer made it and before the next layer reads it: the activations of these samples
        come from the evaluation's own forward pass, not from another one
        (``hidden_activations``). The chunks holding them run in the book's layer order (a
        ReLU before its pooling, see ``_run_order``), which gives the same output."""
        batch_size = self.eval_chunk(batch_size)
        total_loss, correct = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            xb, tb = x[i : i + batch_size], t[i : i + batch_size]
            rows = min(hidden_rows - i, xb.shape[0])
            if rows > 0 and on_hidden is not None:
                out = self._forward_watched(xb, rows, on_hidden)
            else:
                out = self.forward(xb, train=False)
            total_loss += self.loss_layer.forward(out, tb) * xb.shape[0]
            correct += int(np.count_nonzero(out.argmax(axis=1) == tb))
        n = max(x.shape[0], 1)
        return total_loss / n, correct / n

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class per sample (evaluation mode)."""
        batch_size = self.eval_chunk(batch_size)
        return np.concatenate(
            [
                self.forward(x[i : i + batch_size]).argmax(axis=1)
                for i in range(0, len(x), batch_size)
            ]
        )

    def _forward_watched(
        self, x: np.ndarray, rows: int, on_hidden: Callable[[int, np.ndarray], object]
    ) -> np.ndarray:
        """``forward`` in evaluation mode and in the book's layer order, showing
        ``on_hidden`` the first ``rows`` rows of each hidden activation layer's output."""
        self._check_input(x)
        h = x.astype(self.dtype, copy=False)
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, False)
            k = self._hidden_index.get(i)
            if k is not None:
                on_hidden(k, h[:rows])
        return h

    def hidden_activations(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs of each hidden activation layer for x, in evaluation mode."""
        self._check_input(x)
        outs = []
        h = x.astype(self.dtype, copy=False)
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, False)
            if i in self.hidden:
                outs.append(h.copy())
        return outs

    def activation_names(self) -> list[str]:
        return [type(self.layers[i]).__name__.lower() for i in self.hidden]

    def set_dropout_frozen(self, frozen: bool) -> None:
        for layer in self.layers:
            if isinstance(layer, L.Dropout):
                layer.freeze_mask = frozen

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters plus BN running statistics, for saving as .npz."""
        state = {k: v.copy() for k, v in self.params.items()}
        bn = 0
        for layer in self.layers:
            if isinstance(layer, L.BatchNorm):
                bn += 1
                state[f"running_mean{bn}"] = layer.running_mean.copy()
                state[f"running_var{bn}"] = layer.running_var.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for k, v in self.params.items():
            v[...] = state[k]
        bn = 0
        for layer in self.layers:
            if isinstance(layer, L.BatchNorm):
                bn += 1
                layer.running_mean[...] = state[f"running_mean{bn}"]
                layer.running_var[...] = state[f"running_var{bn}"]

    def __repr__(self) -> str:
        body = "\n".join(f"  {layer!r}" for layer in self.layers)
        return f"Sequential(input={self.input_shape}, params={self.flat_params.size}\n{body}\n)"


def _run_order(layers: Sequence[L.Layer]) -> list[L.Layer]:
    """The layers in the order ``forward`` and ``backward`` run them: a ReLU directly followed
    by max pooling runs after the pooling. ReLU is monotone, so pooling first gives the same
    output (the max of the ReLUs is the ReLU of the max) and the same gradient (where a
    window's max is positive, its first maximum is the same element either way and ReLU passes
    the gradient; where it is not, no gradient passes either way), and the ReLU works on the
    pooled map: a quarter of the elements for 2x2 pooling, and none of its passes over the
    convolution's output. Only the sign of a zero can differ (0.0 or -0.0). Pooling whose
    padding could fill a whole window stays after the ReLU (its -inf would become NaN). The
    layers keep their book order in ``layers``, which ``hidden_activations`` walks."""
    order = list(layers)
    for i in range(len(order) - 1):
        relu, pool = order[i], order[i + 1]
        if (
            type(relu) is L.ReLU
            and type(pool) is L.MaxPooling
            and pool.pad < min(pool.pool_h, pool.pool_w)
        ):
            order[i], order[i + 1] = pool, relu
    return order


# -- builders ---------------------------------------------------------------------------


def _make_loss(loss: str, mse_targets: tuple[float, float]):
    _check_choice("loss", loss, LOSSES)
    if loss == "mse":
        return L.MeanSquaredError(*mse_targets)
    if loss == "softmax_ce_clipped":  # Keras 2.2's clipped probabilities, K.epsilon() = 1e-7
        return L.SoftmaxCrossEntropy(clip=1e-7)
    return L.SoftmaxCrossEntropy()


def _dense(fan_in, fan_out, init: Init, rng, dtype, bias=True) -> L.Affine:
    W = init((fan_in, fan_out), fan_in, fan_out, rng, dtype)
    return L.Affine(W, np.zeros(fan_out, dtype=dtype) if bias else None)


def _conv(C, FN, k, init: Init, rng, dtype, stride=1, pad=0, bias=True) -> L.Convolution:
    W = init((FN, C, k, k), C * k * k, FN * k * k, rng, dtype)
    return L.Convolution(W, np.zeros(FN, dtype=dtype) if bias else None, stride, pad)


def _bn(n, dtype) -> L.BatchNorm:
    return L.BatchNorm(np.ones(n, dtype=dtype), np.zeros(n, dtype=dtype))


def _check_dropout(dropout: float | None) -> None:
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout ratio {dropout!r} is outside the allowed range [0, 1)")


def mlp(
    input_size: int,
    hidden_sizes: Sequence[int],
    output_size: int,
    *,
    rng: np.random.Generator,
    activation: str = "relu",
    init: Init | None = None,
    batchnorm: bool = False,
    dropout: float | None = None,
    dropout_inverted: bool = True,
    bias: bool = True,
    output_activation: str | None = None,
    loss: str = "softmax_ce",
    mse_targets: tuple[float, float] = (0.0, 1.0),
    dtype=np.float32,
) -> Sequential:
    """Multi-layer perceptron (book's MultiLayerNet / MultiLayerNetExtend).

    Each hidden layer is Affine -> [BatchNorm] -> activation -> [Dropout]; the output layer is
    Affine -> [output activation]; then the loss.
    """
    init = init or Init("he")
    _check_choice("activation", activation, ACTIVATIONS)
    if output_activation is not None:
        _check_choice("output activation", output_activation, ACTIVATIONS)
    _check_dropout(dropout)
    sizes = [input_size, *hidden_sizes, output_size]
    if any(int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"layer sizes must be positive integers, got {sizes}")
    layers: list[L.Layer] = []
    hidden = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers.append(_dense(fan_in, fan_out, init, rng, dtype, bias))
        if batchnorm:
            layers.append(_bn(fan_out, dtype))
        layers.append(ACTIVATIONS[activation]())
        hidden.append(len(layers) - 1)
        if dropout:
            layers.append(L.Dropout(dropout, rng, dropout_inverted))
    layers.append(_dense(sizes[-2], sizes[-1], init, rng, dtype, bias))
    if output_activation:
        layers.append(ACTIVATIONS[output_activation]())
    return Sequential(layers, _make_loss(loss, mse_targets), (input_size,), hidden, dtype)


def simple_convnet(
    *,
    rng: np.random.Generator,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    filters: int = 30,
    filter_size: int = 5,
    stride: int = 1,
    pad: int = 0,
    hidden_size: int = 100,
    output_size: int = 10,
    activation: str = "relu",
    init: Init | None = None,
    batchnorm: bool = False,
    dropout: float | None = None,
    dropout_inverted: bool = True,
    dtype=np.float32,
) -> Sequential:
    """The book's SimpleConvNet (ch07): conv 30x5x5 - ReLU - maxpool 2 - affine 100 - ReLU -
    affine 10, softmax cross-entropy. The book initializes every weight with std 0.01."""
    init = init or Init("std", std=0.01)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_dropout(dropout)
    C, H, W = input_shape
    conv_h = (H + 2 * pad - filter_size) // stride + 1
    conv_w = (W + 2 * pad - filter_size) // stride + 1
    if conv_h < 2 or conv_w < 2:
        raise ValueError(
            f"input {input_shape} is too small for a {filter_size}x{filter_size} filter"
        )
    flat = filters * (conv_h // 2) * (conv_w // 2)
    Act = ACTIVATIONS[activation]
    layers: list[L.Layer] = [_conv(C, filters, filter_size, init, rng, dtype, stride, pad)]
    if batchnorm:
        layers.append(_bn(filters, dtype))
    layers += [
        Act(),
        L.MaxPooling(2, 2, 2),
        L.Flatten(),
        _dense(flat, hidden_size, init, rng, dtype),
    ]
    hidden = [len(layers) - 4]
    if batchnorm:
        layers.append(_bn(hidden_size, dtype))
    layers.append(Act())
    hidden.append(len(layers) - 1)
    if dropout:
        layers.append(L.Dropout(dropout, rng, dropout_inverted))
    layers.append(_dense(hidden_size, output_size, init, rng, dtype))
    return Sequential(layers, L.SoftmaxCrossEntropy(), input_shape, hidden, dtype)


def deep_convnet(
    *,
    rng: np.random.Generator,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    hidden_size: int = 50,
    output_size: int = 10,
    activation: str = "relu",
    init: Init | None = None,
    batchnorm: bool = False,
    dropout: float | None = 0.5,
    dropout_inverted: bool = True,
    dropout_on_logits: bool = True,
    dtype=np.float32,
) -> Sequential:
    """The book's DeepConvNet (ch08): six 3x3 convolutions (16, 16, 32, 32, 64, 64 channels,
    pad 1 except pad 2 on the fourth), a 2x2 max pool after each pair, affine 50 - ReLU -
    dropout - affine 10 - dropout (the book drops out the logits too), He init."""
    init = init or Init("he")
    _check_choice("activation", activation, ACTIVATIONS)
    _check_dropout(dropout)
    Act = ACTIVATIONS[activation]
    C, H, W = input_shape
    layers: list[L.Layer] = []
    hidden = []
    channels = [(C, 16, 1), (16, 16, 1), (16, 32, 1), (32, 32, 2), (32, 64, 1), (64, 64, 1)]
    for i, (c_in, c_out, pad) in enumerate(channels):
        layers.append(_conv(c_in, c_out, 3, init, rng, dtype, 1, pad))
        H, W = H + 2 * pad - 2, W + 2 * pad - 2
        if batchnorm:
            layers.append(_bn(c_out, dtype))
        layers.append(Act())
        hidden.append(len(layers) - 1)
        if i % 2 == 1:
            layers.append(L.MaxPooling(2, 2, 2))
            H, W = H // 2, W // 2
    if H < 1 or W < 1:
        raise ValueError(f"input {input_shape} is too small for DeepConvNet")
    layers += [L.Flatten(), _dense(64 * H * W, hidden_size, init, rng, dtype)]
    if batchnorm:
        layers.append(_bn(hidden_size, dtype))
    layers.append(Act())
    hidden.append(len(layers) - 1)
    if dropout:
        layers.append(L.Dropout(dropout, rng, dropout_inverted))
    layers.append(_dense(hidden_size, output_size, init, rng, dtype))
    if dropout and dropout_on_logits:
        layers.append(L.Dropout(dropout, rng, dropout_inverted))
    return Sequential(layers, L.SoftmaxCrossEntropy(), input_shape, hidden, dtype)
