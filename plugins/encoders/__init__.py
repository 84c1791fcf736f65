"""Built-in image encoders: EVA ViT-g/14 (BLIP-2's) and CLIP ViT-L/14 (open_clip)."""
