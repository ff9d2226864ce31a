from .interface import ahn_attention, ahn_decode  # noqa: F401
from . import reference  # noqa: F401
