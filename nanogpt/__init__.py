"""The NanoGPT sandbox: prepare.py (frozen harness) and train.py (the file the agent edits)."""
