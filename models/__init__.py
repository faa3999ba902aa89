"""The ML models of imgapi: the BLIP captioner.

Importing this package imports neither torch nor transformers (the optional `caption` extra);
they are imported when a model is loaded.
"""

from models.captioner import Captioner
from models.errors import NOT_INSTALLED, CaptionError

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"

__all__ = ["DEFAULT_MODEL", "NOT_INSTALLED", "CaptionError", "Captioner"]
