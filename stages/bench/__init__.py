"""The measurements behind ``pagepipe bench NAME``: one module per benchmark, each with ``main(argv)``."""
