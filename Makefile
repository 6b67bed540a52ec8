# Set-up is two commands (see README): `make serve` and `make test`.
# Both create .venv and install the package on first run; re-install only when pyproject.toml changes.
# Recipes are silent and installs report on stderr: `make serve` keeps stdout for usage records only.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve serve-fake test demo lint load soak proto clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) >&2
	@echo "installing llmtally and its dependencies into $(VENV) ..." >&2
	@$(BIN)/python -m pip install --quiet --upgrade pip >&2
	@$(BIN)/python -m pip install --quiet -e '.[dev]' >&2
	@touch $(STAMP)

serve: $(STAMP)
	@$(BIN)/llmtally serve --config config.toml

# The same proxy with every upstream answered by the built-in fake: try it with your own SDK code,
# no key, no network (stderr says so, and every record carries "fake_upstream": true).
serve-fake: $(STAMP)
	@$(BIN)/llmtally serve --config config.toml --fake-upstream

demo: $(STAMP)
	@$(BIN)/llmtally demo

test: $(STAMP)
	$(BIN)/ruff check src tests load_tests examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests load_tests examples
	$(BIN)/ruff format --check src tests load_tests examples
	$(BIN)/mypy

# Proxy overhead against direct calls, nginx (Debian's, when installed) and LiteLLM's proxy, which gets
# its own virtualenv here (load_tests/.venv-litellm) so it never touches llmtally's.
LITELLM := load_tests/.venv-litellm/bin/litellm
$(LITELLM):
	@$(PYTHON) -m venv load_tests/.venv-litellm >&2
	@load_tests/.venv-litellm/bin/python -m pip install --quiet 'litellm[proxy]' >&2

load: $(STAMP) $(LITELLM)
	$(BIN)/python load_tests/run.py $(LOAD_ARGS)

# The long fuzz profile (tests/*/test_fuzz_*.py, ~15 min on 2 cores), then load_tests/soak.py: mixed
# SDK traffic through `llmtally serve --fake-upstream` for 10 min, failing on RSS/fd growth
# (docs/reliability.md, "Fuzzing and soak"). SOAK_ARGS='--duration 180' for a shorter soak.
soak: $(STAMP)
	HYPOTHESIS_PROFILE=soak $(BIN)/python -m pytest -q tests/providers/test_fuzz_*.py tests/proxy/test_fuzz_*.py
	$(BIN)/python load_tests/soak.py $(SOAK_ARGS)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I src/llmtally/pipeline/proto --python_out=src/llmtally/pipeline/proto \
		--pyi_out=src/llmtally/pipeline/proto src/llmtally/pipeline/proto/usage_record.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
