# The two commands: `make demo` (set up, build and run the demo) and `make test` (set up, build
# and run every test). Builds go to build/ (Release, with the torch ops library) and build-asan/
# (AddressSanitizer + UBSan, C++ only). Python packages are installed with pip when missing.
JOBS ?= $(shell nproc)
PYTHON ?= python3
CMAKE_FLAGS ?=
DEMO_ARGS ?=
PY_DEPS = torch==2.11.0 numpy pytest

.PHONY: all deps build build-asan demo test test-release test-asan test-python clean

all: build

# Installs the Python packages the torch ops and tests need, unless they import already.
deps:
	@$(PYTHON) -c "import torch, numpy, pytest" 2>/dev/null || $(PYTHON) -m pip install -q $(PY_DEPS)

build: deps
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DNSA_BUILD_TORCH=ON -DPython_EXECUTABLE=$$(command -v $(PYTHON)) $(CMAKE_FLAGS)
	cmake --build build -j $(JOBS)

build-asan:
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNSA_SANITIZE=ON -DNSA_CUDA=OFF
	cmake --build build-asan -j $(JOBS) --target nsa_tests nsa_example_minimal

demo: build
	./build/nsa_demo $(DEMO_ARGS)

test-asan: build-asan
	ctest --test-dir build-asan --output-on-failure -j $(JOBS)

test-release: build
	ctest --test-dir build --output-on-failure -j $(JOBS)

test-python: build
	NSA_OPS_LIBRARY=$(CURDIR)/build/_nsa_ops.so PYTHONPATH=$(CURDIR)/python $(PYTHON) -m pytest tests/python -q

test: test-asan test-release test-python

clean:
	rm -rf build build-asan build-wheel
