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
# `make test-xen` (the real-Xen lab, tests/xen/): Xen's toolstack for dom0, QEMU to boot Xen under
# TCG, GRUB to build its ISO, busybox/cpio/kmod for the initramfs images, nbd-client for the NBD
# route.  The hypervisor and the 6.1 kernel are downloaded, not installed (tests/xen/lab.py).
XEN_APT_PACKAGES := xen-utils-4.17 qemu-system-x86 grub-pc-bin grub-common xorriso mtools \
	busybox-static cpio kmod nbd-client

CORPUS_DEFAULT := $(abspath ../shared/corpus)
export VHD_CORPUS ?= $(if $(wildcard $(CORPUS_DEFAULT)/SOURCES.txt),$(CORPUS_DEFAULT),)

PYTEST_ARGS ?=

.PHONY: all deps deps-xen venv demo test test-xen test-blktap lint bench clean

all: test

# $(call apt_install,PACKAGES): install what is missing (as root), or say what to install.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "Installing: $$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
		else \
			echo "Missing packages; run as root:"; echo "  apt-get install -y $$missing"; exit 1; \
		fi; \
	fi
endef

deps:
	$(call apt_install,$(APT_PACKAGES))

deps-xen: deps
	$(call apt_install,$(XEN_APT_PACKAGES))

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

# Boots Xen 4.17 + a Debian dom0 under QEMU once and runs tests/xen/dom0/ in it (README "Real-Xen
# lab"); downloads and images are cached in build/xen-lab/, logs land in build/xen-lab/run/.
test-xen: deps-xen venv
	@# One boot runs every scenario inside a session fixture: the suite-wide 300 s test timeout
	@# (pyproject) would cut it; the lab bounds itself (XEN_LAB_TIMEOUT, 2400 s by default).
	VHD_TEST_XEN=1 $(PY) -m pytest -p no:xdist -o timeout=3000 tests/xen $(PYTEST_ARGS)

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

# The `vhd` timed is a regular install of this checkout, built afresh into bench-out/install
# (benchmarks/_install.py: wheel + fresh venv, byte-compiled by pip, as a user's `pip install`):
# the editable dev venv pays setuptools' editable finder at every start-up.  `make bench
# BENCH=compare` runs only the named benchmark modules.
bench: deps venv
	$(PY) -m benchmarks._install bench-out/install
	VHD_BENCH_CLI=$(CURDIR)/bench-out/install/bin/vhd $(PY) -m benchmarks.run $(BENCH)

clean:
	rm -rf $(VENV) demo-out bench-out build *.egg-info
