.PHONY: demo test lint install

# The README's first command: install what is needed, then run the main job on the embedded default.
# scripts/python.sh: python3, or the project's .venv where the system Python refuses pip (PEP 668).
demo:
	bash scripts/install.sh
	"$$(bash scripts/python.sh)" -m metalora.cli demo

# The README's second command (and CI's): install the dev tools, then run the whole test suite.
test:
	bash scripts/install.sh --dev
	"$$(bash scripts/python.sh)" -m pytest -q

lint:
	ruff check . && ruff format --check .
