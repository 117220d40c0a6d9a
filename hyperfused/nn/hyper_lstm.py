"""HyperLSTM and HyperLSTMCell: drop-in replacements for torch.nn.LSTM / nn.LSTMCell."""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Union

import torch
from torch import nn
from torch.utils import _pytree
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ._args import finite_real, flag, non_negative_int, positive_int, probability, real
from ._module import Module
from ..ops import check_backend_name as _check_backend, hyper_lstm_layer, resolve_backend
from ..ops.backends import exporting, func_transforming, jit_tracing
from ..ops._checks import DECODE_HALF_WEIGHTS
from ..reference import PARAM_NAMES, project

_BIAS_PARAMS = ("bias_z_weight", "bias_scale_weight")
# A cell's parameters and constant buffers, by name: PARAM_NAMES with b_0 as nn.LSTMCell's bias_ih + bias_hh.
CELL_PARAM_NAMES = PARAM_NAMES[:2] + ("bias_ih", "bias_hh") + PARAM_NAMES[3:]
_BIAS_INDEX = PARAM_NAMES.index("bias")  # b_0's place in the ops' parameter list
_DECODE_HALF = frozenset(PARAM_NAMES.index(n) for n in DECODE_HALF_WEIGHTS)  # their places in that list
# The cell's tensors that flat_params() reads: b_0's halves (with bias), then the rest of PARAM_NAMES.
_READ_NAMES = ("bias_ih", "bias_hh") + tuple(n for n in PARAM_NAMES if n != "bias")


def _upgrade_bias(state_dict, old_key: str, new_prefix: str, suffix: str, has_bias: bool) -> None:
    """State dicts written before b_0 became nn.LSTM's bias_ih + bias_hh hold one 'bias': it becomes bias_ih
    and bias_hh zero (dropped for a model without bias, where it was a zero constant)."""
    old = state_dict.pop(old_key, None)
    if old is not None and has_bias and new_prefix + "bias_ih" + suffix not in state_dict:
        state_dict[new_prefix + "bias_ih" + suffix] = old
        state_dict[new_prefix + "bias_hh" + suffix] = torch.zeros_like(old)


def _upgrade_cell_state_dict(module, state_dict, prefix, *args):
    _upgrade_bias(state_dict, prefix + "bias", prefix, "", module.use_bias)


def _upgrade_lstm_state_dict(module, state_dict, prefix, *args):
    """State dicts written when a HyperLSTM kept its layers as submodules ('cells.{k}.{name}')."""
    for k in range(len(module._cells)):
        old, sfx = f"{prefix}cells.{k}.", module._suffix(k)
        _upgrade_bias(state_dict, old + "bias", prefix, sfx, module.bias)
        for key in [key for key in state_dict if key.startswith(old)]:
            state_dict[prefix + key[len(old):] + sfx] = state_dict.pop(key)
_LN_PARAMS = tuple(n for n in PARAM_NAMES if "ln_" in n)


class HyperLSTMState(tuple):
    """``(h_n, c_n)`` — unpacks like nn.LSTM's state — that also carries the hyper-LSTM's state.

    Passing it back as ``hx`` continues the sequence exactly; so does a plain ``(h_0, c_0)`` tuple of its
    tensors, whose hyper state the module remembers (see _HyperCarry). ``hyper_h``/``hyper_c`` have shape
    (D·num_layers, B, hyper_size).
    """

    def __new__(cls, *tensors):
        if len(tensors) == 2 and (hyper := _hyper_part_of(*tensors)) is not None:
            tensors = (*tensors, *hyper)
        if len(tensors) != 4:
            # nn.DataParallel's gather calls type(state)(items): it rebuilds a tuple from what it iterates, and
            # iterating gives (h, c) only, so it would lose the hyper state.
            raise TypeError(f"HyperLSTMState(h, c, hyper_h, hyper_c): expected 4 tensors, got {len(tensors)} "
                            "arguments (nn.DataParallel cannot gather a HyperLSTMState: use "
                            "DistributedDataParallel)")
        h, c, hyper_h, hyper_c = tensors
        self = super().__new__(cls, (h, c))
        self.hyper_h, self.hyper_c = hyper_h, hyper_c
        if getattr(h, "requires_grad", False) and not torch.compiler.is_compiling():
            _LAST_WITH_GRAD.refs = tuple(weakref.ref(t) for t in tensors)
        return self

    def __reduce__(self):
        return HyperLSTMState, (self[0], self[1], self.hyper_h, self.hyper_c)

    def tensors(self) -> tuple:
        """(h, c, hyper_h, hyper_c)."""
        return self[0], self[1], self.hyper_h, self.hyper_c

    def detach(self) -> "HyperLSTMState":
        """The same state cut from the graph (truncated BPTT)."""
        return HyperLSTMState(*(t.detach() for t in self.tensors()))

    def index_select(self, dim: int, index: torch.Tensor) -> "HyperLSTMState":
        """Every tensor's rows selected along `dim` (the batch is dim 1, or 0 for HyperLSTMCell's states):
        beam search reorders the main and the hyper state together."""
        return HyperLSTMState(*(t.index_select(dim, index) for t in self.tensors()))

    def to(self, *args, **kwargs) -> "HyperLSTMState":
        """Every tensor moved/cast like Tensor.to."""
        return HyperLSTMState(*(t.to(*args, **kwargs) for t in self.tensors()))

# A module's full backward hooks (register_full_backward_hook) rebuild a returned tuple from its items,
# type(out)(*items), with each tensor item replaced by an alias of it: a HyperLSTMCell's state comes back as
# HyperLSTMState(h', c'). Two tensors that alias the (h, c) of the last state made with gradients (same
# storage, shape and strides), while its tensors live, take its hyper part. (Per thread: the rebuild follows
# the forward at once.)
_LAST_WITH_GRAD = threading.local()


def _hyper_part_of(h, c):
    refs = getattr(_LAST_WITH_GRAD, "refs", None)
    if refs is None or torch.compiler.is_compiling():
        return None
    last = [r() for r in refs]
    if any(t is None for t in last) or not all(isinstance(t, torch.Tensor) for t in (h, c)):
        return None
    if (_view_key(h), _view_key(c)) != (_view_key(last[0]), _view_key(last[1])):
        return None
    return last[2], last[3]


def _view_key(t: torch.Tensor) -> tuple:
    """What two live tensors share exactly when one aliases the other's data as it is: the same memory, read
    with the same shape, strides and dtype."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


def _state_keyed_tensors(state: HyperLSTMState) -> tuple:
    keys = (_pytree.SequenceKey(0), _pytree.SequenceKey(1), _pytree.GetAttrKey("hyper_h"),
            _pytree.GetAttrKey("hyper_c"))
    return list(zip(keys, state.tensors())), None


# HyperLSTMState is a pytree node of its four tensors, so that torch.export and the tools built on
# torch.utils._pytree see the hyper state too, not a tuple subclass they cannot look into.
_pytree.register_pytree_node(HyperLSTMState, lambda s: (list(s.tensors()), None),
                             lambda values, _: HyperLSTMState(*values),
                             serialized_type_name="hyperfused.HyperLSTMState",
                             flatten_with_keys_fn=_state_keyed_tensors)
# torch.load(weights_only=True) rebuilds one (its __reduce__ calls the constructor with four tensors): a saved
# program's example inputs, or a checkpoint that keeps a state.
torch.serialization.add_safe_globals([HyperLSTMState])



def _orthogonal_(w: torch.Tensor) -> None:
    """nn.init.orthogonal_, drawn in float32 for half-precision weights: the QR it needs has no float16 or
    bfloat16 kernel on the CPU (nn.LSTM constructs in those dtypes, so must we)."""
    if w.dtype in (torch.float32, torch.float64):
        nn.init.orthogonal_(w)
    else:
        w.copy_(nn.init.orthogonal_(torch.empty(w.shape, dtype=torch.float32, device=w.device)))


def _orthogonal_blocks_(w: torch.Tensor, blocks: int) -> None:
    for chunk in w.chunk(blocks, 0):
        _orthogonal_(chunk)


class HyperLSTMCell(Module):
    """One HyperLSTM step, like nn.LSTMCell: ``h_1, c_1 = cell(x, (h_0, c_0))``.

    The main cell's parameters have nn.LSTMCell's names and shapes: ``weight_ih`` (4H, X), ``weight_hh``
    (4H, H), ``bias_ih`` and ``bias_hh`` (4H); the paper's b_0 is their sum, as nn.LSTMCell adds its two
    biases. The hyper parameters are documented in :mod:`hyperfused.reference.hyper_lstm`. With
    ``bias=False`` there is no bias (b_0 and the hyper-bias path are zero); with ``layer_norm=False`` no
    layer norm. ``scale_init`` is where every scaling vector d starts: the paper's 0.1 by default (its
    recurrent-batch-norm trick); 1.0 starts the main cell as a plain (LN-)LSTM. The hyper options are
    keyword-only.

    ``proj_size = P > 0`` (beyond nn.LSTMCell; HyperLSTM's layers use it as nn.LSTM's ``proj_size``): h is
    projected to P by ``weight_hr`` (P, H) as nn.LSTM projects it, so ``weight_hh`` is (4H, P), the hyper cell
    reads X + P inputs, and h is (B, P) while c stays (B, H).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 hyper_size: int = 128, hyper_embed: int = 16, layer_norm: bool = True, forget_bias: float = 1.0,
                 recurrent_dropout: float = 0.0, zoneout: float = 0.0, hyper_zoneout: float = 0.0,
                 carry_hyper_state: bool = True, scale_init: float = 0.1, backend: str = "auto",
                 proj_size: int = 0):
        super().__init__()
        self._carry = _HyperCarry() if flag("carry_hyper_state", carry_hyper_state) else None
        self.scale_init = finite_real("scale_init", scale_init)
        self.zoneout, self.hyper_zoneout = probability("zoneout", zoneout), probability("hyper_zoneout", hyper_zoneout)
        self.input_size, self.hidden_size = positive_int("input_size", input_size), positive_int("hidden_size", hidden_size)
        self.hyper_size, self.hyper_embed = positive_int("hyper_size", hyper_size), positive_int("hyper_embed", hyper_embed)
        self.layer_norm, self.use_bias = flag("layer_norm", layer_norm), flag("bias", bias)
        self.forget_bias = real("forget_bias", forget_bias)
        self.recurrent_dropout = probability("recurrent_dropout", recurrent_dropout)
        self.backend = _check_backend(backend)
        self.proj_size = _check_proj_size(proj_size, self.hidden_size)
        X, H, Hh, Nz, P = input_size, hidden_size, hyper_size, hyper_embed, self.real_hidden_size
        shapes = dict(weight_ih=(4 * H, X), weight_hh=(4 * H, P), bias_ih=(4 * H,), bias_hh=(4 * H,),
                      hyper_weight_ih=(4 * Hh, X + P),
                      hyper_weight_hh=(4 * Hh, Hh), hyper_bias=(4 * Hh,), z_weight=(8 * Nz, Hh), z_bias=(8 * Nz,),
                      scale_weight=(2, 4 * H, Nz), bias_z_weight=(4 * Nz, Hh), bias_scale_weight=(4 * H, Nz),
                      ln_weight=(4 * H,), ln_bias=(4 * H,), ln_cell_weight=(H,), ln_cell_bias=(H,),
                      hyper_ln_weight=(4 * Hh,), hyper_ln_bias=(4 * Hh,), hyper_ln_cell_weight=(Hh,),
                      hyper_ln_cell_bias=(Hh,))
        factory = dict(device=device, dtype=dtype)
        for name in CELL_PARAM_NAMES:
            if name in ("bias_ih", "bias_hh") and not self.use_bias:
                self.register_parameter(name, None)  # as nn.LSTMCell(bias=False)
                continue
            t = torch.empty(shapes[name], **factory)
            fixed = (not self.use_bias and name in _BIAS_PARAMS) or (not self.layer_norm and name in _LN_PARAMS)
            if fixed:  # constants the kernels still read; reset_parameters gives the LN ones their unit gains
                self.register_buffer(name, t.zero_())
            else:
                self.register_parameter(name, nn.Parameter(t))
        if self.proj_size:  # after the others, as nn.LSTM lists its weight_hr last
            self.weight_hr = nn.Parameter(torch.empty(P, H, **factory))
        self._register_load_state_dict_pre_hook(_upgrade_cell_state_dict, with_module=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation (docs/design.md §1): every scaling vector d starts at ``scale_init``
        (the paper's 0.1 by default)."""
        Nz = self.hyper_embed
        _orthogonal_(self.weight_ih)
        _orthogonal_blocks_(self.weight_hh, 4)
        _orthogonal_(self.hyper_weight_ih)
        _orthogonal_blocks_(self.hyper_weight_hh, 4)
        if self.proj_size:
            _orthogonal_(self.weight_hr)
        self.hyper_bias.zero_()
        self.z_weight.zero_()
        self.z_bias.fill_(1.0)
        self.scale_weight.fill_(self.scale_init / Nz)
        for name in _LN_PARAMS:
            getattr(self, name).fill_(1.0 if name.endswith("weight") else 0.0)
        if self.use_bias:
            self.bias_ih.zero_()
            self.bias_hh.zero_()
            nn.init.normal_(self.bias_z_weight, std=0.01)
            self.bias_scale_weight.zero_()

    @property
    def real_hidden_size(self) -> int:
        """The size of h: proj_size with a projection, else hidden_size (nn.LSTM's name for it)."""
        return self.proj_size or self.hidden_size

    def flat_params(self) -> list[torch.Tensor]:
        """The tensors in the order the ops take them (hyperfused.reference.PARAM_NAMES): b_0 is
        bias_ih + bias_hh (zeros without bias)."""
        if self.use_bias:
            b0 = self.bias_ih + self.bias_hh
        else:
            b0 = self.weight_ih.new_zeros(4 * self.hidden_size)
        return [b0 if name == "bias" else getattr(self, name) for name in PARAM_NAMES]

    def recurrent_masks(self, T: int, B: int, like: torch.Tensor):
        """Recurrent-dropout multipliers on φ(g) for the main and hyper cells, from torch's RNG."""
        if not self.training or self.recurrent_dropout == 0.0:
            return None, None
        keep = 1.0 - self.recurrent_dropout
        main = torch.empty(T, B, self.hidden_size, device=like.device, dtype=like.dtype).bernoulli_(keep) / keep
        hyper = torch.empty(T, B, self.hyper_size, device=like.device, dtype=like.dtype).bernoulli_(keep) / keep
        return main, hyper

    def zoneout_masks(self, T: int, B: int, like: torch.Tensor):
        """Zoneout on h and ĥ (Krueger et al. 2016, as haste applies it): 1 where a unit takes its new value.
        Training draws Bernoulli(1 - p) from torch's RNG; evaluation uses the expectation, 1 - p everywhere."""
        masks = []
        for p, n in ((self.zoneout, self.real_hidden_size), (self.hyper_zoneout, self.hyper_size)):
            if p == 0.0:
                masks.append(None)
            elif self.training:
                masks.append(torch.empty(T, B, n, device=like.device, dtype=like.dtype).bernoulli_(1.0 - p))
            else:
                masks.append(torch.full((T, B, n), 1.0 - p, device=like.device, dtype=like.dtype))
        return masks

    def run(self, backend: str, x: torch.Tensor, state):
        """The whole sequence x (T, B, X) from state (h, c, ĥ, ĉ); returns per-step (h, c, ĥ, ĉ)."""
        if self._steps_alone(backend, x.shape[0]):
            # One step without gradients (a HyperLSTM called with T = 1 in a sampling loop, as nn.LSTM is): the
            # decode op, which took 38-62% off such a call on the CPU, where the sequence op spent most of a
            # one-step call on per-call weight copies.
            return tuple(t.unsqueeze(0) for t in self._step(x[0], *state))
        mask, hyper_mask = self.recurrent_masks(x.shape[0], x.shape[1], x)
        zoneout_mask, hyper_zoneout_mask = self.zoneout_masks(x.shape[0], x.shape[1], x)
        return hyper_lstm_layer(backend, x, *state, self.flat_params(), self.layer_norm, self.forget_bias, mask,
                                hyper_mask, zoneout_mask, hyper_zoneout_mask,
                                weight_hr=self.weight_hr if self.proj_size else None)

    def forward(self, input: torch.Tensor, hx=None) -> HyperLSTMState:
        if not isinstance(input, torch.Tensor) and (node := self._fx_node(input, hx)) is not None:
            return node
        _check_tensor("input", input, self.weight_ih, (1, 2), self.input_size)
        if self._decodes(input, hx):
            return self._decode_step(input, hx)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        state = _initial_state(hx, 1, B, self._state_sizes(), batched, self.weight_ih, stacked=False,
                               carry=self._carry)
        state = [s[0] for s in state]
        backend = _backend_for(self.backend, x, B)
        h, c, hh, hc = (s[0] for s in self.run(backend, x.unsqueeze(0), state))
        if self._carry is not None:
            self._carry.remember(h, c, hh, hc)
        if not batched:
            h, c, hh, hc = (s.squeeze(0) for s in (h, c, hh, hc))
        return HyperLSTMState(h, c, hh, hc)

    # -- decoding: one step at a time without gradients ----------------------------------------------------------
    # Sampling from a trained model steps the cell with the state it returned, under no_grad. Most of such a
    # step's cost was bookkeeping around a small amount of arithmetic, so this path does only what that case
    # needs: the list of the parameters' detached views is reused while their storage stays (b_0 summed anew), and
    # the single-step op (hyperfused::hyper_lstm_step: (B, ·) in and out, nothing saved) is called below
    # autograd (nothing to record).

    def _decodes(self, input, hx) -> bool:
        return (isinstance(hx, HyperLSTMState) and input.dim() == 2 and input.shape[0] > 0
                and self._decode_op_fits() and self._fused_backend(input.device))

    def _steps_alone(self, backend: str, T: int) -> bool:
        """Whether T steps on `backend` run as one decode op: T = 1 on a C++ backend, where the op fits."""
        return T == 1 and backend in ("cpu", "cuda") and self._decode_op_fits()

    def _decode_op_fits(self) -> bool:
        """Whether the decode op can step this cell now: no gradients or masks."""
        # Zoneout needs masks even in evaluation, recurrent dropout in training: the general path draws them. A
        # torch.jit.trace records one path, which its check reruns without gradients: the one that has them.
        return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not jit_tracing()
                and not (self.zoneout or self.hyper_zoneout) and not (self.training and self.recurrent_dropout))

    def _fused_backend(self, device: torch.device) -> bool:
        """Whether the backend resolves to the C++ ops on `device`, now (never where only plain PyTorch can run:
        torch.onnx.export tracing, a torch.func transform, forward-mode AD)."""
        return resolve_backend(self.backend, device) in ("cpu", "cuda")

    def _state_sizes(self) -> tuple:
        """The sizes of (h, c, ĥ, ĉ)."""
        return self.real_hidden_size, self.hidden_size, self.hyper_size, self.hyper_size

    def _decode_params(self) -> list:
        # Detached views share their parameter's storage, so they see every change of its values however it is
        # made: an optimizer step, load_state_dict, or an in-place change through .data, which no version
        # counter records. What the list must follow is a parameter's storage changing (module.to(), .data =):
        # that is the key. b_0 = bias_ih + bias_hh is derived, so it is summed again on every call. A
        # float16/bfloat16 cell steps in float32: the weights of its products (DECODE_HALF_WEIGHTS) go to the op
        # as they are (the products accumulated in float32; where the CPU's products cannot read them, the op
        # makes the float32 copies itself): at H = 1000 float32 copies of the four large ones cost a step more
        # than the step itself, and those of the embeddings' and scaling vectors' weights a tenth of it. Its
        # other parameters are copied into float32 buffers on every call (a kept copy could not tell that its
        # source changed), all in one _foreach_copy_ (a third of the time of one call each).
        # Read from the tables in one pass, not through nn.Module.__getattr__ (4 µs a step where that took 7.5);
        # nothing here records autograd, as decoding runs without gradients.
        params, buffers = self._parameters, self._buffers
        key = []
        for name in _READ_NAMES if self.use_bias else _READ_NAMES[2:]:
            t = params.get(name)
            if t is None:
                t = buffers.get(name)
            if t is None:
                # A parametrized (torch.nn.utils.parametrize) or pruned tensor is computed anew on every access,
                # from tensors that are not the ones it replaced: nothing can be kept (a kept list stepped with
                # the weight as it was when the list was made). flat_params() has just summed b_0.
                return _DecodeParams(None, self.flat_params()).refresh(None)
            key.append(t.data_ptr())
        cached = self.__dict__.get("_decode_cache")
        # buffers made under inference_mode are inference tensors, which nothing outside it may write
        if cached is None or cached.key != key or (cached.inference and not torch.is_inference_mode_enabled()):
            cached = _DecodeParams(key, self.flat_params())
            self.__dict__["_decode_cache"] = cached
        return cached.refresh((params["bias_ih"], params["bias_hh"]) if self.use_bias else None)

    def _decode_step(self, x: torch.Tensor, hx: "HyperLSTMState") -> "HyperLSTMState":
        B, H, Hh, P = x.shape[0], self.hidden_size, self.hyper_size, self.real_hidden_size
        h, c, hh, hc = hx[0], hx[1], hx.hyper_h, hx.hyper_c
        ref = self.weight_ih
        if not (h.shape == (B, P) and c.shape == (B, H) and hh.shape == hc.shape == (B, Hh)
                and h.dtype == c.dtype == hh.dtype == hc.dtype == ref.dtype
                and h.device == c.device == hh.device == hc.device == ref.device):
            for name, t, n in (("hx[0] (h_0)", h, P), ("hx[1] (c_0)", c, H), ("hx.hyper_h", hh, Hh),
                               ("hx.hyper_c", hc, Hh)):
                _check_state(name, t, (B, n), ref)
        h, c, hh, hc = self._step(x, h, c, hh, hc)
        if self._carry is not None:
            self._carry.last = (h, c, hh, hc)  # nothing here requires grad (remember() would detach)
        return HyperLSTMState(h, c, hh, hc)

    def _step(self, x, h, c, hh, hc) -> tuple:
        """The decode op on checked (B, ·) tensors: the next (h, c, ĥ, ĉ) in x's dtype. A projected cell's op
        takes its (B, P) h as it is and returns the unprojected u (B, H), projected here as the sequence path
        projects it (_projected_layer)."""
        dtype = x.dtype
        if dtype not in (torch.float32, torch.float64):  # half-precision cells step in float32 (_decode_params)
            x, h, c, hh, hc = (t.float() for t in (x, h, c, hh, hc))
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.hyperfused.hyper_lstm_step.default(
                x.contiguous(), h.contiguous(), c.contiguous(), hh.contiguous(), hc.contiguous(),
                self._decode_params(), self.layer_norm, self.forget_bias)
        out = out if out[0].dtype == dtype else tuple(t.to(dtype) for t in out)
        return (project(out[0], self.weight_hr), *out[1:]) if self.proj_size else out

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, hyper_size={self.hyper_size}, "
                f"hyper_embed={self.hyper_embed}, layer_norm={self.layer_norm}, bias={self.use_bias}"
                + (f", proj_size={self.proj_size}" if self.proj_size else ""))


class _DecodeParams:
    """The decode op's parameter list for a cell whose parameters have the storages in `key`, made once from
    flat_params(): detached views of the tensors the op reads as they are (contiguous, in the cell's float32 or
    float64, or a half-precision cell's DECODE_HALF_WEIGHTS), and contiguous buffers, float32 for a
    half-precision cell, for the rest. refresh() sums b_0 and copies into the buffers on every call: a kept copy
    could not tell that its source changed."""

    def __init__(self, key: Optional[list], params: list):
        self.key, self.inference = key, torch.is_inference_mode_enabled()
        self.params = [p.detach() for p in params]
        self.bias = self.params[_BIAS_INDEX]  # flat_params' sum, a tensor of its own
        self.copies, self.sources = [], []
        dtype = self.params[0].dtype
        full = dtype in (torch.float32, torch.float64)
        for i, v in enumerate(self.params):
            if v.is_contiguous() and (full or i in _DECODE_HALF):
                continue
            self.params[i] = torch.empty(v.shape, dtype=dtype if full else torch.float32, device=v.device)
            self.copies.append(self.params[i])
            self.sources.append(v)

    def refresh(self, bias_halves: Optional[tuple]) -> list:
        """The list with b_0 = the sum of `bias_halves` (None: as made) and every buffer copied anew."""
        if bias_halves is not None:
            torch.add(*bias_halves, out=self.bias)
        if self.sources:
            torch._foreach_copy_(self.copies, self.sources)
        return self.params


def _check_tensor(name: str, t, ref: torch.Tensor, ndims: tuple, features: int) -> None:
    """Shape/dtype/device checks with messages that name the argument and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        layouts = {3: "(T, B, input_size) or (B, T, input_size) with batch_first", 2: "(T, input_size) unbatched",
                   1: "(input_size,) unbatched"}
        if ndims == (1, 2):
            layouts[2] = "(B, input_size)"
        expected = " or ".join(f"{d}-D {layouts[d]}" for d in sorted(ndims, reverse=True))
        raise ValueError(f"{name}: expected a {expected} tensor, got shape {tuple(t.shape)}")
    if t.shape[-1] != features:
        raise ValueError(f"{name}: expected last dimension input_size={features}, got shape {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the module's), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the module's device), got {t.device}")


def _check_proj_size(proj_size, hidden_size: int) -> int:
    """nn.LSTM's proj_size: 0 (none) or below hidden_size."""
    P = non_negative_int("proj_size", proj_size)
    if P >= hidden_size:
        raise ValueError(f"proj_size: expected 0 or less than hidden_size={hidden_size} (as nn.LSTM), got {P}")
    return P


def _backend_for(backend: str, x: torch.Tensor, B: int) -> str:
    """The backend a call runs on. An empty batch (B = 0, which nn.LSTM and nn.LSTMCell accept) has nothing to
    fuse: the reference's ops make its empty outputs, connected to the parameters as a real batch's are."""
    backend = resolve_backend(backend, x.device)
    return "reference" if B == 0 else backend


class _HyperCarry:
    """The hyper state of the last call, for callers that pass back only (h, c).

    Training loops written for nn.LSTM rebuild the returned state as a plain tuple (PyTorch's word-language-
    model example detaches it with ``tuple(repackage_hidden(v) for v in h)``; nn.LSTMCell loops unpack
    ``h, c = cell(x, (h, c))``), which drops ĥ and ĉ. So each call remembers its final (h, c, ĥ, ĉ),
    detached, and a later call given a plain (h_0, c_0) takes ĥ_0, ĉ_0 from the rows of that memory whose
    (h, c) equal its own rows exactly: a detached or cloned state continues, a batch reordered or selected
    with index_select (beam search) takes the matching rows, and a row found nowhere — a fresh zero state
    in particular — starts a fresh (zero) hyper state. Exact equality of whole (h, c) rows does not happen
    by chance. The same (h_0, c_0) tensors given again get the same answer while they are unchanged, which
    activation checkpointing's rerun of a call needs (torch.utils.checkpoint, either kind). Off with
    ``carry_hyper_state=False``; a HyperLSTMState passed back is always used as it is. Under torch.compile the
    memory and the search are part of the graph (the memory is its input and, assigned, its side effect), so a
    compiled module carries as the eager one does; under torch.export and torch.func transforms nothing is
    remembered (an exported program takes the whole state as its inputs; pass the HyperLSTMState there).
    """

    def __init__(self):
        self.last = None
        self.replayed = None  # the last state a call rerun inside a backward returned: see remember()
        self._given = {}  # the answers given, by the (h_0, c_0) they were given for: see lookup()

    def __getstate__(self) -> dict:  # (copy.deepcopy, pickle) weak references do not copy
        return {**self.__dict__, "_given": {}}

    def remember(self, h, c, hh, hc) -> None:
        """Keeps the state a call returned: stacked (n, B, ·), or a cell's (B, ·) (stacked when looked up). A call
        that runs inside a backward pass is activation checkpointing's rerun of an earlier one (which stops
        where it has what the backward needs): its state is kept apart, for the next rerun call only, so that
        the next forward call still finds the last state of the forward pass."""
        if func_transforming() or exporting() or jit_tracing():  # (a transform's tensors die with it; an
            return  # exported program's, and those torch.jit.trace records, are not the module's)
        state = tuple(t.detach() if t.requires_grad else t for t in (h, c, hh, hc))
        # (not asked while compiling: a compiled graph's checkpoint reruns are its own)
        if not torch.compiler.is_compiling() and _in_backward():
            self.replayed = state
        else:
            self.last, self.replayed = state, None

    def lookup(self, h0: torch.Tensor, c0: torch.Tensor, given: tuple):
        """(ĥ_0, ĉ_0) for stacked (n, B, ·) h0, c0, or None when no row matches: `given` are the caller's two
        tensors. They get the answer they got before as long as they live unchanged, whatever was remembered
        since: activation checkpointing reruns the first call of a segment with the same tensors (or, reentrant,
        their detached aliases) after the forward pass has remembered later states. Else the rows are searched
        for in the last state remembered (inside a backward, the last rerun call's first)."""
        if func_transforming() or exporting():
            return None
        if torch.compiler.is_compiling():  # traced: the search alone, without branches on the data
            return _rows_found(self.last, h0, c0, traced=True)
        key, seen = _identity(given)
        entry = self._given.get(key) if key is not None else None
        if entry is not None and entry[0]() is not None and entry[1] == seen:
            return entry[2]
        found = None
        if self.replayed is not None and _in_backward():
            found = _rows_found(self.replayed, h0, c0)
        if found is None:
            found = _rows_found(self.last, h0, c0)
        if key is not None:
            def forget(ref, key=key, given=self._given):
                if given.get(key, (None,))[0] is ref:
                    del given[key]
            self._given[key] = (weakref.ref(given[0], forget), seen, found)
        return found


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (a call now is a checkpoint's rerun)."""
    return torch._C._current_graph_task_id() != -1


def _identity(given: tuple):
    """A key for the caller's (h_0, c_0) by the data they view, and their versions, which an in-place change
    moves: an answer kept under the key holds while the versions are unchanged. (None, None) for tensors
    without a version counter (inference mode)."""
    h, c = given
    try:
        seen = (h._version, c._version)
    except RuntimeError:
        return None, None
    return (_view_key(h), _view_key(c)), seen


def _rows_found(memory, h0: torch.Tensor, c0: torch.Tensor, traced: bool = False):
    """(ĥ_0, ĉ_0) for the rows of stacked h0, c0 that a remembered (h, c, ĥ, ĉ) holds (zero where it holds none),
    or None when it holds no row. `traced` (under torch.compile): no shortcut or answer that depends on the
    values, so that the search is part of the graph; a row held nowhere gets zeros all the same."""
    if memory is None:
        return None
    h, c, hh, hc = memory if memory[0].dim() == 3 else (t.unsqueeze(0) for t in memory)
    if h.device != h0.device or h.dtype != h0.dtype or h.shape[0] != h0.shape[0] or h.shape[2] != h0.shape[2]:
        return None
    if not traced and h.shape == h0.shape and torch.equal(h, h0) and torch.equal(c, c0):
        return hh, hc
    keys = torch.cat([h0, c0], -1).transpose(0, 1).reshape(h0.shape[1], -1)
    known = torch.cat([h, c], -1).transpose(0, 1).reshape(h.shape[1], -1)
    same = (keys[:, None, :] == known[None, :, :]).all(-1)  # (B, B_last)
    found = same.any(1) & keys.ne(0).any(1)  # an all-zero row is a fresh state
    if not traced and not bool(found.any()):
        return None
    rows = same.to(torch.uint8).argmax(1)
    keep = found.to(hh.dtype)[None, :, None]
    return hh[:, rows] * keep, hc[:, rows] * keep


def _check_state(name: str, t, expected: tuple, ref: torch.Tensor) -> None:
    """One tensor of a state passed in: its type, shape, and the module's dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the module's), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the module's device), got {t.device}")


def _initial_state(hx, num_states: int, B: int, sizes: tuple, batched: bool, ref: torch.Tensor,
                   stacked: bool = True, carry: Optional[_HyperCarry] = None):
    """(h0, c0, ĥ0, ĉ0), each (num_states, B, ·), from hx = None | (h0, c0) | HyperLSTMState; `sizes` are
    their last dimensions.

    The user's tensors are (num_states, B, ·) — or (B, ·) without `stacked`, as nn.LSTMCell takes them —
    and lose B when unbatched."""
    def zeros(n):
        return torch.zeros(num_states, B, n, dtype=ref.dtype, device=ref.device)

    Hp, H, Hh, _ = sizes
    if hx is None:
        return zeros(Hp), zeros(H), zeros(Hh), zeros(Hh)
    if jit_tracing() and not isinstance(hx, HyperLSTMState):
        # A HyperLSTMState given to the tracer arrives so too; the carry would bake a remembered one in.
        raise RuntimeError("hx: torch.jit.trace, and torch.onnx.export(dynamo=False), which traces with it, pass a "
                           "state in as a plain (h_0, c_0) tuple and return one so: the hyper state (hyper_h, "
                           "hyper_c) would be lost between calls. Export with torch.onnx.export(dynamo=True) or "
                           "torch.export.export, which carry the whole HyperLSTMState, or trace a function that "
                           "takes its four tensors and builds HyperLSTMState(h, c, hyper_h, hyper_c)")
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError("hx: expected a tuple (h_0, c_0) or the HyperLSTMState a previous call returned, "
                        f"got {type(hx).__name__}")
    hyper = (hx.hyper_h, hx.hyper_c) if isinstance(hx, HyperLSTMState) else None
    named = [("hx[0] (h_0)", hx[0], Hp), ("hx[1] (c_0)", hx[1], H)]
    if hyper is not None:
        named += [("hx.hyper_h", hyper[0], Hh), ("hx.hyper_c", hyper[1], Hh)]
    out = []
    for name, t, n in named:
        _check_state(name, t, ((num_states,) if stacked else ()) + ((B, n) if batched else (n,)), ref)
        t = t if batched else t.unsqueeze(-2)
        out.append(t if stacked else t.unsqueeze(0))
    if hyper is None:
        found = carry.lookup(out[0], out[1], (hx[0], hx[1])) if carry is not None else None
        out += list(found) if found is not None else [zeros(Hh), zeros(Hh)]
    return tuple(out)


def _reverse_index(T: int, lengths: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Index (T, B) that reverses each sequence within its own length (an involution); None = plain flip."""
    if lengths is None:
        return None
    t = torch.arange(T, device=device).unsqueeze(1)
    L = lengths.to(device).unsqueeze(0)
    return torch.where(t < L, L - 1 - t, t)


def _time_gather(seq: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    if index is None:
        return seq.flip(0)
    return seq.gather(0, index.unsqueeze(-1).expand_as(seq))


def _last_step(seq: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    if lengths is None:
        return seq[-1]
    L = lengths.to(seq.device)
    return seq[L - 1, torch.arange(seq.shape[1], device=seq.device)]


class HyperLSTM(Module):
    """A multi-layer HyperLSTM (Ha, Dai & Le 2016) with the constructor and call of :class:`torch.nn.LSTM`.

    ``out, (h_n, c_n) = m(x, hx)`` accepts (T, B, X), (B, T, X) with ``batch_first``, unbatched (T, X) and
    :class:`~torch.nn.utils.rnn.PackedSequence` inputs. The returned state is a :class:`HyperLSTMState`,
    which also carries the hyper state so that ``m(x2, state)`` continues the sequence exactly.

    ``backend``: "auto" (the fastest available for the input's device), "reference" (plain PyTorch,
    the paper line by line), "cpu" / "cuda" (fused C++/CUDA kernels) or "triton".
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, hyper_size: int = 128, hyper_embed: int = 16, layer_norm: bool = True,
                 forget_bias: float = 1.0, recurrent_dropout: float = 0.0, zoneout: float = 0.0,
                 hyper_zoneout: float = 0.0, carry_hyper_state: bool = True, scale_init: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self._carry = _HyperCarry() if flag("carry_hyper_state", carry_hyper_state) else None
        self.input_size, self.hidden_size = positive_int("input_size", input_size), positive_int("hidden_size", hidden_size)
        self.num_layers = positive_int("num_layers", num_layers)
        self.bias, self.batch_first = flag("bias", bias), flag("batch_first", batch_first)
        self.dropout = probability("dropout", dropout, include_one=True)
        self.bidirectional = flag("bidirectional", bidirectional)
        self.hyper_size, self.hyper_embed = positive_int("hyper_size", hyper_size), positive_int("hyper_embed", hyper_embed)
        self.layer_norm, self.forget_bias = flag("layer_norm", layer_norm), real("forget_bias", forget_bias)
        self.recurrent_dropout = probability("recurrent_dropout", recurrent_dropout)
        self.zoneout, self.hyper_zoneout = probability("zoneout", zoneout), probability("hyper_zoneout", hyper_zoneout)
        self.scale_init = finite_real("scale_init", scale_init)
        self.backend = _check_backend(backend)
        self.proj_size = _check_proj_size(proj_size, self.hidden_size)
        D = 2 if bidirectional else 1
        out_size = self.proj_size or hidden_size
        cells = [HyperLSTMCell(input_size if layer == 0 else D * out_size, hidden_size, bias, device, dtype,
                               hyper_size=hyper_size, hyper_embed=hyper_embed, layer_norm=layer_norm,
                               forget_bias=forget_bias, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
                               hyper_zoneout=hyper_zoneout, carry_hyper_state=False, scale_init=scale_init,
                               backend=backend, proj_size=self.proj_size)
                 for layer in range(num_layers) for _ in range(D)]
        # The parameters belong to this module under nn.LSTM's flat names (weight_ih_l0, bias_hh_l1_reverse,
        # ..., and hyper_weight_ih_l0, z_weight_l0, ... beside them); each layer's HyperLSTMCell reads the same
        # tensors but is not a submodule, so nothing is listed or saved twice.
        for k, cell in enumerate(cells):
            for name, t in [*cell._parameters.items(), *cell._buffers.items()]:
                if t is None:
                    continue
                if isinstance(t, nn.Parameter):
                    self.register_parameter(name + self._suffix(k), t)
                else:
                    self.register_buffer(name + self._suffix(k), t)
        object.__setattr__(self, "_cells", cells)
        self._register_load_state_dict_pre_hook(_upgrade_lstm_state_dict, with_module=True)

    def _suffix(self, k: int) -> str:
        """nn.LSTM's name suffix of layer-direction k: _l{layer}, and _reverse for the backward direction."""
        return f"_l{k // self.num_directions}" + ("_reverse" if k % self.num_directions else "")

    def _cell_links(self) -> list:
        """Per cell, (its table, name, this module's name, 0 for a parameter or 1 for a buffer) for each tensor
        it holds: made once per list of cells (the names are fixed at construction)."""
        links = self.__dict__.get("_links")
        if links is None or links.cells is not self._cells:  # a copy of the module has its own cells
            links = _CellLinks(self._cells, [[(table, name, name + self._suffix(k), source)
                                              for source, table in enumerate((cell._parameters, cell._buffers))
                                              for name, t in table.items() if t is not None]
                                             for k, cell in enumerate(self._cells)])
            self.__dict__["_links"] = links
        return links.rows

    def __getstate__(self) -> dict:
        # (copy.deepcopy and pickle) The cells' tables hold what this module's held at its last call: after
        # torch.func.functional_call, the tensors it was called with, which may be non-leaf tensors (they
        # cannot be deep-copied) and are not this module's. Refill them with its own first, as every call does.
        self.cells
        return super().__getstate__()

    @property
    def cells(self) -> list:
        """One HyperLSTMCell per layer and direction (layer-major), holding this module's tensors: the one-step
        form of each layer, and what the fused ops are given."""
        # Follows .to(), load_state_dict(assign=True), train()/eval() on every call. Read from this module's own
        # tables rather than through getattr (nn.Module.__getattr__ made this 40 µs a call, a fifth of a
        # one-step call's time at H = 256).
        mine = (self._parameters, self._buffers)
        for cell, links in zip(self._cells, self._cell_links()):
            for table, name, key, source in links:
                t = mine[source].get(key)
                table[name] = t if t is not None else getattr(self, key)
            if cell.training != self.training:  # (nn.Module.__setattr__ took 2.5 µs a cell)
                cell.training = self.training
        return self._cells

    @property
    def all_weights(self) -> list:
        """[[weight_ih, weight_hh, bias_ih, bias_hh, weight_hr]] per layer and direction, as nn.LSTM.all_weights
        (the main cell's; without bias no biases, without a projection no weight_hr)."""
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.bias else ()) + \
            (("weight_hr",) if self.proj_size else ())
        return [[getattr(self, n + self._suffix(k)) for n in names] for k in range(len(self._cells))]

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def flatten_parameters(self) -> None:
        """No-op, as for nn.LSTM on the CPU: the fused kernels need no cuDNN weight buffer."""

    def reset_parameters(self) -> None:
        for cell in self.cells:
            cell.reset_parameters()

    def forward(self, input: Union[torch.Tensor, PackedSequence], hx=None):
        if not isinstance(input, torch.Tensor) and (node := self._fx_node(input, hx)) is not None:
            return node
        cells = self.cells
        ref = cells[0].weight_ih
        packed = isinstance(input, PackedSequence)
        if packed:
            _check_tensor("input", input.data, ref, (2,), self.input_size)
            x, lengths = pad_packed_sequence(input)
            batched = True
        else:
            _check_tensor("input", input, ref, (2, 3), self.input_size)
            batched, lengths = input.dim() == 3, None
            x = input if not batched or not self.batch_first else input.transpose(0, 1)
            x = x if batched else x.unsqueeze(1)
        T, B, _ = x.shape
        if T == 0:
            raise ValueError(f"input: expected a sequence of at least one step, got shape {tuple(input.shape)}")
        L, D = self.num_layers, self.num_directions
        state = _initial_state(hx, L * D, B, cells[0]._state_sizes(), batched, ref, carry=self._carry)
        backend = _backend_for(self.backend, x, B)
        rev = _reverse_index(T, lengths, x.device) if D == 2 else None
        finals = []
        layer_input = x
        # One step without gradients (a sampling loop written for nn.LSTM): each cell's decode op, its (B, ·)
        # states passed on as they are (the general path's unsqueeze and last-step views cost ~10 µs a cell).
        step = cells[0]._steps_alone(backend, T)
        for layer in range(L):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                if step:
                    finals.append(cells[k]._step(layer_input[0], *(s[k] for s in state)))
                    outs.append(finals[-1][0].unsqueeze(0))
                    continue
                xi = layer_input if direction == 0 else _time_gather(layer_input, rev)
                seqs = cells[k].run(backend, xi, [s[k] for s in state])
                finals.append([_last_step(s, lengths) for s in seqs])
                outs.append(seqs[0] if direction == 0 else _time_gather(seqs[0], rev))
            layer_input = torch.cat(outs, -1) if D == 2 else outs[0]
            if self.dropout > 0 and self.training and layer < L - 1:
                layer_input = nn.functional.dropout(layer_input, self.dropout, training=True)
        h_n, c_n, hh_n, hc_n = (torch.stack(s) for s in zip(*finals))
        if self._carry is not None:
            self._carry.remember(h_n, c_n, hh_n, hc_n)
        out = layer_input
        if packed:
            out = _repack(out, input)
        elif not batched:
            out = out.squeeze(1)
            h_n, c_n, hh_n, hc_n = (s.squeeze(1) for s in (h_n, c_n, hh_n, hc_n))
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, HyperLSTMState(h_n, c_n, hh_n, hc_n)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **kwargs) -> "HyperLSTM":
        """A HyperLSTM whose main weights W_x, W_h and b_0 = b_ih + b_hh are copied from a trained nn.LSTM.

        Both use the gate order (i, f, g, o), so the blocks copy over as they are. ``kwargs`` set the
        hyper-specific options (hyper_size, hyper_embed, layer_norm, ...). ``forget_bias`` defaults to 0
        here: the trained LSTM's biases already hold its forget-gate offset.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"lstm: expected a torch.nn.LSTM, got {type(lstm).__name__}")
        ref = lstm.weight_ih_l0
        kwargs.setdefault("forget_bias", 0.0)
        m = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first, lstm.dropout,
                lstm.bidirectional, lstm.proj_size, device=ref.device, dtype=ref.dtype, **kwargs)
        with torch.no_grad():
            for ours, theirs in zip(m.all_weights, lstm.all_weights):
                for a, b in zip(ours, theirs):
                    a.copy_(b)
        return m

    def to_lstm(self) -> nn.LSTM:
        """The torch.nn.LSTM with this model's main weights and biases (the inverse of from_lstm): the hyper
        network and the layer norms have no counterpart there and are left behind."""
        ref = self._cells[0].weight_ih
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first, self.dropout,
                       self.bidirectional, self.proj_size, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for ours, theirs in zip(self.all_weights, lstm.all_weights):
                for a, b in zip(ours, theirs):
                    b.copy_(a)
        return lstm

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                              ("proj_size", 0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + (f", hyper_size={self.hyper_size}, hyper_embed={self.hyper_embed}, layer_norm={self.layer_norm}, "
                    f"backend={self.backend!r}")


class _CellLinks:
    """HyperLSTM._cell_links' table. An object rather than a tuple: torch.export compares the tensors in a
    module's container attributes before and after its trace, and the cells' tables that every call refills
    would read as tensor attributes assigned during export (a warning naming each of them)."""
    __slots__ = ("cells", "rows")

    def __init__(self, cells: list, rows: list):
        self.cells, self.rows = cells, rows


def _repack(out: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """Packs padded (T, B, ·) output with exactly the batch_sizes/sorting of the input PackedSequence."""
    order = like.sorted_indices if like.sorted_indices is not None else torch.arange(out.shape[1])
    order = order.to(out.device)
    sizes = like.batch_sizes.tolist()
    t_idx = torch.repeat_interleave(torch.arange(len(sizes), device=out.device),
                                    torch.as_tensor(sizes, device=out.device))
    b_idx = torch.cat([order[:n] for n in sizes])
    return PackedSequence(out[t_idx, b_idx], like.batch_sizes, like.sorted_indices, like.unsorted_indices)
