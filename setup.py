"""Package discovery only (metadata is in setup.cfg): the repository root is the `align` package."""

from setuptools import find_packages, setup

setup(packages=["align"] + [f"align.{name}" for name in find_packages(where=".", exclude=["tests", "tests.*"])])
