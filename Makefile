# Two commands: `make lab` opens the course, `make test` runs the whole test suite.
# Both set up a local virtual environment first (idempotent): CPU torch, then the course package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: lab test unit notebooks fetch bench constraints clean

$(STAMP): pyproject.toml constraints.txt scripts/install-torch.sh
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned and CPU-only where there is no GPU (see the script for what each case downloads).
	bash scripts/install-torch.sh $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[lab,test]"
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/course fetch || echo "Some data could not be fetched; the notebooks say what to run."
	# Your own copies in work/: git, the build and the tests never touch them (course work --refresh NB for a fresh one).
	$(VENV)/bin/course work
	# --allow-root only where we are root (containers, some cloud machines): JupyterLab refuses otherwise.
	$(VENV)/bin/jupyter lab work/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

test: unit notebooks

unit: $(STAMP)
	$(VENV)/bin/course build --check
	$(PY) -m pytest tests -q

notebooks: $(STAMP)
	COURSE_PROFILE=smoke COURSE_STRICT=1 $(PY) -m pytest --nbval-lax solutions -q -p no:cacheprovider
	COURSE_PROFILE=smoke $(PY) -m pytest --nbval-lax weeks -q -p no:cacheprovider

fetch: $(STAMP)
	$(VENV)/bin/course fetch

bench: $(STAMP)
	$(VENV)/bin/course bench --profile cpu

constraints: $(STAMP)
	{ echo "# Exact versions CI tests. Update deliberately (make constraints), never by accident."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt

clean:
	rm -rf $(VENV)
