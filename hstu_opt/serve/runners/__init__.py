"""Runners: what executes validated requests (native scheduler + engine, or vLLM)."""
