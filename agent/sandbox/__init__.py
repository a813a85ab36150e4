"""The sandbox: how one run is made safe and scored on the machine that trains it.

`spec` (the request, the recipe, the result), `sandbox` (one machine's place for runs), `runner` (one run),
`process` (process trees), `output` (the capped log), `handover` (safe reads of what a run leaves),
`judging` (the clean judge), `containment` (Linux namespaces), `probe` (a few seeded steps), `summary` (a run's
printed lines), and `judge.py`, the script the judge process runs.
"""
