import pytest

from patch_viewer.core.merge.plan import BACKEND_ENV


@pytest.fixture(scope="module", params=["numba", "numpy"])
def backend(request):
    """Run a module's tests on each merge backend (module scope: hypothesis allows it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(BACKEND_ENV, request.param)
        yield request.param
