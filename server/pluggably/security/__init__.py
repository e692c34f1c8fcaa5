"""Who may call and how much: API keys and scopes, rate limits, TLS."""
