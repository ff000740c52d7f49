"""The test cluster: binaries built from Go modules (issue 12)."""
