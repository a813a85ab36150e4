"""The headless core of local-autoresearch: workspace, runner, ledger, decisions, local LLM, engine, CLI."""
