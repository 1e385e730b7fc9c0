"""Side-by-side benchmark of erp-broker against nginx and a minimal aiohttp proxy.

``python -m bench`` (or ``bench/run.sh``) runs everything on loopback and writes
``bench/RESULTS.md``; see ``bench/README.md``.
"""
