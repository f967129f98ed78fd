"""fastcdml's benchmark suite: ``python -m bench`` (sweep, JSON results, plots), ``bench/report.py`` (tables),
``pytest bench/ --benchmark-only`` (regression timings). It lives beside the library, not inside it."""
