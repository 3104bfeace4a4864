"""Inference with ALBEF checkpoints from Python (albef.api, albef.export) and the command line
(python -m albef)."""
from albef.api import ALBEFInference, Gallery, GradCAMMaps, KindError, load_model
from albef.export import export_model

__all__ = ['ALBEFInference', 'Gallery', 'GradCAMMaps', 'KindError', 'export_model', 'load_model']
