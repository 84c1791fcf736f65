"""Everything that touches disk: atomic writes, user JSON/YAML with clear errors, tensor files (safetensors,
torch.load(weights_only=True)), the vlbridge checkpoint layout and transformers config.json reading.
Torch-free to import (the modules that need torch import it themselves)."""
