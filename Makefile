.PHONY: demo test lint install

# The README's first command: install what is needed, then run the main job on the embedded default.
demo:
	bash scripts/install.sh
	metalora demo

# The README's second command (and CI's): install the dev tools, then run the whole test suite.
test:
	bash scripts/install.sh --dev
	python3 -m pytest -q

lint:
	ruff check . && ruff format --check .
