"""pylux.experiments: the papers' experiments at laptop scale, behind one CLI.

``pylux experiments list`` names them; ``pylux experiments <name> [options]``
runs one. Each experiment is a module of this package registered in
:data:`EXPERIMENTS` with two functions, ``add_arguments(parser)`` and
``run(args) -> dict``, and writes its tables (markdown and JSON) and plots
(PNG) under ``--out`` (default ``runs/<name>``).
"""

from .cli import EXPERIMENTS, main

__all__ = ["EXPERIMENTS", "main"]
