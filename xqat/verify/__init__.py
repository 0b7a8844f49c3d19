"""Verification: parity, integer emulation, EdgeTPU readiness."""
