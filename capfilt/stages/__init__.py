"""Pipeline stages: plain callables ``pyarrow.Table -> pyarrow.Table`` (same rows, same order, more columns).

No module in this package imports Ray; :mod:`capfilt.runner` maps stages onto Ray Data.
"""
