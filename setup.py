"""Packaging for stagetx; ``twisted.plugins`` is listed so ``twistd stage`` finds the dropin."""

from setuptools import Extension, find_namespace_packages, setup

setup(
    name="stagetx",
    version="0.1.0",
    description="A Twisted re-creation of the STAGE game-server platform, scripted in Lua",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["stagetx", "stagetx.*"], exclude=["*.__pycache__"]) + ["twisted.plugins"],
    package_data={
        "stagetx.lua": ["*.lua"],
        "stagetx.broker": ["*.lua"],
        "stagetx.admin": ["static/*"],
        "stagetx.stages.index": ["_order.pyi"],
    },
    ext_modules=[Extension("stagetx.stages.index._order", ["stagetx/stages/index/_order.c"])],
    entry_points={"console_scripts": ["stagetx-client = stagetx.client.cli:main"]},
    install_requires=[
        "twisted[tls]>=23.8",
        "lupa>=2.2",
        "sortedcontainers>=2.4,<3",  # Ranking reads SortedList internals (_lists, _maxes)
        "treq>=23.11",
        "attrs>=23.1",
        "msgpack>=1.0",
        "pymongo>=4.6",
        "prometheus-client>=0.19",
        "setproctitle>=1.3",
        "txredisapi>=1.4.10",
        "hiredis>=2.0",  # txredisapi parses replies with it (C) instead of its Python line reader
        "autobahn>=24.4",
        "wsproto>=1.2",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-twisted>=1.14", "pytest-timeout>=2.2", "hypothesis>=6"],
        "dev": ["ruff>=0.4", "mypy>=1.8", "mypy-zope>=1.0"],
    },
)
