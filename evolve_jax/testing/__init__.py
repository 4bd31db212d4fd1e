"""Test utilities that ship with the package: a fake Gemini REST server (``fake_gemini``)."""
