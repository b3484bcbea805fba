"""Storage tests: plain ``assert`` in the shared abstract suite gets pytest's detailed messages too."""

import pytest

pytest.register_assert_rewrite("tests.storage.abstract")
