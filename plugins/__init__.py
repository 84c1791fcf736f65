"""vlbridge's built-in plugins. Each `*_spec.py`-style registration module is torch-free; the modules
that build the parts are imported only through a spec's factory string."""
