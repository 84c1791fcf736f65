"""Built-in image encoders: EVA ViT-g/14 (BLIP-2's), CLIP ViT-L/14 (open_clip), and the generic
`open-clip` (any open_clip ViT) and `hf-vision` (any transformers vision tower)."""
