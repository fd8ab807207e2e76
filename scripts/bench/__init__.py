"""The benchmark machinery that ``scripts/loadtest.py``, ``soak.py`` and ``memprofile.py``
share; not part of the server, and not installed with it.

The scripts run the simulators (carrier, callers, Deepgram, Anthropic) in their own process
and the server in another, so the server's CPU, memory and loop lag are its own:

- :mod:`bench.server`: the server under test as a child process, and its launchers
  (:mod:`bench.traced_serve`, :mod:`bench.variant_serve`);
- :mod:`bench.lab`: the simulators trimmed for long runs, scripted inbound calls, and this
  process's own loop lag;
- :mod:`bench.scrape` and :mod:`bench.stats`: the server's ``/metrics`` and the arithmetic
  over them (histogram deltas and quantiles, percentiles);
- :mod:`bench.machine` and :mod:`bench.report`: facts about the machine, progress, results.

A script in ``scripts/`` imports it as ``bench``: Python puts a script's own folder first on
``sys.path``, so ``.venv/bin/python scripts/loadtest.py`` finds it without help.
"""
