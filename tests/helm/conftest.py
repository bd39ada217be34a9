"""Fixtures of the chart tests: the chart rendered once per values file."""

from __future__ import annotations

import pytest

from tests.support.charts import VALUES, Rendered, rendered_values


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return rendered_values(request.param)
