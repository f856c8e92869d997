"""walex: Postgres Change Data Capture for Python."""
