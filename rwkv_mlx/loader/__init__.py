"""Between the file formats and the model: ``load`` (file -> model), convert and export."""

from .gguf import LoadInfo, load

__all__ = ["LoadInfo", "load"]
