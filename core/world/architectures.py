"""The sizes of the world's frozen parts: owned by the world, not by the model plugins.

Each part is saved as an ordinary checkpoint directory that says its own architecture (a transformers
`config.json`, or the encoder's `config.json` in eva-vit-g's option names), so the plugins load it as
they would load any local model; these tables only say what `train_parts` builds.
"""

from __future__ import annotations

# eva-vit-g's option names: an EVA-layout ViT (CLIP-trained on the world's captions).
ENCODER: dict[str, int] = {"width": 128, "depth": 4, "heads": 4, "mlp_hidden": 512, "patch_size": 8, "num_blocks": 4, "image_size": 64}  # 8x8 patches + [CLS]: 65 tokens
# transformers OPTConfig fields.
OPT: dict[str, int] = {"hidden_size": 160, "num_hidden_layers": 4, "num_attention_heads": 5, "ffn_dim": 640,
                       "word_embed_proj_dim": 160, "vocab_size": 512, "max_position_embeddings": 384}
# transformers T5Config fields (gated-GELU FlanT5 layout, untied head).
T5: dict[str, int] = {"d_model": 128, "d_ff": 384, "num_heads": 4, "d_kv": 32, "num_layers": 3, "vocab_size": 256}
# transformers BertConfig fields, the world Q-Former's shape (its initialisation).
BERT: dict[str, int] = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
                        "max_position_embeddings": 64}
