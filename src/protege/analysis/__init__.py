"""Analysis of finished runs: probes of what got distilled (``probes``), gradient variance
(``gradvar``), the HTML run report and run comparison (``report``, written with ``html``), and a run
followed by its report (``runs``: what ``pg.run`` is). The metrics they read are :mod:`protege.metrics`."""
