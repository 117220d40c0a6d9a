"""A layer-normalised LSTM (Ba et al. 2016) in plain PyTorch: the LN-LSTM baseline of the paper's PTB table."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..reference.hyper_lstm import LN_EPS


class LayerNormLSTM(nn.Module):
    """Single-direction LN-LSTM with nn.LSTM's (T, B, X) call; per-gate LN and LN on c, recurrent dropout
    on φ(g), forget-gate bias, like the main cell of the HyperLSTM without the hypernetwork."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 1.0,
                 recurrent_dropout: float = 0.0):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.forget_bias, self.recurrent_dropout = forget_bias, recurrent_dropout
        self.cells = nn.ModuleList()
        for layer in range(num_layers):
            cell = nn.Module()
            cell.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size if layer == 0 else hidden_size))
            cell.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
            cell.bias = nn.Parameter(torch.zeros(4 * hidden_size))
            cell.ln_weight = nn.Parameter(torch.ones(4 * hidden_size))
            cell.ln_bias = nn.Parameter(torch.zeros(4 * hidden_size))
            cell.ln_cell_weight = nn.Parameter(torch.ones(hidden_size))
            cell.ln_cell_bias = nn.Parameter(torch.zeros(hidden_size))
            nn.init.orthogonal_(cell.weight_ih)
            for block in cell.weight_hh.data.chunk(4):
                nn.init.orthogonal_(block)
            self.cells.append(cell)

    def forward(self, x, hx=None):
        T, B, _ = x.shape
        H = self.hidden_size
        if hx is None:
            hx = (x.new_zeros(self.num_layers, B, H), x.new_zeros(self.num_layers, B, H))
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            h, c = hx[0][layer], hx[1][layer]
            pre_x = x @ cell.weight_ih.T + cell.bias
            keep = 1.0 - self.recurrent_dropout
            outs = []
            gains, biases = cell.ln_weight.view(4, H), cell.ln_bias.view(4, H)
            for t in range(T):
                # The four gates' layer norms in one call on a (B, 4, H) view: the same math as four calls
                # (biased variance, ε = LN_EPS), a quarter of the autograd nodes per step.
                a = (pre_x[t] + h @ cell.weight_hh.T).view(B, 4, H)
                i, f, g, o = (F.layer_norm(a, (H,), eps=LN_EPS) * gains + biases).unbind(1)
                g = torch.tanh(g)
                if self.training and self.recurrent_dropout > 0:
                    g = g * torch.empty_like(g).bernoulli_(keep) / keep
                c = torch.sigmoid(f + self.forget_bias) * c + torch.sigmoid(i) * g
                ln_c = F.layer_norm(c, (H,), cell.ln_cell_weight, cell.ln_cell_bias, LN_EPS)
                h = torch.sigmoid(o) * torch.tanh(ln_c)
                outs.append(h)
            x = torch.stack(outs)
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))
