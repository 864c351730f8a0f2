"""Analysis: fidelity and cost (``fidelity``, ``cost``), representation similarity (``cka``),
probes of what got distilled (``probes``), gradient variance (``gradvar``) and the HTML run report
and run comparison (``report``, written with ``html``)."""
