import os

import pytest

from patch_viewer.core.merge.plan import BACKEND_ENV


@pytest.fixture(scope="module", params=["numba", "numpy"])
def backend(request):
    """Run a module's tests on each merge backend (module scope: hypothesis allows it)."""
    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = request.param
    yield request.param
    if old is None:
        del os.environ[BACKEND_ENV]
    else:
        os.environ[BACKEND_ENV] = old
