"""Plots and HTML reports of runs, read back from their folders.

    curves.py   a run's metrics as (x, y) series over steps, tokens or wall time, and
                `plot_series`, which draws series as one PNG (matplotlib, Agg)
    samples.py  a few short generations from a run's newest checkpoint
    html.py     `lmlab report`'s page: one self-contained HTML file (figures inlined as
                base64 PNG, no script, nothing fetched)

`lmlab report` and `lmlab plot` use it; experiments draw their figures with `plot_series`.
matplotlib is optional (`pip install 'lmlab[export]'`) and imported only to draw.
"""
