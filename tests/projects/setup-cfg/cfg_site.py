"""The site's version, importable once installed."""

VERSION = "0.2.0"
