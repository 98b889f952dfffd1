"""The studies built on pararnn, and the ``pararnn`` command: ``pararnn bench`` (speed against the
sequential loop), ``pararnn track`` (state tracking, linear against nonlinear) and ``pararnn lm``.

A client of the library: it imports pararnn like any user would, and pararnn never imports it.
Progress bars (tqdm) and plots (matplotlib) are optional: ``pip install "pararnn[studies]"``.
"""
