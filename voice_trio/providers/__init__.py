"""Clients for the external services, one module per wire protocol; no call logic here."""
