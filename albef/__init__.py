"""Inference with ALBEF checkpoints from Python (albef.api) and the command line (python -m albef)."""
from albef.api import ALBEFInference, Gallery, GradCAMMaps, KindError

__all__ = ['ALBEFInference', 'Gallery', 'GradCAMMaps', 'KindError']
