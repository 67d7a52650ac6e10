# The two commands: `make demo` (build and run the demo) and `make test` (build and run all tests).
# Builds go to build/ (Release) and build-asan/ (AddressSanitizer + UBSan).
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_ARGS ?=

.PHONY: all build build-asan demo test test-release test-asan clean

all: build

build:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)
	cmake --build build -j $(JOBS)

build-asan:
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNSA_SANITIZE=ON -DNSA_CUDA=OFF $(CMAKE_FLAGS)
	cmake --build build-asan -j $(JOBS)

demo: build
	./build/nsa_demo $(DEMO_ARGS)

test-release: build
	ctest --test-dir build --output-on-failure -j $(JOBS)

test-asan: build-asan
	ctest --test-dir build-asan --output-on-failure -j $(JOBS)

# Sanitizer run first so that the last summary line is the release suite's.
test: test-asan test-release

clean:
	rm -rf build build-asan
