"""The plugin contract, the part a plugin author reads: hooks, spec classes, the registry and its loader,
the shipped registry.yaml, and what vlbridge calls on a plugin's modules. Never imports torch."""
