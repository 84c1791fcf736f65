"""Fine-tuning beyond the connector: an unfrozen (or partly unfrozen) encoder, LoRA on the LLM, and how
a model records and restores them."""
