"""The Helm chart, one module per concern."""
