"""The embedded default: `vistune demo` reproduces the LLaVA paper in miniature."""
