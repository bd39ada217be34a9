"""Tests of sidecar.core: pure, no servers."""
