"""A pytest plugin for test_cpu_attention's narrower-build test: loaded with `-p`, it makes
`cpu_extension` build and load the CPU kernels with the flags named by QUIRE_TEST_VECTOR_FLAGS
(space-separated; empty: the compiler's baseline), cached under their own name, before any
test loads them."""
import os

from quire.kernels import cpu_extension

_FLAGS = os.environ.get("QUIRE_TEST_VECTOR_FLAGS", "").split()
cpu_extension._vector_flags = lambda: list(_FLAGS)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"cpu kernels built as {cpu_extension.extension_name()}")
