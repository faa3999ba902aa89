"""The ML models of imgapi: the BLIP captioner.

Importing this package imports neither torch nor transformers (the optional `caption` extra);
they are imported when a model is loaded.
"""

from models.captioner import Captioner
from models.errors import NOT_INSTALLED, CaptionError, CaptionUnavailable

# The default model is CAPTION_MODEL's default, declared once in imgapi_core.settings.
__all__ = ["NOT_INSTALLED", "CaptionError", "CaptionUnavailable", "Captioner"]
