"""The built-in training extensions of ``peftkit train``, one module each; every
:class:`~peftkit.train.extension.TrainExtension` subclass with a ``name`` defined here is
found by :mod:`peftkit.train.plugins`."""
