"""Tests of sidecar.server: pure, no servers."""
