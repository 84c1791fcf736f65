"""Built-in connectors: the Q-Former and LLaVA's linear and MLP projectors."""
