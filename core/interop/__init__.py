"""Other projects' formats in and out: transformers BLIP-2, InstructBLIP and LLaVA, and LAVIS checkpoints."""
