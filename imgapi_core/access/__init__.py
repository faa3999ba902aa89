"""Access control: who may call what. Keys with scopes (keys.py, tokens.py), signed image URLs
(signing.py), upload rate limits (ratelimit.py), and the request guard that applies them all
(guard.py). Routes only declare what they need (scopes.py)."""
