"""Destination tests: the CloudEvents encoding, and each broker on a real server."""
