"""Text on top of the model: the world tokenizer, sampling, generation and chat."""
