"""Backends of the dual-stream op. Importing this package registers ``torch.ops.libortho.*``."""
from .registry import check_inputs, ortho_glu, ortho_linear  # noqa: F401
from .reference import ortho_linear_reference, scatter_csr  # noqa: F401
from . import cuda  # noqa: F401,E402  (registers the CUDA backend; builds lazily on first GPU call)
from .attention import decode_attention, decode_attention_reference  # noqa: F401,E402
from .attention_step import decode_attention_step  # noqa: F401,E402
