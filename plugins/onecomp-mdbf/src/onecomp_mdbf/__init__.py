"""Double binary factorization (Boža & Macko, 2025) and its multi-envelope extension MDBF
(Ichikawa et al., 2025): the ``mdbf`` quantizer and the sign-packed ``mdbf`` format."""

from .factorize import Term, bits_per_weight, fit, fit_term, project, rank_for
from .format import MDBFFormat, MDBFParams, pack_signs, unpack_signs
from .quantizer import MDBF, MDBFConfig

__all__ = ["Term", "bits_per_weight", "fit", "fit_term", "project", "rank_for", "MDBFFormat", "MDBFParams",
           "pack_signs", "unpack_signs", "MDBF", "MDBFConfig"]
