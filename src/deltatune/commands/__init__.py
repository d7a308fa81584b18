"""Sub-commands of the ``deltatune`` CLI, one module each (see ``deltatune.cli``)."""
