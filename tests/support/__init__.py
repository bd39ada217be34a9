"""What the tests share: helpers by noun (routes, payers, settlement, …). Fixtures live in
tests/conftest.py; no test module imports conftest or another test module."""
