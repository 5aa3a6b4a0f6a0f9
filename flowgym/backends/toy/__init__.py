"""The toy family: a tiny randomly initialised backend for tests, overhead benchmarks and examples."""

from flowgym.backends.toy.backend import ToyBackend

__all__ = ["ToyBackend"]
