"""The built-in tasks of ``peftkit train``, one module each. Every :class:`~peftkit.train.tasks.base.Task`
subclass with a ``name`` defined in a module of this package is found by
:mod:`peftkit.train.plugins`; nothing here needs to list them."""
