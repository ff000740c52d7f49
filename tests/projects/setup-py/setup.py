from setuptools import setup

setup(
    name="setup-only",
    version="0.5.0",
    packages=["setup_only"],
    install_requires=["six>=1.16"],
    entry_points={"console_scripts": ["setup-only=setup_only:main"]},
)
