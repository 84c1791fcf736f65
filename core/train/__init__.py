"""vlbridge.train: what training needs beyond the model.

Submodules: `losses` (BLIP-2's stage-1 losses and the prefix-LM split, pure tensor functions),
`distributed` (gathers that also work in a single process), `objectives` (what the trainer calls:
`objective(model, batch) -> {"loss": ..., component: ...}` for stage 1 and stage 2).

This package's own import stays torch-free; import the submodules that need torch explicitly.
"""
