"""Building blocks of the parts (encoder, LLM, connector) that plugins use too: `FrozenPart` and dtypes,
the one attention entry point, cheap dropout, and images -> an encoder's pixel batch."""
