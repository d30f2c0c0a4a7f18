"""mimdex.infra."""
