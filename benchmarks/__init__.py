"""Benchmarks: side-by-side measurements reported as JSON, a markdown table and a PNG plot.

Benchmarks are not tests: nothing here asserts a timing. Run one as a module, e.g.
``python -m benchmarks.save_load --quick``. Shared helpers (machine description, page-cache dropping, peak-RSS
tracking, report writers) live in ``benchmarks._report``.
"""
