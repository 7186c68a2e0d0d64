import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Pilot tests run on anyio's pytest plugin, asyncio backend (Textual's loop)."""
    return "asyncio"
