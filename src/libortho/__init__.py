"""LibOrtho: low-bit base + sparse ortho stream for causal LMs, with a per-layer kill switch alpha."""
__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers torch.ops.libortho.*)
from .attention import use_decode_attention
from .calibrate import Calibration, calibration_data
from .checkpoint import load, read_manifest, save
from .config import OrthoConfig
from .data import load_model, read_text
from .errors import LibOrthoError, SaveFormatError
from .fuse import fuse_linear_siblings, fuse_siblings, unfuse_siblings
from .glu import fuse_glu, unfuse_glu
from .norms import fuse_norms, unfuse_norms
from .layer import OrthoLinear
from .model import alpha, cast_model, decompose, format_report, ortho_layers, report, set_alpha

__all__ = ["OrthoConfig", "OrthoLinear", "Calibration", "calibration_data", "decompose", "set_alpha",
           "alpha", "cast_model", "report", "format_report", "ortho_layers", "save", "load", "read_manifest",
           "load_model", "read_text", "fuse_siblings", "fuse_linear_siblings", "unfuse_siblings", "fuse_glu", "unfuse_glu", "fuse_norms", "unfuse_norms",
           "LibOrthoError", "SaveFormatError", "perplexity", "use_decode_attention"]


def perplexity(*args, **kwargs):
    """See :func:`libortho.eval.ppl.perplexity`."""
    from .eval.ppl import perplexity as _ppl
    return _ppl(*args, **kwargs)
