"""dandelion: classify photos as dandelion or grass, end to end."""

__version__ = "0.1.0"

LABELS: tuple[str, ...] = ("dandelion", "grass")
"""Training labels, in class-index order."""

UNCERTAIN = "uncertain"
"""Answer given below the confidence threshold; never a training label."""
