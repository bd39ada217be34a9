"""Tests of sidecar.tools: pure, no servers."""
