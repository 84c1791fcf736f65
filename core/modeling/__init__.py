"""The model: `build`/`load` (factory), the `VLBridgeModel` nn.Module, the connector protocol (stages,
stage-1 interface), generation (inference) and retrieval."""
