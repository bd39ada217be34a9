"""Tests of sidecar.agent: pure, no servers."""
