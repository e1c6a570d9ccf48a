"""Model code: the decoder (llama.py), its weights (loader.py) and tokenizer (tokenizer.py)."""
