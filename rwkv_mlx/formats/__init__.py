"""File formats: bytes on disk <-> named tensors and metadata.

No module here imports the model (rwkv_mlx.model) or the loader; the loader
(rwkv_mlx.loader) wires a reader's tensors into a model.
"""
