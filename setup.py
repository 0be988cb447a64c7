"""Packaging for ots; `pip install .` installs the `ots` command."""

from setuptools import find_packages, setup

setup(
    name="ots",
    version="0.1.0",
    description="One-time secret service: a JSON API on Tornado and MongoDB, encrypted at rest",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["ots", "ots.*"]),
    package_data={"ots": ["py.typed"]},
    install_requires=[
        "tornado>=6.5,<7",
        # The async API (AsyncMongoClient, AsyncGridFSBucket) is stable from 4.13.
        "pymongo>=4.13,<5",
        # From 50, scrypt releases the GIL; older releases freeze the event loop.
        "cryptography>=50,<51",
        "marshmallow>=4,<5",
        "apispec>=6.8,<7",
        "precis-i18n>=1.1,<2",
        "python-json-logger>=3.3,<5",
        "prometheus-client>=0.21,<1",
    ],
    extras_require={
        "test": [
            # pytest-tornado 0.8.1 warns that pytest 10 drops its hook style.
            "pytest>=8,<10",
            "pytest-tornado>=0.8.1,<0.9",
            # pytest-tornado imports pkg_resources, which setuptools 82 removed.
            "setuptools>=65,<82",
            "coverage[toml]>=7.6,<8",
            "mongomock>=4.3,<5",
            "mockupdb>=1.8.1,<2",
            "PyYAML>=6,<7",
            "openapi-spec-validator>=0.7,<0.10",
            "jsonschema>=4.18,<5",
            "hypothesis>=6.170,<7",
            "schemathesis>=4.32,<5",
        ],
        # The benchmark samples the service's memory with psutil.
        "bench": ["psutil>=7.2,<8"],
    },
    entry_points={"console_scripts": ["ots = ots.server:main"]},
    classifiers=[
        "Framework :: Tornado",
        "Programming Language :: Python :: 3",
        "Topic :: Security :: Cryptography",
    ],
)
