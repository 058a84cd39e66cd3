"""`tune` command line (entry point: tunelab.cli.main:main)."""
