# The conformance kit's fixtures (arbor_tiny_model, arbor_registry).
pytest_plugins = ["arbor_plugins.testing"]
