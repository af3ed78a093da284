"""dandelion: classify photos as dandelion or grass, end to end."""

from dandelion_lib.config import DEFAULT_LABELS as LABELS
from dandelion_lib.config import UNCERTAIN

__version__ = "0.1.0"

__all__ = ["LABELS", "UNCERTAIN", "__version__"]
