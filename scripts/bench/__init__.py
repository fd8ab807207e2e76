"""The benchmark machinery that ``scripts/loadtest.py``, ``soak.py`` and ``memprofile.py``
share; not part of the server, and not installed with it.

The scripts run the server in a process of its own, so the server's CPU, memory and loop lag
are its own, and the load generator elsewhere:

- :mod:`bench.server`: the server under test as a child process, and its launchers
  (:mod:`bench.traced_serve`, :mod:`bench.variant_serve`);
- :mod:`bench.generator`: the load generators. The lean one (``loadtest.py``'s default) is
  two child processes, :mod:`bench.carrier_serve` (Telnyx with the lean carrier and callers)
  and :mod:`bench.providers_serve` (the lean Deepgram, Anthropic, ElevenLabs), spoken to in
  JSON lines (:mod:`bench.ipc`); the reference one is the lab in the script's own process;
- :mod:`bench.lab`: the reference simulators trimmed for long runs, scripted inbound calls
  and their outcome, and a process's own loop lag;
- :mod:`bench.burst`: the synchronized turn-end bursts (``loadtest.py --synchronized``);
- :mod:`bench.scrape` and :mod:`bench.stats`: the server's ``/metrics`` and the arithmetic
  over them (histogram deltas and quantiles, percentiles);
- :mod:`bench.machine` and :mod:`bench.report`: facts about the machine, progress, results.

A script in ``scripts/`` imports it as ``bench``: Python puts a script's own folder first on
``sys.path``, so ``.venv/bin/python scripts/loadtest.py`` finds it without help; the child
processes get ``scripts/`` on ``PYTHONPATH`` and run as ``python -m bench.<module>``.
"""
