"""The destinations: the API key from Key Vault (secrets), the transport every platform shares (api_client), the
request budget shared by all instances (rate_budget), one client per platform behind one interface
(autopilot_client, ortto_client) and an account's clients together (accounts). Imports shared.runtime and
shared.source.
"""
