# make run: install everything, then start the research on the embedded defaults.
# make test: install everything, then lint, type-check and run the whole test suite.
.PHONY: install run test test-fast
install:
	bash scripts/setup.sh
run: install
	.venv/bin/autoresearch
test:
	bash scripts/test.sh
test-fast:
	bash scripts/test.sh -m "not slow"
