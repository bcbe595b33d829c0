# Command 1: `make run`  — install what is missing and run the server on 127.0.0.1:4973.
# Command 2: `make test` — the same preparation, then the test suite.
.PHONY: run test setup lint bench

run:
	@scripts/setup.sh
	@scripts/run.sh

test:
	@scripts/setup.sh --test
	@.venv/bin/python -m pytest -q --durations=15 $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy

bench:
	@scripts/setup.sh --test
	.venv/bin/python -m bench
