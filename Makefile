# vhdkit: set-up, demo, tests, lint and benchmarks.  `make demo` and `make test` do all set-up on a
# fresh Debian 12 machine: the apt packages (as root), a venv in .venv with the project installed.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Reference tools the tests use as oracles, and what the FUSE, NBD and Xen parts run against.
APT_PACKAGES := qemu-utils qemu-system-common libvhdi-utils python3-libvhdi e2fsprogs fdisk \
	fuse3 libfuse3-3 fio libnbd-bin libxen-dev xenstore-utils mtools dosfstools gcc libc6-dev \
	python3 hyperfine time

CORPUS_DEFAULT := $(abspath ../shared/corpus)
export VHD_CORPUS ?= $(if $(wildcard $(CORPUS_DEFAULT)/SOURCES.txt),$(CORPUS_DEFAULT),)

PYTEST_ARGS ?=

.PHONY: all deps venv demo test test-blktap lint bench clean

all: test

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "Installing: $$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
		else \
			echo "Missing packages; run as root:"; echo "  apt-get install -y $$missing"; exit 1; \
		fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: deps venv
	$(PY) -m vhdtools.demo demo-out

test: deps venv
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# blktap's vhd-util is not packaged anywhere this project installs from: build it yourself and
# name it, e.g. `make test-blktap VHD_UTIL=$$HOME/blktap/vhd/vhd-util`.
test-blktap: deps venv
	@test -n "$(VHD_UTIL)" || { echo "set VHD_UTIL=/path/to/vhd-util (blktap, built from its source)"; exit 2; }
	VHD_UTIL="$(VHD_UTIL)" $(PY) -m pytest -n 2 tests/interop/test_blktap.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check vhd blockback fuse tools tests benchmarks
	$(VENV)/bin/ruff format --check vhd blockback fuse tools tests benchmarks
	@# mypy cannot follow setuptools' package-dir mapping (fuse/ -> vhdfuse, tools/ -> vhdtools):
	@# give it a tree of links named as the packages are imported.
	rm -rf $(VENV)/mypy-src && mkdir -p $(VENV)/mypy-src
	ln -s $(CURDIR)/vhd $(VENV)/mypy-src/vhd
	ln -s $(CURDIR)/blockback $(VENV)/mypy-src/blockback
	ln -s $(CURDIR)/fuse $(VENV)/mypy-src/vhdfuse
	ln -s $(CURDIR)/tools $(VENV)/mypy-src/vhdtools
	cd $(VENV)/mypy-src && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		-p vhd -p blockback -p vhdfuse -p vhdtools

bench: deps venv
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) demo-out bench-out build *.egg-info
