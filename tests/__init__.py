"""The test suite, a package: shared code is imported as `tests.support.<module>` from the repository root."""
