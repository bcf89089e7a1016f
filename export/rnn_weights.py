"""A PyTorch recurrent layer's weights as ONNX's recurrent ops take them: per layer W, R and B,
the directions stacked, the gate blocks in ONNX's order.

Shared by the export paths of crnn.GRU and hppnet.LSTM, which emit native ONNX GRU / LSTM
nodes under torch.onnx.export; each passes its own gate reordering (crnn._zrn, hppnet._iofc).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def onnx_rnn_weights(rnn: nn.RNNBase, layer: int,
                     reorder: Callable[[torch.Tensor, int], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer `layer` of `rnn` as ONNX's W [dirs, gates x hidden, input], R [dirs, gates x
    hidden, hidden] and B [dirs, 2 x gates x hidden] (input biases, then recurrent ones);
    `reorder(weight, hidden)` puts PyTorch's gate blocks in ONNX's order."""
    h = rnn.hidden_size
    w, r, b = [], [], []
    for suffix in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
        w_ih, w_hh, b_ih, b_hh = (
            getattr(rnn, f"{name}_l{layer}{suffix}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        w.append(reorder(w_ih, h))
        r.append(reorder(w_hh, h))
        b.append(torch.cat((reorder(b_ih, h), reorder(b_hh, h))))
    return torch.stack(w), torch.stack(r), torch.stack(b)
