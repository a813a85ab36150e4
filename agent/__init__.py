"""The headless core of local-autoresearch: the scheduler (engine) and its books (ledger + git), the sandbox that
runs and judges one training, the trainers that give it a machine (here or Ray), the researcher that proposes,
and the command line."""
