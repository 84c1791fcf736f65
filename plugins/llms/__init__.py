"""Built-in language models: OPT (decoder-only) and FlanT5 (encoder-decoder), via transformers."""
