"""LayerSkip-style training of small early-exit Llama models on CPU (tokenizer, data, recipe,
exit evaluation)."""
