"""vlbridge models inside lmms-eval (EvolvingLMMs-Lab's benchmark harness), and lmms-eval tasks
inside `vlbridge compare`.

Only this room imports lmms-eval, and only in `model`, `manifest` and `tasks`, on use: the rest of
vlbridge runs without the `lmms-eval` extra. `options` is torch- and lmms-eval-free, so a compare
config that lists lmms-eval tasks validates anywhere.
"""
