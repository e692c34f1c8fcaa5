"""Hosted providers: adapters for provider HTTP APIs over one shared transport layer."""
