"""torch.library operators and the backend dispatch: modules call these, never kernels directly."""
from .backends import BACKENDS, available_backends, backends_for, check_backend_name, resolve_backend
from .decompositions import decompositions
from .hyper_lstm import hyper_lstm_layer
from .static_hypernet import generate_kernels, tile_layout

if "triton" in available_backends():
    from . import triton_lstm  # noqa: F401  (registers the hyperfused::*_triton ops)

__all__ = ["BACKENDS", "available_backends", "backends_for", "check_backend_name", "resolve_backend", "decompositions", "hyper_lstm_layer", "generate_kernels", "tile_layout"]
