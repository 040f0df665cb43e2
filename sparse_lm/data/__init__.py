"""Training text: sources (stdlib, directory, Hugging Face), the BPE tokenizer, the token cache, batches."""
