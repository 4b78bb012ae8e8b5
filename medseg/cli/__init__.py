"""The ``medseg`` console script: one module per subcommand, each a thin layer over the Python API."""
