# The two commands: `make demo` (set up, build and run the demo) and `make test` (set up, build
# and run every test). Builds go to build/ (Release, with the torch ops library), build-asan/
# (AddressSanitizer + UBSan, C++ only) and, for the demo on a machine without a GPU, build-cpu/. Python packages are installed with pip when missing.
JOBS ?= $(shell nproc)
PYTHON ?= python3
CMAKE_FLAGS ?=
DEMO_ARGS ?=
PY_DEPS = torch==2.11.0 numpy pytest safetensors==0.4.5

.PHONY: all deps build build-asan demo test test-release test-asan test-python clean

all: build

# Installs the Python packages the torch ops, the training showcase and the tests need, unless
# they import already (safetensors: checkpoint weights; without it nsa.train falls back to torch.save).
deps:
	@$(PYTHON) -c "import torch, numpy, pytest, safetensors" 2>/dev/null || $(PYTHON) -m pip install -q $(PY_DEPS)

build: deps
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DNSA_BUILD_TORCH=ON -DPython_EXECUTABLE=$$(command -v $(PYTHON)) $(CMAKE_FLAGS)
	cmake --build build -j $(JOBS)

build-asan:
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNSA_SANITIZE=ON -DNSA_CUDA=OFF
	cmake --build build-asan -j $(JOBS) --target nsa_tests nsa_example_minimal

# The training showcase (docs/training.md): a short m7c-125m run on a GPU (build/, with the CUDA
# kernels), the tiny preset on a machine without one (about two minutes on two cores), built in
# build-cpu/ without CUDA: the kernels would take long to compile and could not run there.
# DEMO_ARGS go to `python -m nsa.train`.
demo: deps
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(MAKE) --no-print-directory build && dir=build && preset="--preset m7c-125m --steps 300"; \
	else \
	  cmake -S . -B build-cpu -DCMAKE_BUILD_TYPE=Release -DNSA_CUDA=OFF -DNSA_BUILD_TESTS=OFF -DNSA_BUILD_TORCH=ON \
	    -DPython_EXECUTABLE=$$(command -v $(PYTHON)) $(CMAKE_FLAGS) && \
	  cmake --build build-cpu -j $(JOBS) && dir=build-cpu && preset="--preset tiny"; \
	fi && set -x && NSA_OPS_LIBRARY=$(CURDIR)/$$dir/_nsa_ops.so PYTHONPATH=$(CURDIR)/python \
	  $(PYTHON) -m nsa.train $$preset $(DEMO_ARGS)

test-asan: build-asan
	ctest --test-dir build-asan --output-on-failure -j $(JOBS)

test-release: build
	ctest --test-dir build --output-on-failure -j $(JOBS)

test-python: build
	NSA_OPS_LIBRARY=$(CURDIR)/build/_nsa_ops.so PYTHONPATH=$(CURDIR)/python $(PYTHON) -m pytest tests/python -q

test: test-asan test-release test-python

clean:
	rm -rf build build-asan build-cpu build-wheel
