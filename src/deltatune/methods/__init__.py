"""One module per method; each defines ``METHOD`` and is registered in ``deltatune.registry``."""
