"""Training RWKV-7 in MLX: from scratch, full fine-tuning, LoRA and state tuning.

    from rwkv_mlx.train import TrainConfig, train
    result = train(TrainConfig(data="shakespeare.txt", out="runs/demo",
                               shape=dict(vocab_size=65536, n_embd=256, n_layer=6, ffn_dim=1024,
                                          decay_rank=32, iclr_rank=32, value_rank=32, gate_rank=64),
                               steps=2000, max_seconds=300))

See docs/training.md.  The pieces: ``data`` (tokenize, split, batches),
``init`` (RWKV-LM's initial values), ``lora`` (adapters and merging),
``evaluate`` (perplexity, KL divergence), ``loop`` (the optimizer loop,
checkpoints and resume); gradients through the WKV recurrence come from
``rwkv_mlx.wkv_chunked``.
"""

from .data import TokenSplits, batch_at, tokenize_corpus, unigram_perplexities
from .evaluate import Divergence, Perplexity, chunked_wkv, compare, perplexity
from .init import init_model, init_weights, suggested_args
from .lora import LoRALinear, apply_lora, merge_lora
from .loop import MODES, TrainConfig, TrainResult, TunableState, learning_rate, train

__all__ = [
    "TrainConfig", "TrainResult", "TunableState", "MODES", "train", "learning_rate",
    "TokenSplits", "tokenize_corpus", "batch_at", "unigram_perplexities",
    "Perplexity", "Divergence", "perplexity", "compare", "chunked_wkv",
    "init_model", "init_weights", "suggested_args",
    "LoRALinear", "apply_lora", "merge_lora",
]
