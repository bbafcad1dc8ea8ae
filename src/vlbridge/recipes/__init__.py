"""End-to-end recipes built on the library (the embedded default lives here)."""
