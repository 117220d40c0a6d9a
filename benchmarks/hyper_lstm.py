"""HyperLSTM section: nn.LSTM (cuDNN / oneDNN), the eager reference, the reference under torch.compile and
every fused backend, timed side by side on one config."""
from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import hyperfused
from hyperfused.ops.hyper_lstm import _CPU_BF16_GEMMS
from hyperfused import reference


@dataclass(frozen=True)
class Config:
    name: str
    T: int
    B: int
    X: int
    H: int
    Hh: int = 128
    Nz: int = 16

    @classmethod
    def parse(cls, text: str, name: str = "custom") -> "Config":
        """'T,B,X,H,Hh,Nz' (Hh and Nz optional)."""
        try:
            vals = [int(v) for v in text.split(",")]
            if not 4 <= len(vals) <= 6 or min(vals) <= 0:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--config: expected T,B,X,H[,Hh[,Nz]] as positive integers, got {text!r}")
        return cls(name, *vals)

    def label(self) -> str:
        return f"{self.name} (T={self.T}, B={self.B}, X={self.X}, H={self.H}, Ĥ={self.Hh}, N_z={self.Nz})"

    def gemm_flops(self, hyper: bool) -> float:
        """FLOPs of the GEMMs of one forward+backward (backward = 2× forward), the floor of any implementation."""
        T, B, X, H, Hh, Nz = self.T, self.B, self.X, self.H, self.Hh, self.Nz
        fwd = 2 * T * B * 4 * H * (X + H)
        if hyper:
            fwd += 2 * T * B * 4 * Hh * (X + H + Hh) + 2 * T * B * 12 * Nz * (Hh + H)
        return 3.0 * fwd


FULL_CONFIGS = [
    Config("fastrnns default", 100, 64, 512, 512),
    Config("paper PTB", 100, 128, 128, 1000),
    Config("small batch", 100, 8, 128, 256),
]
# Sized for a 2-core CPU: the whole --quick run takes about three minutes.
QUICK_CONFIGS = [
    Config("CPU default", 100, 32, 128, 256),
    Config("small batch", 100, 8, 128, 256),
]


class Row:
    """One implementation on one config: a forward and a forward+backward closure over fixed inputs."""

    def __init__(self, name: str, forward: Callable[[torch.Tensor], torch.Tensor], params, x: torch.Tensor):
        self.name, self._forward, self._params, self.x = name, forward, list(params), x
        self._grad = torch.randn_like(forward(x))

    def fwd(self):
        return self._forward(self.x)

    def fwd_bwd(self):
        for p in self._params:
            p.grad = None
        self._forward(self.x).backward(self._grad)


class GemmFloorRow:
    """Only the GEMMs a fused HyperLSTM layer runs, with the shapes and call pattern of csrc/hyper_lstm.cpp
    and nothing between them: the input projections as one GEMM over all T·B rows, per step the two
    recurrent GEMMs (forward) and their transposes (backward), then the weight-gradient GEMMs, all as
    torch.mm. Its time against nn.LSTM is what plain BLAS calls allow a HyperLSTM at this size, pointwise
    work aside (the fused CPU op runs each GEMM in oneDNN or MKL, whichever measured faster, so it can beat
    this row where torch.mm is not the faster)."""

    name = "HyperLSTM GEMMs alone (torch.mm)"

    def __init__(self, cfg: Config, device: torch.device):
        T, B, X, H, Hh = cfg.T, cfg.B, cfg.X, cfg.H, cfg.Hh
        r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
        G = 4 * H + 4 * Hh
        self.T = T
        self.x2, self.w_in = r(T * B, X), r(X, 4 * H + 4 * Hh)  # [W_x ; Ŵ_x[:, :X]]ᵀ
        self.w_rec, self.w_hyper = r(H, G), r(Hh, 4 * Hh)  # [W_h ; Ŵ_x[:, X:]]ᵀ, Ŵ_hᵀ
        self.hs, self.hhs = r(T, B, H), r(T, B, Hh)
        self.g, self.ghh = r(T, B, G), r(B, 4 * Hh)
        self.dh, self.dhh = r(B, H), r(B, Hh)

    def fwd(self):
        with torch.no_grad():
            gin = self.x2 @ self.w_in
            for t in range(self.T):
                torch.mm(self.hs[t], self.w_rec, out=self.g[t])
                torch.mm(self.hhs[t], self.w_hyper, out=self.ghh)
        return gin

    def fwd_bwd(self):
        gin = self.fwd()
        with torch.no_grad():
            Hh4 = self.w_hyper.shape[1]
            for t in reversed(range(self.T)):
                torch.mm(self.g[t], self.w_rec.t(), out=self.dh)
                torch.mm(self.g[t, :, -Hh4:], self.w_hyper.t(), out=self.dhh)
            M = self.x2.shape[0]
            g2, hs2 = self.g.view(M, -1), self.hs.view(M, -1)
            gin @ self.w_in.t()  # grad of x
            self.x2.t() @ gin  # grads of W_x and Ŵ_x[:, :X]
            hs2.t() @ g2  # grads of W_h and Ŵ_x[:, X:]
            self.hhs.view(M, -1).t() @ g2[:, -Hh4:]  # grad of Ŵ_h


def _compiled_reference(m: hyperfused.HyperLSTM) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference step under torch.compile, looped in Python: how one compiles a custom RNN cell."""
    step = torch.compile(reference.hyper_lstm_step, dynamic=False)
    cell = m.cells[0]

    def run(x):
        B = x.shape[1]
        state = [x.new_zeros(B, n) for n in (cell.hidden_size, cell.hidden_size, cell.hyper_size, cell.hyper_size)]
        p = reference.HyperLSTMParams(*cell.flat_params())
        outs = []
        for t in range(x.shape[0]):
            state = step(x[t], state, p, cell.layer_norm, cell.forget_bias)
            outs.append(state[0])
        return torch.stack(outs)

    return run


def make_rows(cfg: Config, device: torch.device, with_compile: bool, backends: Optional[list[str]] = None):
    torch.manual_seed(0)
    x = torch.randn(cfg.T, cfg.B, cfg.X, device=device)
    rows = []
    lstm = torch.nn.LSTM(cfg.X, cfg.H, device=device)
    rows.append(Row("nn.LSTM (cuDNN)" if device.type == "cuda" else "nn.LSTM", lambda x: lstm(x)[0],
                    lstm.parameters(), x))
    rows.append(GemmFloorRow(cfg, device))
    kw = dict(hyper_size=cfg.Hh, hyper_embed=cfg.Nz, device=device)
    ref = hyperfused.HyperLSTM(cfg.X, cfg.H, backend="reference", **kw)
    rows.append(Row("reference", lambda x: ref(x)[0], ref.parameters(), x))
    if with_compile:
        rows.append(Row("reference + torch.compile", _compiled_reference(ref), ref.parameters(), x))
    for backend in hyperfused.ops.backends_for(device):
        if backend == "reference" or (backends is not None and backend not in backends):
            continue
        if backend == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not timings
        m = hyperfused.HyperLSTM(cfg.X, cfg.H, backend=backend, **kw)
        m.load_state_dict(ref.state_dict())
        rows.append(Row(f"hyperfused {backend}", lambda x, m=m: m(x)[0], m.parameters(), x))
        if backend == "cuda":  # the GEMM-shaped forward step is CUDA's default; the one-kernel step beside it
            rows.append(Row("hyperfused cuda, one-kernel step", _with_step_design("fused", lambda x, m=m: m(x)[0]),
                            m.parameters(), x))
        if backend == "cpu" and _CPU_BF16_GEMMS:  # bfloat16 GEMMs where oneDNN has them; nn.LSTM's beside
            rows.append(Row("nn.LSTM, bfloat16 autocast", _under_autocast(lambda x: lstm(x)[0]), lstm.parameters(), x))
            rows.append(Row("hyperfused cpu, bfloat16 autocast", _under_autocast(lambda x, m=m: m(x)[0]),
                            m.parameters(), x))
    return rows


def _under_autocast(forward):
    """forward under torch.autocast("cpu", bfloat16) (GPU timings: benchmarks/gpu_timings.py)."""
    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(x)
    return run


def with_env(var: str, value: str, fn):
    """fn with the environment variable var set to value during each call, restored after (the C++ driver
    reads its settings at every call)."""
    def run(*args):
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old
    return run


def _with_step_design(design: str, forward):
    """forward with HYPERFUSED_STEP_DESIGN=design during the call."""
    return with_env("HYPERFUSED_STEP_DESIGN", design, forward)
